"""Visual tokenizer: a reference-conditioned VQ autoencoder (VQ-VAE-lite, no GAN).

``encode`` turns a frame into ``N = token_grid**2`` codebook indices. ``decode`` turns indices back
into a frame *given the session's portrait*: a small reference encoder runs once per session and
returns one tensor ``ref [B, Cr + 48, S/4, S/4]`` (learned features + the portrait itself packed by
space-to-depth), from which ``decode`` derives its coarser scales by average pooling. Identity and
background detail therefore come from the portrait; the tokens only need to carry what changes.
The decoder's output blends a generated image with the portrait through a predicted per-pixel mask.

Graphs for export (fixed contract, dynamic batch; the wrappers put the model in eval mode): :class:`TokenizerEncode`
``images float [B,3,S,S] -> tokens int64 [B,N]``, :class:`TokenizerReference`
``portrait float [B,3,S,S] -> ref``, :class:`TokenizerDecode` ``(codes float [B,N,d], ref) -> images
[B,3,S,S]``. The decode graph takes each cell's code as its normalised FSQ digits (``code_table``),
not its index, so that the runtime can decode the expected code under the transformer's
distribution as well as a chosen token (``runtime/soft_decode.py``).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from eartalk.model.config import EMOTIONS
from eartalk.model.face_state import EMOTION_COLS, STATE_DIM
from eartalk.model import schedule
from eartalk.model.precision import resolve_bf16, train_autocast

SUBPIX = 4          # ref and decoder head work at S/4 and unpack 4x4 pixels per cell
PIX_CH = 3 * SUBPIX * SUBPIX


def _to_float01(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1], checking the layout."""
    if not torch.is_tensor(images):
        images = torch.as_tensor(np.asarray(images))
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def _norm(ch: int) -> nn.GroupNorm:
    """GroupNorm keeps activations at unit scale; without it Adam drives the output sigmoids into
    saturation within a few hundred steps and training stalls (exports as InstanceNormalization)."""
    return nn.GroupNorm(min(8, ch // 4), ch)


class ResBlock(nn.Module):
    """Pre-norm conv residual block; the last conv starts at zero so each block starts as identity."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x):
        return x + self.c2(F.silu(self.c1(F.silu(self.norm(x)))))


def fsq_levels(codebook_size: int) -> tuple[int, ...]:
    """Split a power-of-two codebook into FSQ levels of at most 8: 512 -> (8, 8, 8), 16 -> (4, 4)."""
    bits = int(codebook_size).bit_length() - 1
    if codebook_size < 4 or 1 << bits != codebook_size:
        raise ValueError(f"codebook_size must be a power of two >= 4, got {codebook_size}")
    n = -(-bits // 3)
    return tuple(1 << (bits // n + (i < bits % n)) for i in range(n))


def fsq_digits(codes: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Code indices ``[...]`` -> FSQ digits ``[..., len(levels)]``: the mixed-radix number, first
    digit least significant (the tokenizer's code = d0 + L0 d1 + L0 L1 d2 ...)."""
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], device=codes.device)
    return (codes.unsqueeze(-1) // basis) % torch.tensor(levels, device=codes.device)


def cells_to_grid(codes: torch.Tensor, grid: int) -> torch.Tensor:
    """Per-cell codes ``[B, N, d]`` (row-major cells) -> the decoder's grid ``[B, d, g, g]``."""
    return codes.transpose(1, 2).reshape(codes.shape[0], codes.shape[2], grid, grid)


def code_table(codebook_size: int) -> torch.Tensor:
    """float32 ``[V, d]``: each code's normalised FSQ digits in ``[-1, 1]``, what the decoder reads
    for that token (``VQTokenizer.decode`` is ``decode_codes`` of these rows)."""
    levels = fsq_levels(codebook_size)
    digits = fsq_digits(torch.arange(codebook_size), levels).float()
    return digits / (torch.tensor(levels, dtype=torch.float32) - 1) * 2 - 1


class FSQ(nn.Module):
    """Finite scalar quantisation (Mentzer et al., 2023): each of ``d`` channels is squashed to
    ``[0, L_i - 1]`` and rounded, with a straight-through gradient; the code index is the mixed-radix
    number of the rounded digits. No learned codebook, no auxiliary loss, no warm-up switch:
    quantisation is on from the first step (a learned VQ codebook lost its progress when it was
    switched on after a continuous warm-up). The latents can still collapse onto a few codes when
    a loss term pulls them together (the pair term at 0.05, session 26): ``train_tokenizer`` checks
    for it. ``usage`` is an EMA of code frequencies, for reports.
    """

    def __init__(self, codebook_size: int, usage_decay: float = 0.99):
        super().__init__()
        self.levels = fsq_levels(codebook_size)
        self.dim = len(self.levels)
        self.usage_decay = usage_decay
        lv = torch.tensor(self.levels, dtype=torch.long)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0),
                             persistent=False)
        self.register_buffer("usage", torch.full((codebook_size,), 1.0 / codebook_size))
        self.register_buffer("_table", code_table(codebook_size), persistent=False)   # [V, d], for lookup

    def _bounded(self, z):
        return torch.sigmoid(z) * (self._levels.view(1, -1, 1, 1) - 1).to(z.dtype)

    def _normalise(self, digits):
        """Digits ``[0, L-1]`` -> ``[-1, 1]`` per channel, what the decoder sees."""
        return digits / (self._levels.view(1, -1, 1, 1) - 1).to(digits.dtype) * 2 - 1

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, d, g, g]`` -> code index per cell ``[B, g*g]`` int64 (row-major)."""
        digits = torch.round(self._bounded(z)).long()
        return (digits * self._basis.view(1, -1, 1, 1)).sum(1).flatten(1)

    def lookup(self, idx: torch.Tensor, grid: int) -> torch.Tensor:
        """``[B, N]`` indices -> normalised codes ``[B, d, g, g]``."""
        return cells_to_grid(self._table[idx], grid)

    def forward(self, z: torch.Tensor):
        """-> (normalised quantised codes with straight-through gradient, indices ``[B, N]``)."""
        b = self._bounded(z)
        q = b + (torch.round(b) - b).detach()
        idx = (torch.round(b).detach().long() * self._basis.view(1, -1, 1, 1)).sum(1).flatten(1)
        if self.training:
            counts = torch.bincount(idx.flatten(), minlength=self.usage.numel()).float()
            self.usage.mul_(self.usage_decay).add_(counts / counts.sum(), alpha=1 - self.usage_decay)
        return self._normalise(q), idx


class VQTokenizer(nn.Module):
    """Portrait-relative tokenizer for ``cfg.image_size`` frames, ``cfg.token_grid``² FSQ tokens.

    The encoder sees the frame *and* the session's portrait, so a token says how its cell departs
    from the portrait (where the content moved from, the mouth and eyelids) rather than repeating
    the identity: the transformer then predicts motion codes that mean the same for every face.
    The portrait's own tokens (the sink frame) are ``encode(portrait)`` against itself.

    The decoder warps the portrait (``cfg.warp``): a coarse flow at the token grid aligns the
    portrait's features before they are fused at each scale, a fine flow at S/4 (bilinearly
    upsampled) warps the portrait pixels, and a per-pixel mask blends the warped portrait with
    generated colour (mouth interior, eyelids, disocclusions). With ``cfg.warp`` False the portrait
    is fused and blended unwarped, so head motion is painted by the decoder like everything else:
    measured better per step on the corpus (config.ModelConfig.warp); an earlier conv decoder
    without the portrait's features at every scale had stayed below 21 dB PSNR.

    Public API: :meth:`encode`, :meth:`reference`, :meth:`decode`, :meth:`decode_codes`,
    :meth:`reconstruct`, :meth:`forward`, :meth:`loss`, :meth:`codebook_usage`. Images are RGB
    ``[B, 3, S, S]``, float in [0, 1] or uint8.
    """

    def __init__(self, cfg, width: int = 32, ref_channels: int = 32, max_width: int = 128,
                 attn_dim: int = 64, state_hidden: int = 256, frame_hidden: int = 256):
        super().__init__()
        S, g = cfg.image_size, cfg.token_grid
        f = S // g
        if S % g or f < SUBPIX or f & (f - 1):
            raise ValueError(f"image_size/token_grid = {S}/{g} must be a power of two >= {SUBPIX}")
        self.cfg = cfg
        self.S, self.g = S, g
        self.n_scale = int(math.log2(f // SUBPIX))           # stride-2 stages between S/4 and g
        self.ref_channels = ref_channels
        widths = [min(width * 2 ** i, max_width) for i in range(self.n_scale + 1)]  # S/4 ... g

        # encoder: frame and portrait side by side, space-to-depth, conv stages to the token grid
        enc = [nn.PixelUnshuffle(SUBPIX), nn.Conv2d(2 * PIX_CH, widths[0], 3, padding=1), nn.SiLU(),
               ResBlock(widths[0])]
        for i in range(1, self.n_scale + 1):
            enc += [nn.Conv2d(widths[i - 1], widths[i], 3, stride=2, padding=1), nn.SiLU(),
                    ResBlock(widths[i])]
        self.quant = FSQ(cfg.codebook_size)
        enc += [ResBlock(widths[-1]), _norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], self.quant.dim, 1)]
        self.encoder = nn.Sequential(*enc)
        # frame codes (cfg.frame_codes = k): the last k cells' latents come from the whole feature
        # map; the decoder adds them to every scale; in training they name the emotion (loss()).
        self.k = k = cfg.frame_codes
        if k:
            # a normalised bottleneck: a plain linear over all g*g*width features saturated FSQ's
            # sigmoid within a few hundred Adam steps (fan-in 8,192: every weight moves at once),
            # leaving every frame the same code; the grid's own head is a 1x1 conv after a norm.
            self.frame_head = nn.Sequential(nn.Linear(widths[-1] * g * g, frame_hidden),
                                            nn.LayerNorm(frame_hidden), nn.SiLU(),
                                            nn.Linear(frame_hidden, self.quant.dim * k))
            self.frame_in = nn.ModuleList(nn.Linear(self.quant.dim * k, widths[self.n_scale - s])
                                          for s in range(self.n_scale + 1))
            self.frame_emotion = nn.Linear(self.quant.dim * k, len(EMOTIONS))   # training only
        # training only: the face state (eartalk.model.face_state) -> every cell's bounded latent.
        # It depends on the state alone, not the portrait, so tying the codes to it makes them mean
        # the same motion for every face (see loss(state=...)).
        self.state_head = nn.Sequential(nn.Linear(STATE_DIM, state_hidden), nn.SiLU(),
                                        nn.Linear(state_hidden, state_hidden), nn.SiLU(),
                                        nn.Linear(state_hidden, self.quant.dim * g * g))

        # reference encoder: features at S/4; the packed portrait is appended by reference()
        self.ref_encoder = nn.Sequential(
            nn.PixelUnshuffle(SUBPIX), nn.Conv2d(PIX_CH, widths[0], 3, padding=1), nn.SiLU(),
            ResBlock(widths[0]), nn.Conv2d(widths[0], ref_channels, 3, padding=1))
        ref_in = ref_channels + PIX_CH

        # decoder: token grid -> S/4, fusing the (warped) reference at every scale, coarse first
        top = widths[-1]
        self.dec_in = nn.Sequential(nn.Conv2d(self.quant.dim, top, 1), ResBlock(top))
        self.attn_q = nn.Conv2d(top, attn_dim, 1)
        self.attn_kv = nn.Conv2d(ref_in, 2 * attn_dim, 1)
        self.attn_out = nn.Conv2d(attn_dim, top, 1)
        self.dec_top = ResBlock(top)
        self.warp = cfg.warp
        if self.warp:
            self.coarse_flow = nn.Conv2d(top, 2, 3, padding=1)
        # scale s = 0 is the token grid, s = n_scale is S/4 (same order as the pyramid below)
        self.ref_proj = nn.ModuleList(nn.Conv2d(ref_in, widths[self.n_scale - s] // 2, 1)
                                      for s in range(self.n_scale + 1))
        self.fuse_norm = nn.ModuleList(_norm(widths[self.n_scale - s]) for s in range(self.n_scale + 1))
        self.fuse = nn.ModuleList()
        self.refine = nn.ModuleList()
        self.up = nn.ModuleList()
        for s in range(self.n_scale + 1):
            w = widths[self.n_scale - s]
            self.fuse.append(nn.Conv2d(w + w // 2, w, 3, padding=1))
            self.refine.append(ResBlock(w))
            if s < self.n_scale:   # pixel-shuffle upsampling: a 1x1 conv is all it costs
                self.up.append(nn.Sequential(nn.Conv2d(w, 4 * widths[self.n_scale - s - 1], 1),
                                             nn.PixelShuffle(2)))
        # heads at S/4: fine flow (2) and, per cell, 16 sub-pixels x (RGB + blend mask)
        self.head_norm = _norm(widths[0])
        if self.warp:
            self.fine_flow = nn.Conv2d(widths[0], 2, 3, padding=1)
        self.head = nn.Conv2d(widths[0], SUBPIX * SUBPIX * 4, 1)
        # tail (cfg.pixel_tail): blend, portrait, colour and mask (10 channels) -> an RGB correction,
        # at S/2 with 2x2 pixels packed per position: full-resolution convs of so few channels cost
        # 2.5x as much time per MAC on a CPU
        t = cfg.pixel_tail
        self.tail = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(10 * 4, t, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(t, t, 3, padding=1), nn.SiLU(), nn.Conv2d(t, 3 * 4, 3, padding=1),
                                  nn.PixelShuffle(2)) if t else None
        with torch.no_grad():  # start as the unwarped portrait (mask ~0.95): learn only departures
            for conv in (self.coarse_flow, self.fine_flow) if self.warp else ():
                conv.weight.zero_()
                conv.bias.zero_()
            self.head.bias.view(4, SUBPIX * SUBPIX)[3].fill_(3.0)
            if self.tail is not None:       # no correction yet: the decoder's own blend
                self.tail[-2].weight.zero_()
                self.tail[-2].bias.zero_()
            # the state head starts at the middle level of every digit
            mid = (torch.tensor(self.quant.levels, dtype=torch.float32) - 1) / 2
            self.state_head[-1].bias.copy_(mid.view(-1, 1).expand(-1, g * g).reshape(-1))

    # ------------------------------------------------------------------ public API
    @property
    def tokens_per_frame(self) -> int:
        return self.g * self.g

    def encode(self, images, portrait=None) -> torch.Tensor:
        """images uint8 or float ``[B, 3, S, S]`` -> tokens int64 ``[B, N]`` (row-major grid),
        relative to ``portrait`` (same shape; default: the images themselves, the sink frame)."""
        return self.quant.indices(self._encode(images, portrait))

    @torch.no_grad()
    def encode_clip(self, frames, portrait, batch: int = 128) -> torch.Tensor:
        """A clip's frames uint8 or float ``[T, 3, S, S]`` against its one ``portrait`` ``[1, 3, S, S]``
        -> tokens int64 ``[T, N]``: :meth:`encode` with the portrait repeated, in less time (the
        recipe tokenizes 170,000 corpus frames: 9.4 -> 7.0 minutes on a 2-core EPYC, loading
        included). Why: the portrait enters the encoder only in its first convolution, whose
        portrait half is computed here once, not once per frame; the rest runs channels-last, about a
        fifth faster on CPU (its weights are put back after). The codes are encode's up to float
        rounding."""
        p = self._check_size(_to_float01(portrait))
        if p.shape[0] != 1:
            raise ValueError(f"encode_clip: expected one portrait [1, 3, S, S], got {tuple(p.shape)}")
        unpack, conv = self.encoder[0], self.encoder[1]
        half = conv.in_channels // 2           # the frame's channels come first, then the portrait's
        w = conv.weight
        p_half = F.conv2d(unpack(p * 2 - 1), w[:, half:], conv.bias, conv.stride, conv.padding)
        rest = self.encoder[2:-1]
        rest.to(memory_format=torch.channels_last)
        try:
            out = []
            for x in torch.as_tensor(frames).split(batch) if len(frames) else ():
                x = self._check_size(_to_float01(x))
                h = F.conv2d(unpack(x * 2 - 1), w[:, :half], None, conv.stride, conv.padding) + p_half
                out.append(self.quant.indices(self._latents(rest(h.contiguous(memory_format=torch.channels_last)))))
        finally:
            rest.to(memory_format=torch.contiguous_format)
        return torch.cat(out) if out else torch.zeros(0, self.tokens_per_frame, dtype=torch.int64)

    def reference(self, portrait) -> torch.Tensor:
        """portrait ``[B, 3, S, S]`` -> ``ref [B, Cr + 48, S/4, S/4]``; compute once per session."""
        p = self._check_size(_to_float01(portrait))
        return torch.cat([self.ref_encoder(p * 2 - 1), F.pixel_unshuffle(p, SUBPIX)], 1)

    def decode(self, tokens: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """tokens int64 ``[B, N]`` + ``ref`` from :meth:`reference` -> images float ``[B,3,S,S]`` in [0, 1]."""
        if tokens.dim() != 2 or tokens.shape[1] != self.tokens_per_frame:
            raise ValueError(f"expected tokens [B, {self.tokens_per_frame}], got {tuple(tokens.shape)}")
        return self._decode(self.quant.lookup(tokens, self.g), ref)

    def decode_codes(self, codes: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """codes float ``[B, N, d]`` (rows of :func:`code_table`, or any point between them, such as
        the expected code under a distribution over tokens) + ``ref`` -> images float ``[B,3,S,S]``."""
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (self.tokens_per_frame, self.quant.dim):
            raise ValueError(f"expected codes [B, {self.tokens_per_frame}, {self.quant.dim}], "
                             f"got {tuple(codes.shape)}")
        return self._decode(cells_to_grid(codes.float(), self.g), ref)

    def reconstruct(self, images, portrait) -> torch.Tensor:
        """images ``[B, 3, S, S]`` through the code book against ``portrait`` (same shape) ->
        float ``[B, 3, S, S]`` in [0, 1]: what the GPT's best tokens could show at best."""
        return self.decode(self.encode(images, portrait), self.reference(portrait))

    def forward(self, images, portrait):
        """Training pass -> ``(recon [B,3,S,S], tokens [B,N])``."""
        q, idx = self.quant(self._encode(images, portrait))
        return self._decode(q, self.reference(portrait)), idx

    def loss(self, images, portrait, grad_weight: float = 0.5, change_weight: float = 1.0,
             pyramid_weight: float = 1.0, pair_weight: float = 0.0, state=None,
             state_weight: float | None = 0.0, expr=None, expr_weight: float = 0.0,
             emotion_weight: float = 0.0, critic=None, critic_weight: float = 0.0, mix=None) -> dict:
        """Weighted L1 + L1 of image gradients (edges: lips, eyelids) + L1 of 2x/4x/8x average-pooled
        images (a wide basin for the flow: a misplaced edge still shows at coarse scales).

        Pixels are weighted by ``1 + change_weight * |frame - portrait| / mean|frame - portrait|``:
        what differs from the portrait (mouth, eyes, pose) is exactly what the tokens must carry.
        ``expr`` ``[B, S, S]`` (uint8, 255 = fully expression, or float in [0, 1]): where each frame
        shows its expression (:mod:`eartalk.data.expression_map`); those pixels gain
        ``expr_weight * expr`` in the L1 and gradient terms (a zero map: no change).
        ``loss`` is the total to backpropagate; ``l1`` (unweighted), ``grad``, ``pyr`` its parts;
        ``psnr`` for logging (no gradient).

        ``pair_weight > 0``: the batch is ``[frames t ; frames t+1]`` of the same clips (first half,
        second half) and ``pair`` = mean |latent_t - latent_t+1| in quantisation steps joins the
        loss. Why: with reconstruction alone a sub-pixel head movement moves every latent a little,
        so codes near a quantisation boundary flip from frame to frame (2026-12-03 run: 21% of
        tokens changed per frame, 11% between nearly still frames); the transformer then finds
        copying the previous frame's tokens loss-optimal and never animates. The L1 term lets a
        latent move only where the reconstruction pays for it.

        ``state`` ``[B, STATE_DIM]`` (NaN rows where unknown): with ``state_weight`` not None the
        state head fits it and the latents are pulled to the head's prediction by ``state_weight``.
        With frame codes and ``emotion_weight > 0``, a linear head reads the frame's emotion from its
        quantised frame codes (``emotion`` = cross-entropy, joined to the loss): a training-only
        signal that keeps the frame codes about the expression, which the pixel loss alone spent
        elsewhere.

        ``critic`` (an :class:`eartalk.model.expression_critic.ExpressionCritic`) with
        ``critic_weight > 0``: ``critic`` = the distance between its features of the decoded and the
        true frame joins the loss, so the decoder draws what names the expression.

        ``mix`` ``(rows, others, share)``: the codes of batch rows ``rows`` ``[R]`` move to those of
        ``others`` ``[R, 3, S, S]`` (encoded against the same portraits, no gradient) by ``share``
        ``[R, g*g]`` in [0, 1] per cell, and must still decode to the rows' own frames. Why: the
        transformer's codes of a pinned shut eye are the shut frame's in some eye cells and the open
        one's in others (or a blend of them, decoded as expected codes); a decoder that has only seen
        whole frames' codes drew such mixtures open.
        """
        x = _to_float01(images)
        p = _to_float01(portrait)
        z = self._encode(x, p).float()
        with torch.autocast("cpu", enabled=False):   # FSQ rounds in float32 under a bf16 autocast
            q, _ = self.quant(z)
        if mix is not None:
            q = self._mixed_codes(q, p, *mix)
        recon = self._decode(q, self.reference(p)).float()
        diff = (x - p).abs().mean(1, keepdim=True)
        w = 1 + change_weight * diff / (diff.mean() + 1e-3)
        wg = torch.ones_like(diff)       # the gradient term's weight (1 without expression maps)
        if expr is not None and expr_weight > 0:
            e = torch.as_tensor(expr)
            if tuple(e.shape) != (len(x), self.S, self.S):
                raise ValueError(f"expr has shape {tuple(e.shape)}; expected [{len(x)}, {self.S}, {self.S}]")
            e = (e.float() / 255 if e.dtype == torch.uint8 else e.float()).unsqueeze(1)
            w = w + expr_weight * e
            wg = wg + expr_weight * e
        err = (recon - x).abs()
        wl1 = (w * err).mean() / w.mean()
        g = lambda t: (t[..., 1:, :] - t[..., :-1, :], t[..., :, 1:] - t[..., :, :-1])  # noqa: E731
        (ry, rx), (xy, xx) = g(recon), g(x)
        gy, gx = wg[..., 1:, :], wg[..., :, 1:]
        grad = (gy * (ry - xy).abs()).mean() / gy.mean() + (gx * (rx - xx).abs()).mean() / gx.mean()
        pyr = sum((F.avg_pool2d(recon, k) - F.avg_pool2d(x, k)).abs().mean() for k in (2, 4, 8))
        with torch.no_grad():
            psnr = -10 * torch.log10(F.mse_loss(recon, x).clamp_min(1e-10))
        total = wl1 + grad_weight * grad + pyramid_weight * pyr
        out = {"l1": err.mean().detach(), "grad": grad, "pyr": pyr, "psnr": psnr}
        if critic is not None and critic_weight > 0:
            with torch.autocast("cpu", enabled=False):
                out["critic"] = critic.distance(recon, x)
            total = total + critic_weight * out["critic"]
        if pair_weight > 0:
            if len(x) % 2:
                raise ValueError(f"pair_weight needs a batch of [frames t ; frames t+1], got an odd batch of {len(x)}")
            b = self.quant._bounded(z)
            out["pair"] = (b[: len(b) // 2] - b[len(b) // 2:]).abs().mean()
            total = total + pair_weight * out["pair"]
        st = None
        if state is not None:
            st = torch.as_tensor(state, dtype=torch.float32)
            if st.shape != (len(x), STATE_DIM):
                raise ValueError(f"state has shape {tuple(st.shape)}; expected [{len(x)}, {STATE_DIM}]")
            known = ~torch.isnan(st).any(1)
        if self.k and emotion_weight > 0 and st is not None and known.any():
            target = st[known, EMOTION_COLS].argmax(1)
            logits = self.frame_emotion(self._split_frame_codes(q)[1][known].float())
            out["emotion"] = F.cross_entropy(logits, target)
            with torch.no_grad():
                out["emotion_acc"] = (logits.argmax(1) == target).float().mean()
            total = total + emotion_weight * out["emotion"]
        if st is not None and state_weight is not None:   # the head fits even while the pull is 0
            if known.any():
                b = self.quant._bounded(z)[known]
                pred = self.predict_latent(st[known])
                out["state_fit"] = (pred - b.detach()).abs().mean()
                out["state"] = (b - pred.detach()).abs().mean()
                with torch.no_grad():
                    out["state_acc"] = (self._digits(pred) == torch.round(b)).all(1).float().mean()
                total = total + out["state_fit"] + state_weight * out["state"]
        out["loss"] = total
        return out

    def _mixed_codes(self, q, portrait, rows, others, share):
        """``q`` with rows ``rows`` moved toward the codes of ``others`` by ``share`` per cell (see
        :meth:`loss`)."""
        rows, share = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(share, dtype=torch.float32)
        if rows.dim() != 1 or len(others) != len(rows) or tuple(share.shape) != (len(rows), self.tokens_per_frame):
            raise ValueError(f"mix: {len(rows)} rows, {len(others)} other frames, share {tuple(share.shape)}; expected "
                             f"one frame and [{self.tokens_per_frame}] shares per row")
        if len(rows) == 0:
            return q
        with torch.no_grad(), torch.autocast("cpu", enabled=False):   # the encoder is not trained by the mix
            other = self.quant.lookup(self.encode(others, portrait[rows]), self.g)   # the twins' tokens' codes
        a = share.view(len(rows), 1, self.g, self.g)
        return q.index_add(0, rows, a * (other - q[rows]))

    def predict_latent(self, state: torch.Tensor) -> torch.Tensor:
        """``state [B, STATE_DIM]`` -> the bounded latent ``[B, d, g, g]`` (in ``[0, L-1]`` per digit)
        that :meth:`loss` ties the encoder's to."""
        return self.state_head(state).view(len(state), self.quant.dim, self.g, self.g)

    def state_tokens(self, state: torch.Tensor) -> torch.Tensor:
        """``state [B, STATE_DIM]`` -> the tokens ``[B, N]`` the state head predicts (diagnostics)."""
        digits = self._digits(self.predict_latent(state)).long()
        return (digits * self.quant._basis.view(1, -1, 1, 1)).sum(1).flatten(1)

    def _digits(self, latent: torch.Tensor) -> torch.Tensor:
        """A predicted bounded latent ``[B, d, g, g]`` -> its FSQ digits (clamped to each digit's
        levels, rounded; float): the state head's output is not squashed like the encoder's."""
        lv = (self.quant._levels.view(1, -1, 1, 1) - 1).to(latent.dtype)
        return torch.round(latent.clamp(0, None).minimum(lv))

    def codebook_usage(self) -> dict:
        """From the training-time usage EMA: ``used`` codes (usage above a tenth of uniform),
        ``fraction`` of the codebook, and ``perplexity`` (effective number of codes)."""
        u = self.quant.usage / self.quant.usage.sum().clamp_min(1e-12)
        used = int((u >= 0.1 / u.numel()).sum())
        ent = -(u * torch.log(u.clamp_min(1e-12))).sum()
        return {"used": used, "fraction": used / u.numel(), "perplexity": float(torch.exp(ent))}

    # ------------------------------------------------------------------ internals
    def _check_size(self, x):
        if x.shape[-2:] != (self.S, self.S):
            raise ValueError(f"expected {self.S}x{self.S} images, got {tuple(x.shape[-2:])}")
        return x

    def _encode(self, images, portrait):
        x = self._check_size(_to_float01(images))
        p = x if portrait is None else self._check_size(_to_float01(portrait))
        if p.shape != x.shape:
            raise ValueError(f"portrait {tuple(p.shape)} must match images {tuple(x.shape)}")
        return self._latents(self.encoder[:-1](torch.cat([x, p], 1) * 2 - 1))

    def _latents(self, feat):
        """The encoder's last features ``[B, C, g, g]`` -> latents ``[B, d, g, g]``."""
        z = self.encoder[-1](feat)
        if self.k:      # the last k cells: one latent each for the whole frame
            B, d, g, _ = z.shape
            frame = self.frame_head(feat.flatten(1)).view(B, d, self.k)
            z = torch.cat([z.flatten(2)[:, :, :-self.k], frame], 2).view(B, d, g, g)
        return z

    def _split_frame_codes(self, q):
        """Normalised codes ``[B, d, g, g]`` -> (the grid with the frame-code cells at 0, the frame
        codes ``[B, d * k]``); ``(q, None)`` without frame codes."""
        if not self.k:
            return q, None
        flat = q.flatten(2)
        frame = flat[:, :, -self.k:]
        grid = torch.cat([flat[:, :, :-self.k], torch.zeros_like(frame)], 2).view_as(q)
        return grid, frame.flatten(1)

    @staticmethod
    def _warp(x, flow):
        """Sample ``x`` at (identity + flow); flow ``[B, 2, h, w]`` in normalised units, resized."""
        B, _, H, W = x.shape
        if flow.shape[-2:] != (H, W):
            flow = F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False)
        ys = torch.linspace(-1 + 1 / H, 1 - 1 / H, H, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1 + 1 / W, 1 - 1 / W, W, device=x.device, dtype=x.dtype)
        base = torch.stack([xs.view(1, W).expand(H, W), ys.view(H, 1).expand(H, W)], -1)
        grid = base.unsqueeze(0) + flow.permute(0, 2, 3, 1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _decode(self, q, ref):
        exp = (ref.shape[1], self.S // SUBPIX, self.S // SUBPIX)
        if ref.dim() != 4 or tuple(ref.shape[1:]) != exp:
            raise ValueError(f"expected ref [B, {exp[0]}, {exp[1]}, {exp[2]}] from reference(), "
                             f"got {tuple(ref.shape)}")
        q, frame = self._split_frame_codes(q)
        h = self.dec_in(q)
        if frame is not None:
            h = h + self.frame_in[0](frame)[:, :, None, None]
        # coarse cross-attention: each token cell may fetch portrait content from anywhere
        B, _, g, _ = h.shape
        coarse_ref = F.avg_pool2d(ref, 2 ** self.n_scale)
        qa = self.attn_q(h).flatten(2)                                  # [B, d, g*g]
        k, v = self.attn_kv(coarse_ref).flatten(2).chunk(2, dim=1)      # [B, d, g*g] each
        att = torch.softmax(qa.transpose(1, 2) @ k / math.sqrt(qa.shape[1]), dim=-1)
        h = h + self.attn_out((v @ att.transpose(1, 2)).reshape(B, -1, g, g))
        h = self.dec_top(h)
        # reference pyramid (aligned to this frame by the coarse flow when warping); s = 0 is the token grid
        flow = self.coarse_flow(h) if self.warp else None
        pyr = [self._warp(ref, flow) if self.warp else ref]
        for _ in range(self.n_scale):
            pyr.insert(0, F.avg_pool2d(pyr[0], 2))
        for s in range(self.n_scale + 1):
            h = h + self.fuse[s](torch.cat([F.silu(self.fuse_norm[s](h)), self.ref_proj[s](pyr[s])], 1))
            h = self.refine[s](h)
            if frame is not None and s:
                h = h + self.frame_in[s](frame)[:, :, None, None]
            if s < self.n_scale:
                h = self.up[s](F.silu(h))
        h = F.silu(self.head_norm(h))
        out = F.pixel_shuffle(self.head(h), SUBPIX)                    # [B, 4, S, S]
        rgb, mask = torch.sigmoid(out[:, :3]), torch.sigmoid(out[:, 3:])
        portrait = F.pixel_shuffle(ref[:, self.ref_channels:], SUBPIX)
        if self.warp:
            flow = F.interpolate(flow, size=h.shape[-2:], mode="bilinear", align_corners=False) + self.fine_flow(h)
            portrait = self._warp(portrait, flow)
        out = mask * portrait + (1 - mask) * rgb
        if self.tail is None:
            return out
        delta = self.tail(torch.cat([out, portrait, rgb, mask], 1) * 2 - 1)
        return (out + delta).clamp(0, 1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Weights to ``path`` (safetensors) with the model config in the metadata."""
        from safetensors.torch import save_file
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(sd, path, metadata={"model_config": self.cfg.to_json()})

    @classmethod
    def load(cls, path: str, cfg=None) -> "VQTokenizer":
        from safetensors import safe_open
        from safetensors.torch import load_file
        if cfg is None:
            from eartalk.model.config import ModelConfig
            with safe_open(path, "pt") as f:
                cfg = ModelConfig.from_dict(json.loads(f.metadata()["model_config"]))
        tok = cls(cfg)
        tok.load_state_dict(load_file(path))
        return tok.eval()


# ---------------------------------------------------------------------- export wrappers
class TokenizerEncode(nn.Module):
    """``images float [B,3,S,S] in [0,1] -> tokens int64 [B,N]``."""

    def __init__(self, tok: VQTokenizer):
        super().__init__()
        self.tok = tok
        self.eval()   # export graphs are inference graphs (puts ``tok`` in eval mode too)

    def forward(self, images):
        return self.tok.encode(images)


class TokenizerReference(nn.Module):
    """``portrait float [B,3,S,S] -> ref [B, Cr+48, S/4, S/4]``."""

    def __init__(self, tok: VQTokenizer):
        super().__init__()
        self.tok = tok
        self.eval()   # export graphs are inference graphs (puts ``tok`` in eval mode too)

    def forward(self, portrait):
        return self.tok.reference(portrait)


class TokenizerDecode(nn.Module):
    """``(codes float [B,N,d], ref) -> images float [B,3,S,S]`` (codes: see :func:`code_table`)."""

    def __init__(self, tok: VQTokenizer):
        super().__init__()
        self.tok = tok
        self.eval()   # export graphs are inference graphs (puts ``tok`` in eval mode too)

    def forward(self, codes, ref):
        return self.tok.decode_codes(codes, ref)


# ---------------------------------------------------------------------- training
def _as_set(frames, portraits, portrait_index):
    frames = torch.as_tensor(np.asarray(frames))
    portraits = torch.as_tensor(np.asarray(portraits))
    M, P = frames.shape[0], portraits.shape[0]
    if portrait_index is None:
        if P not in (1, M):
            raise ValueError(f"{P} portraits for {M} frames: pass portrait_index")
        portrait_index = np.arange(M) if P == M else np.zeros(M, np.int64)
    return frames, portraits, torch.as_tensor(np.asarray(portrait_index), dtype=torch.long)


@torch.no_grad()
def held_out_scores(tok: VQTokenizer, frames, portraits, portrait_index=None, batch: int = 64) -> tuple[float, int]:
    """One encode -> decode pass over a whole set of frames -> (PSNR in dB, MSE pooled over all
    pixels; how many different codes its tokens use), the two things a validation checks."""
    frames, portraits, index = _as_set(frames, portraits, portrait_index)
    was = tok.training
    tok.eval()
    se, n = 0.0, 0
    seen = torch.zeros(tok.cfg.codebook_size, dtype=torch.bool)
    for i in range(0, len(frames), batch):
        x = _to_float01(frames[i:i + batch])
        p = _to_float01(portraits[index[i:i + batch]])
        tokens = tok.encode(x, p)
        seen[tokens.flatten()] = True
        y = tok.decode(tokens, tok.reference(p))
        se += float(((y - x) ** 2).sum())
        n += x.numel()
    tok.train(was)
    return float(-10 * math.log10(max(se / max(n, 1), 1e-10))), int(seen.sum())


def reconstruction_psnr(tok: VQTokenizer, frames, portraits, portrait_index=None, batch: int = 64) -> float:
    """PSNR (dB) of encode -> decode over a whole set of frames (MSE pooled over all pixels)."""
    return held_out_scores(tok, frames, portraits, portrait_index, batch)[0]


def collapse_floor(codebook_size: int) -> int:
    """Fewer distinct codes than this on held-out frames means the codes collapsed: a sixteenth of
    the codebook (32 of 512). Collapsed runs used 7 to 23 codes (session 26, pair term); the most
    constrained working run used 74 (the state-tied run, 2026-12-04)."""
    return max(2, codebook_size // 16)


@torch.no_grad()
def state_token_accuracy(tok: VQTokenizer, frames, portraits, portrait_index, states, batch: int = 64) -> float:
    """Share of tokens (rows with a known state) that the state head predicts exactly: how much
    of a frame's code is a function of its face state, i.e. predictable from controls and audio."""
    frames, portraits, index = _as_set(frames, portraits, portrait_index)
    states = torch.as_tensor(np.asarray(states, np.float32))
    hit, n = 0, 0
    for i in range(0, len(frames), batch):
        st = states[i:i + batch]
        known = ~torch.isnan(st).any(1)
        if not known.any():
            continue
        x = frames[i:i + batch][known]
        codes = tok.encode(x, portraits[index[i:i + batch][known]])
        hit += int((tok.state_tokens(st[known]) == codes).sum())
        n += codes.numel()
    return hit / max(n, 1)


def _per_frame(name: str, weight: str, values, next_values, dtype, shape: tuple, pairs: bool):
    """``values`` (and with ``pairs`` ``next_values``, each frame's successor's) as tensors of
    ``dtype`` and ``shape``: one row per training frame, for the loss term ``weight`` turns on."""
    if values is None or (pairs and next_values is None):
        raise ValueError(f"{weight} > 0 needs {name} (and next_{name} when pair_weight > 0)")
    values = torch.as_tensor(np.asarray(values, dtype))
    if tuple(values.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(values.shape)}; expected {shape}")
    if pairs:
        next_values = torch.as_tensor(np.asarray(next_values, dtype))
        if next_values.shape != values.shape:
            raise ValueError(f"next_{name} {tuple(next_values.shape)} must match {name} {tuple(values.shape)}")
    return values, next_values


MIX_MAX_SHARE = 0.5     # at most half of a frame's cells mixed: the frame's own codes stay the majority


def mix_shares(rows: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """``[rows, cells]`` shares for :meth:`VQTokenizer.loss`'s ``mix``: each row picks a rate up to
    :data:`MIX_MAX_SHARE`, each cell is mixed at that rate, and a mixed cell moves a uniform share
    of the way (1: the twin's code outright, as a token the sampler picked; less: a blend, as an
    expected code)."""
    rate = torch.rand(rows, 1, generator=gen) * MIX_MAX_SHARE
    mixed = torch.rand(rows, cells, generator=gen) < rate
    return mixed * torch.rand(rows, cells, generator=gen)


def train_tokenizer(frames, portraits, cfg, steps: int = 2000, lr: float = 2e-3, batch: int = 16,
                    out_dir: str | None = None, progress: bool = True, portrait_index=None,
                    tokenizer: VQTokenizer | None = None, seed: int = 0, change_weight: float = 1.0,
                    max_minutes: float | None = None, val=None, val_every: int = 250,
                    self_every: int = 8, next_frames=None, pair_weight: float = 0.0, states=None,
                    next_states=None, state_weight: float = 0.0,
                    state_ramp: tuple[float, float] = (0.0, 0.0), exprs=None, next_exprs=None,
                    expr_weight: float = 0.0, emotion_weight: float = 0.0, critic=None,
                    critic_weight: float = 0.0, bf16: bool | None = None, mix_frames=None, mix_of=None,
                    mix_prob: float = 0.0) -> dict:
    """Train (or continue training) a :class:`VQTokenizer` with Adam and cosine LR decay.

    ``frames``: array ``[M, 3, S, S]`` (uint8 or float [0, 1]). ``portraits``: ``[P, 3, S, S]``;
    frame ``i`` is reconstructed against ``portraits[portrait_index[i]]`` (default: ``i`` when
    ``P == M``, else 0 when ``P == 1``). ``val``: optional ``(frames, portraits, portrait_index)``
    of held-out frames, whose PSNR is measured every ``val_every`` steps and at the end (the
    per-batch PSNR of training is too noisy to judge by). ``self_every``: one sample in that many
    is a portrait reconstructed against itself (0: none). Progress runs on steps or on the
    ``max_minutes`` wall clock, whichever ends first, so the cosine schedule completes either way.
    Writes ``out_dir/tokenizer.safetensors`` and ``tokenizer_curves.png`` when ``out_dir`` is
    given. Returns metrics of the last 10% of steps, codebook usage and the validation curve; the
    trained model is ``metrics["model"]``.

    Codes collapse when a loss term (the pair term, the state pull) wins over reconstruction: the
    held-out frames then use fewer than :func:`collapse_floor` codes (the training-time usage when
    there is no ``val``). The progress bar says so at the first validation that sees it, and the run
    ends with a warning and ``metrics["collapsed"] = True`` rather than passing a dead tokenizer on.

    ``next_frames`` ``[M, 3, S, S]``: frame ``i``'s successor in its clip; with ``pair_weight > 0``
    each batch is ``batch // 2`` such pairs and :meth:`VQTokenizer.loss` adds the frame-to-frame
    latent term (the portrait-against-itself samples are then left out).

    ``states`` ``[M, STATE_DIM]`` (and ``next_states`` for the successors, with pairs): each frame's
    face state (:func:`eartalk.model.face_state.face_state`, NaN rows where unknown); with
    ``state_weight > 0`` the codes are tied to it (:meth:`VQTokenizer.loss`) and ``state_acc`` (the
    share of codes the state head predicts exactly) is reported. Self samples carry no state.
    ``state_ramp`` ``(start, full)``: fractions of training over which the encoder's pull rises
    from 0 to ``state_weight`` (the head fits from the start), so that the codes first learn to
    carry the frame. A precaution, not a measured gain: the one run pulled from step 0 (weight
    0.1) was on a 4x4 token grid, and the 4x4 grid without the pull learnt just as slowly.

    ``exprs`` uint8 ``[M, S, S]`` (and ``next_exprs`` with pairs): each frame's expression map
    (:func:`eartalk.data.expression_map.expression_maps`, zeros where unknown); with
    ``expr_weight > 0`` those pixels weigh more in the loss. Self samples get a zero map.

    ``emotion_weight > 0`` (a tokenizer with ``cfg.frame_codes``; needs ``states``): the frame codes
    must name each frame's emotion (:meth:`VQTokenizer.loss`); ``emotion_acc`` is reported.

    ``critic`` with ``critic_weight > 0``: the expression critic's feature distance joins the loss
    (:meth:`VQTokenizer.loss`; its frozen weights are not trained here).

    ``mix_frames`` ``[K, 3, S, S]`` and ``mix_of`` ``[M]`` (an index into ``mix_frames``, -1 for none):
    with ``mix_prob > 0`` each sampled frame that has one is, with that probability, decoded from
    codes moved part of the way to its ``mix_frames`` twin's (:func:`mix_shares`,
    :meth:`VQTokenizer.loss`); the decoder stage's shut-eye renders, mixed with the same state's
    open-eyed render. Not with pairs.

    ``bf16``: autocast the encoder and decoder to bfloat16 (quantisation and the loss stay float32;
    validation and the saved weights are float32); default where the CPU has native bf16
    (:func:`eartalk.model.precision.bf16_native`): 1.35-1.5x the steps of float32 in the same minutes,
    but each worth less: the recipe ``tiny`` passes False (its ``tok_bf16``), as on an AMX Xeon its
    25-minute stage reached 24.37 dB held-out in float32 against 23.33 in bf16.
    """
    frames, portraits, portrait_index = _as_set(frames, portraits, portrait_index)
    M = frames.shape[0]
    if pair_weight > 0:
        if next_frames is None:
            raise ValueError("pair_weight > 0 needs next_frames (each frame's successor in its clip)")
        next_frames = torch.as_tensor(np.asarray(next_frames))
        if next_frames.shape != frames.shape:
            raise ValueError(f"next_frames {tuple(next_frames.shape)} must match frames {tuple(frames.shape)}")
        if batch < 2 or batch % 2:
            raise ValueError(f"pair_weight > 0 needs an even batch >= 2, got {batch}")
    if mix_prob > 0:
        if pair_weight > 0:
            raise ValueError("mix_prob > 0 does not combine with pair_weight > 0")
        if mix_frames is None or mix_of is None:
            raise ValueError("mix_prob > 0 needs mix_frames (the twins) and mix_of (each frame's twin, or -1)")
        mix_frames, mix_of = torch.as_tensor(np.asarray(mix_frames)), torch.as_tensor(np.asarray(mix_of), dtype=torch.long)
        if mix_of.shape != (M,) or mix_frames.shape[1:] != frames.shape[1:] or int(mix_of.max()) >= len(mix_frames):
            raise ValueError(f"mix_of {tuple(mix_of.shape)} must give each of the {M} frames an index into mix_frames "
                             f"{tuple(mix_frames.shape)} (frames {tuple(frames.shape[1:])}) or -1")
    if emotion_weight > 0 and not cfg.frame_codes:
        raise ValueError("emotion_weight > 0 needs frame codes (cfg.frame_codes > 0) to read the emotion from")
    use_states = state_weight > 0 or emotion_weight > 0
    if use_states:
        states, next_states = _per_frame("states", "state_weight" if state_weight > 0 else "emotion_weight",
                                         states, next_states, np.float32, (M, STATE_DIM), pair_weight > 0)
    if expr_weight > 0:
        exprs, next_exprs = _per_frame("exprs", "expr_weight", exprs, next_exprs, np.uint8,
                                       (M, *frames.shape[-2:]), pair_weight > 0)
    bf16 = resolve_bf16(bf16)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tok = tokenizer or VQTokenizer(cfg)
    tok.train()
    opt = torch.optim.Adam(tok.parameters(), lr=lr, betas=(0.9, 0.99))
    budget = max_minutes * 60 if max_minutes else float("inf")
    tail, curve, val_curve, t0 = [], [], [], time.time()
    last = steps - 1
    # a stage on a time budget rarely reaches its step cap, so its bar counts budget seconds
    timed = budget < float("inf")
    bar = tqdm(total=int(budget) if timed else steps, desc="tokenizer", disable=not progress,
               unit="s" if timed else "step",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s [{elapsed}<{remaining}{postfix}]"
               if timed else None)
    floor, warned = collapse_floor(cfg.codebook_size), False
    for step in range(steps):
        # progress is steps or wall clock, whichever runs out first (the recipe has a time budget)
        frac = min(1.0, max(step / steps, (time.time() - t0) / budget))
        if frac >= 1.0:
            last = step - 1
            break
        for g in opt.param_groups:
            g["lr"] = schedule.warmup_cosine(lr, step, frac)
        if pair_weight > 0:
            i = torch.randint(0, M, (batch // 2,), generator=gen)
            x = torch.cat([frames[i], next_frames[i]])
            p = portraits[portrait_index[i]].repeat(2, 1, 1, 1)
            st = torch.cat([states[i], next_states[i]]) if use_states else None
            ex = torch.cat([exprs[i], next_exprs[i]]) if expr_weight > 0 else None
        else:
            i = torch.randint(0, M, (batch,), generator=gen)
            x, p = frames[i], portraits[portrait_index[i]]
            st = states[i].clone() if use_states else None
            ex = exprs[i].clone() if expr_weight > 0 else None
            # one sample in ``self_every`` is the portrait against itself: the sink frame's own code
            # (the stream's first frame) is never a corpus frame, and untrained it decoded blurred
            n_self = batch // self_every if self_every else 0
            if n_self:
                x = torch.cat([p[:n_self], x[n_self:]])
                if st is not None:
                    st[:n_self] = float("nan")
                if ex is not None:
                    ex[:n_self] = 0
        mix = None
        if mix_prob > 0:
            twin = mix_of[i]
            pick = (twin >= 0) & (torch.rand(len(i), generator=gen) < mix_prob)
            pick[:n_self] = False             # the portrait samples are not the frames sampled
            rows = pick.nonzero().flatten()
            mix = (rows, mix_frames[twin[rows]], mix_shares(len(rows), tok.tokens_per_frame, gen))
        ramp = schedule.ramp(frac, *state_ramp)
        with train_autocast(bf16):
            d = tok.loss(x, p, change_weight=change_weight, pair_weight=pair_weight, state=st,
                         state_weight=state_weight * ramp if state_weight > 0 else None,
                         expr=ex, expr_weight=expr_weight, emotion_weight=emotion_weight,
                         critic=critic, critic_weight=critic_weight, mix=mix)
        opt.zero_grad(set_to_none=True)
        d["loss"].backward()
        opt.step()
        rec = {k: float(v.detach()) for k, v in d.items()}
        tail.append(rec)
        tail = tail[-max(1, steps // 10):]
        curve.append((step, rec["loss"], rec["psnr"]))
        if val is not None and step % val_every == 0 and step:
            val_psnr, codes = held_out_scores(tok, *val)
            val_curve.append((step, val_psnr))
            if codes < floor and not warned:
                warned = True
                bar.write(f"tokenizer: the held-out frames use only {codes} of {cfg.codebook_size} codes at "
                          f"step {step} (collapsed below {floor}); lower pair_weight / state_weight")
        bar.update(min(budget, time.time() - t0) - bar.n if timed else 1)
        bar.set_postfix(**({"step": step + 1} if timed else {}), loss=f"{rec['loss']:.4f}", psnr=f"{rec['psnr']:.1f}",
                        val=f"{val_curve[-1][1]:.1f}" if val_curve else "-",
                        **{k: f"{rec[k]:.2f}" for k in ("state_acc", "emotion_acc", "critic") if k in rec})
    bar.close()
    tok.eval()
    keys = dict.fromkeys(k for t in tail for k in t)     # a batch without ground truth has no state terms
    metrics = {k: float(np.mean([t[k] for t in tail if k in t])) for k in keys}
    if val is not None:
        val_psnr, metrics["val_codes"] = held_out_scores(tok, *val)
        val_curve.append((last, val_psnr))
        metrics["val_psnr"] = val_psnr
    metrics.update(codebook=tok.codebook_usage(), steps=last + 1, val_curve=val_curve,
                   minutes=round((time.time() - t0) / 60, 2), bf16=bf16)
    codes = metrics.get("val_codes", metrics["codebook"]["used"])
    metrics["collapsed"] = codes < floor
    if metrics["collapsed"]:
        where = "the held-out frames use" if "val_codes" in metrics else "training used"
        warnings.warn(f"tokenizer codes collapsed: {where} {codes} of {cfg.codebook_size} codes (fewer than "
                      f"{floor}); its frames carry next to nothing. Lower pair_weight / state_weight.", stacklevel=2)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tok.save(os.path.join(out_dir, "tokenizer.safetensors"))
        _plot_curves(curve, val_curve, os.path.join(out_dir, "tokenizer_curves.png"))
    metrics["model"] = tok
    return metrics


def _plot_curves(curve, val_curve, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    st = [c[0] for c in curve]
    a.plot(st, [c[1] for c in curve], lw=0.5)
    a.set(xlabel="step", ylabel="training loss", yscale="log", title="tokenizer loss")
    b.plot(st, [c[2] for c in curve], lw=0.3, alpha=0.5, label="train batch")
    if val_curve:
        b.plot([v[0] for v in val_curve], [v[1] for v in val_curve], "o-", label="held-out")
    b.set(xlabel="step", ylabel="PSNR (dB)", title="reconstruction PSNR")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
