"""Streaming audio front end: causal log-mel, a causal conv audio encoder and a chunk-invariant
streaming wrapper.

Alignment (all indices 0-based, ``hop`` = ``cfg.mel_hop`` = 160 samples, ``mpf`` =
``cfg.mels_per_frame`` = 4, ``L`` = ``cfg.lookahead_frames`` = 2):

* mel frame ``k`` covers samples ``[k*hop - (win - hop), k*hop + hop)`` (win = 400): it depends only
  on samples ``< (k+1)*hop``. Audio before sample 0 is taken as silence (zeros), so a mel frame with
  ``k < 0`` is the constant :data:`SILENCE_LOG_MEL`.
* video frame ``t`` owns mel frames ``[t*mpf, (t+1)*mpf)`` (samples ``[640t, 640(t+1))``).
* the audio tokens of video frame ``t`` use mel frames ``[(t+1+L)*mpf - R, (t+1+L)*mpf)`` where
  ``R`` is :attr:`AudioEncoder.receptive_field` (68 mel frames = 680 ms with the default stack):
  they need samples ``< 640*(t+1+L)``, i.e. ``L`` video frames (80 ms) of lookahead.

The offline path ``encoder(LogMel(cfg)(audio))`` and :class:`StreamingAudioFrontend` compute the
same numbers (the streaming path evaluates the same convolutions on fixed-size windows).
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WIN_LENGTH = 400   # 25 ms at 16 kHz
N_FFT = 512
LOG_EPS = 1e-6     # log(mel + eps): finite and smooth at digital silence
# log-mel of an all-zero frame, computed the way LogMel computes it (float64 then float32)
SILENCE_LOG_MEL = float(torch.log(torch.tensor(LOG_EPS, dtype=torch.float64)).float())


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Triangular HTK-mel filters, ``[n_fft//2 + 1, n_mels]`` float64.

    Low filters at 16 kHz / n_fft 512 are narrower than one FFT bin and would sample the triangle
    at no bin at all; such a filter gets weight 1 on the bin nearest its centre instead of being an
    all-zero (constant, useless) feature.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    mel_to_hz = lambda m: 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)  # noqa: E731
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    fb = np.clip(np.minimum(up, down), 0.0, None)            # [n_mels, bins]
    for m in np.flatnonzero(fb.sum(1) == 0):
        fb[m, int(np.argmin(np.abs(freqs - mid[m, 0])))] = 1.0
    return fb.T.copy()


class LogMel(nn.Module):
    """16 kHz mono PCM -> causal log-mel ``[B, M, n_mels]`` (``M = num_samples // hop``).

    Hann window of 400 samples zero-padded to n_fft 512, power spectrum, HTK mel filters,
    ``log(mel + 1e-6)``. Framing is causal (left zero-padding of ``win - hop`` samples, no centre
    padding), so frame ``k`` only sees samples ``< (k+1)*hop``. The DFT is an explicit matmul done in
    float64: the result of a frame then does not depend on how many frames were computed together,
    which keeps the streaming and offline paths equal.

    The arithmetic runs in numpy (:meth:`frames_np`), not torch: torch's float64 matmul goes to MKL
    on OpenMP threads that keep spinning for ~200 ms after each call, and the streaming front end
    calls this every 40 ms, so one core stayed busy for nothing and an ONNX Runtime step next to it
    ran ~2x slower on a 2-core CPU (measured). numpy's matmul of the same float64 operands gave the
    same float32 log-mel bit for bit on 1.2 M test values (speech, noise, silence; per 4-frame
    window and offline), and the framing, power, filterbank and log are the same operations.
    """

    def __init__(self, cfg):
        super().__init__()
        self.hop = cfg.mel_hop
        self.win = WIN_LENGTH
        self.n_mels = cfg.n_mels
        if self.win < self.hop:
            raise ValueError(f"window {self.win} shorter than hop {self.hop}")
        n = np.arange(self.win)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * n / self.win)        # periodic Hann
        k = np.arange(N_FFT // 2 + 1)
        # only the first `win` samples of the n_fft frame are non-zero, so the basis is [win, bins]
        ang = 2 * np.pi * np.outer(n, k) / N_FFT
        basis = np.concatenate([np.cos(ang), -np.sin(ang)], 1) * window[:, None]
        self.register_buffer("basis", torch.from_numpy(basis), persistent=False)
        fb = mel_filterbank(cfg.sample_rate, N_FFT, cfg.n_mels)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)
        # float64 numpy copies the arithmetic uses (a Module.to()/.float() leaves them untouched)
        self._basis_np, self._fb_np = basis, fb

    @property
    def left_context(self) -> int:
        """Samples before a frame's hop that the frame also reads (win - hop = 240)."""
        return self.win - self.hop

    def frames(self, padded: torch.Tensor) -> torch.Tensor:
        """Log-mel of an already left-padded signal ``[B, S]``: frame k reads ``padded[k*hop : k*hop+win]``."""
        if padded.dim() != 2:
            raise ValueError(f"expected [B, samples], got shape {tuple(padded.shape)}")
        return torch.from_numpy(self.frames_np(padded.detach().cpu().numpy())).to(padded.device)

    def frames_np(self, padded: np.ndarray) -> np.ndarray:
        """:meth:`frames` on a numpy ``[B, S]`` signal -> float32 ``[B, M, n_mels]`` (the arithmetic)."""
        if padded.ndim != 2:
            raise ValueError(f"expected [B, samples], got shape {tuple(padded.shape)}")
        m = (padded.shape[1] - self.win) // self.hop + 1
        if m <= 0:
            return np.zeros((padded.shape[0], 0, self.n_mels), np.float32)
        x = np.lib.stride_tricks.sliding_window_view(padded.astype(np.float64), self.win, axis=1)
        # contiguous copy: overlapping rows are not a BLAS operand, and numpy's fallback loop would
        # sum in another order
        x = np.ascontiguousarray(x[:, ::self.hop][:, :m])           # [B, M, win]
        spec = x @ self._basis_np                                     # [B, M, 2*bins]
        bins = spec.shape[-1] // 2
        re, im = spec[..., :bins], spec[..., bins:]
        mel = (re * re + im * im) @ self._fb_np
        return np.log(mel + LOG_EPS).astype(np.float32)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio`` float ``[S]`` or ``[B, S]`` in [-1, 1] -> ``[B, S // hop, n_mels]`` float32."""
        if audio.dim() == 1:
            audio = audio[None]
        return self.frames(F.pad(audio, (self.left_context, 0)))


class _DilatedBlock(nn.Module):
    """Residual block of valid (unpadded) convs: causality comes from cropping the residual's left."""

    def __init__(self, ch: int, dilation: int):
        super().__init__()
        self.crop = 2 * dilation
        self.conv = nn.Conv1d(ch, ch, 3, dilation=dilation)
        self.mix = nn.Conv1d(ch, ch, 1)

    def forward(self, h):
        return h[:, :, self.crop:] + self.mix(F.gelu(self.conv(h)))


class AudioEncoder(nn.Module):
    """Causal conv stack over log-mel giving ``A`` audio tokens of dim ``F`` per video frame.

    ``forward(mel [B, M, n_mels]) -> [B, T, A, F]`` with ``T = max(0, M // mpf - L)``; output frame
    ``t`` uses mel frames ``[(t+1+L)*mpf - R, (t+1+L)*mpf)`` (missing ones before 0 = silence).
    ``step(mel_window [B, R, n_mels]) -> [B, A, F]`` is the same computation for one frame on its
    fixed-size window (the ONNX per-frame graph; see :class:`AudioEncoderStep`).
    """

    def __init__(self, cfg, hidden: int | None = None, dilations=(1, 2, 4, 8, 16)):
        super().__init__()
        self.cfg = cfg
        self.mpf = cfg.mels_per_frame
        self.lookahead = cfg.lookahead_frames
        self.A, self.F = cfg.audio_tokens, cfg.audio_dim
        ch = hidden or max(cfg.audio_dim, 32)
        # fixed affine so typical speech log-mel (~[-14, 8]) enters the convs at unit scale
        self.mel_offset, self.mel_scale = -5.0, 5.0
        self.inp = nn.Conv1d(cfg.n_mels, ch, 3)
        self.blocks = nn.ModuleList(_DilatedBlock(ch, d) for d in dilations)
        conv_rf = 3 + sum(2 * d for d in dilations)
        #: mel frames one video frame's tokens depend on (conv field + the frame's own mpf outputs)
        self.receptive_field = conv_rf + self.mpf - 1
        self.out = nn.Linear(ch * self.mpf, self.A * self.F)
        self.norm = nn.LayerNorm(self.F)

    def _convs(self, mel):
        h = ((mel - self.mel_offset) / self.mel_scale).transpose(1, 2)
        h = F.gelu(self.inp(h))
        for b in self.blocks:
            h = b(h)
        return h                                                       # [B, C, len - R + mpf]

    def _head(self, h):                                                # [B, ..., C*mpf]
        y = self.out(h)
        return self.norm(y.reshape(*y.shape[:-1], self.A, self.F))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[-1] != self.cfg.n_mels:
            raise ValueError(f"expected mel [B, M, {self.cfg.n_mels}], got {tuple(mel.shape)}")
        B, M, _ = mel.shape
        T = max(0, M // self.mpf - self.lookahead)
        if T == 0:
            return mel.new_zeros(B, 0, self.A, self.F)
        used = (T + self.lookahead) * self.mpf
        pad = mel.new_full((B, self.receptive_field - self.mpf, mel.shape[2]), SILENCE_LOG_MEL)
        h = self._convs(torch.cat([pad, mel[:, :used]], 1))            # index i <-> mel frame i
        return self.frame_tokens(h[:, :, self.lookahead * self.mpf:used])

    def frame_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Conv outputs ``h [B, C, T * mpf]`` (``mpf`` per video frame, in order) -> audio tokens
        ``[B, T, A, F]``: each frame's ``mpf`` outputs packed channel-major, as :meth:`step` does."""
        B, C, M = h.shape
        h = h.reshape(B, C, M // self.mpf, self.mpf).permute(0, 2, 1, 3).reshape(B, M // self.mpf, -1)
        return self._head(h)

    def step(self, mel_window: torch.Tensor) -> torch.Tensor:
        """One video frame: ``mel_window [B, R, n_mels]`` (its last mel frame is the frame's
        ``(t+1+L)*mpf - 1``) -> ``[B, A, F]``."""
        if mel_window.dim() != 3 or mel_window.shape[1] != self.receptive_field:
            raise ValueError(f"expected mel window [B, {self.receptive_field}, {self.cfg.n_mels}], "
                             f"got {tuple(mel_window.shape)}")
        h = self._convs(mel_window)                                    # [B, C, mpf]
        return self._head(h.reshape(h.shape[0], -1))


class AudioEncoderStep(nn.Module):
    """Export wrapper: ``forward(mel_window [B, R, n_mels]) -> audio [B, A, F]``."""

    def __init__(self, encoder: AudioEncoder):
        super().__init__()
        self.encoder = encoder
        self.eval()   # export graphs are inference graphs (puts ``encoder`` in eval mode too)

    def forward(self, mel_window):
        return self.encoder.step(mel_window)


class StreamingAudioFrontend:
    """PCM chunks of any length -> audio tokens per video frame, as soon as they are computable.

    ``encoder`` is an :class:`AudioEncoder` or any callable mapping a float32 numpy window
    ``[1, R, n_mels]`` to ``[1, A, F]`` (e.g. an ONNX Runtime session wrapped in a lambda), plus the
    keyword ``receptive_field`` when it is not an ``AudioEncoder``.

    State: < 640 pending samples, the 240-sample tail the next mel frames overlap, and the last ``R``
    mel frames. Every video frame is computed alone on a fixed-shape window, so the output does not
    depend on how the audio was chunked (bit-identical across chunkings).
    """

    def __init__(self, cfg, encoder, receptive_field: int | None = None):
        self.cfg = cfg
        self.logmel = LogMel(cfg)
        if isinstance(encoder, AudioEncoder):
            self.R = encoder.receptive_field
            enc = encoder.eval()

            def run(w):
                with torch.no_grad():
                    return enc.step(torch.from_numpy(w)).numpy()
            self._run = run
        else:
            if receptive_field is None:
                raise ValueError("receptive_field is required when encoder is not an AudioEncoder")
            self.R, self._run = int(receptive_field), encoder
        self.spf = cfg.samples_per_frame
        self.mpf = cfg.mels_per_frame
        self.L = cfg.lookahead_frames
        self.reset()

    def reset(self) -> None:
        """Forget all audio: the next push starts a new stream at sample 0."""
        ctx = self.logmel.left_context
        self._tail = np.zeros(ctx, np.float32)
        self._pending = np.zeros(0, np.float32)
        self._mel = np.full((self.R, self.cfg.n_mels), SILENCE_LOG_MEL, np.float32)
        self._groups = 0          # video frames whose mel frames are computed
        self._emitted = 0
        self._total = 0

    @property
    def frames_available(self) -> int:
        """Video frames whose audio tokens have been computed (and returned) so far."""
        return self._emitted

    @property
    def total_samples(self) -> int:
        return self._total

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.cfg.audio_tokens, self.cfg.audio_dim), np.float32)

    def push(self, pcm) -> np.ndarray:
        """Append PCM (1-D float in [-1, 1] or int16, 16 kHz) -> ``[k, A, F]`` for the k new frames."""
        pcm = np.asarray(pcm)
        if pcm.ndim != 1:
            raise ValueError(f"expected 1-D mono PCM, got shape {pcm.shape}")
        if pcm.dtype == np.int16:
            pcm = pcm.astype(np.float32) / 32768.0
        elif not np.issubdtype(pcm.dtype, np.floating):
            raise TypeError(f"PCM must be float or int16, got {pcm.dtype}")
        self._total += pcm.size
        self._pending = np.concatenate([self._pending, pcm.astype(np.float32, copy=False)])
        out = []
        while self._pending.size >= self.spf:
            seg = np.concatenate([self._tail, self._pending[:self.spf]])
            self._pending = self._pending[self.spf:]
            self._tail = seg[-self._tail.size:]
            mel = self.logmel.frames_np(seg[None])[0]                          # [mpf, n_mels]
            self._mel = np.concatenate([self._mel[self.mpf:], mel])
            self._groups += 1
            if self._groups > self.L:
                out.append(np.asarray(self._run(self._mel[None]), np.float32)[0])
                self._emitted += 1
        return np.stack(out) if out else self._empty()

    def flush(self) -> np.ndarray:
        """End of stream: pad with silence so ``ceil(total_samples / 640)`` frames have been
        returned in all, return the remaining ones, then :meth:`reset`."""
        want = -(-self._total // self.spf)
        # zeros up to the end of the lookahead of frame want-1: exactly the frames still missing
        need = (want + self.L) * self.spf - self._total
        out = self.push(np.zeros(need, np.float32)) if want else self._empty()
        if self._emitted != want:  # invariant of the alignment above, not a user error
            raise RuntimeError(f"flush produced {self._emitted} frames, expected {want}")
        self.reset()
        return out
