"""PyTorch backend: the model bundle run eagerly under ``torch.inference_mode`` (CPU; CUDA if asked
for or present).

Batch invariance. On CPU, ``nn.Linear`` over ``[B, T, d]`` is one GEMM with ``M = B*T`` rows and
the BLAS picks its blocking from M, so a session's logits change in the last bit with the number
of sessions it is batched with (measured: ~7e-7 on tiny), which can flip an argmax and then the
whole stream. With ``batch_invariant=True`` (default) the step is :func:`batch_invariant_step`:
``gpt.step`` with every linear layer written as ``torch.bmm`` over the batch, i.e. B GEMMs each of
the fixed shape ``[T, d]`` of one session. Attention matmuls are already per (session, head),
LayerNorm / softmax are per row, embeddings are lookups, so every session's outputs are bit-equal
whatever else is in the batch (tests/test_torch_backend.py). The decoder's convolutions have the
same problem; they run one session at a time in that mode (decode is ~1/4 of a frame's work).
``batch_invariant=False`` calls ``gpt.step`` and decodes the whole batch at once (faster on big
batches, sessions then agree only to ~1e-6).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from eartalk.model.gpt import EARTalkGPT, lag_bias

from .backend import Backend

__all__ = ["TorchBackend", "batch_invariant_step"]


def _linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` for x [B,T,in] as B GEMMs of one session each (see the module docstring)."""
    y = torch.bmm(x, m.weight.t().expand(x.shape[0], -1, -1))
    return y if m.bias is None else y + m.bias


def _attention(a, x, cur_bias, past_k, past_v, past_bias, keep):
    # Same arithmetic, in the same order, as eartalk.model.gpt.Attention.forward.
    B, T, _ = x.shape
    q, k, v = _linear(a.qkv, x).view(B, T, 3, a.n_head, a.head_dim).permute(2, 0, 3, 1, 4)
    if keep is not None:
        q, cur_bias = q[:, :, T - keep:], cur_bias[..., T - keep:, :]
    scale = 1.0 / math.sqrt(a.head_dim)
    scores = (q @ k.transpose(-2, -1)) * scale + cur_bias
    past_scores = (q @ past_k.transpose(-2, -1)) * scale + past_bias
    y = torch.softmax(torch.cat([past_scores, scores], dim=-1), dim=-1) @ torch.cat([past_v, v], dim=2)
    return _linear(a.proj, y.transpose(1, 2).reshape(B, q.shape[2], -1)), k, v


def _block(blk, x, cur_bias, past_k, past_v, past_bias, keep):
    a, k, v = _attention(blk.attn, blk.ln1(x), cur_bias, past_k, past_v, past_bias, keep)
    x = (x if keep is None else x[:, x.shape[1] - keep:]) + a
    fc, act, out = blk.mlp
    return x + _linear(out, act(_linear(fc, blk.ln2(x)))), k, v


def batch_invariant_step(gpt: EARTalkGPT, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag,
                         draft=None, draft_known=None):
    """``gpt.step`` (same contract, same maths) whose per-session results do not depend on B."""
    gpt._check_step(prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag)
    c = gpt.cfg
    P, W, N = c.page_tokens, c.window, c.tokens_per_frame
    cnd = torch.where(cond_mask.unsqueeze(-1), _linear(gpt.cond_proj, cond), gpt.cond_free) + gpt.cond_kind
    prev_emb = gpt.embed_tokens(prev_tokens)
    ctx = torch.cat([cnd, _linear(gpt.audio_proj, audio), prev_emb], dim=1) + gpt.slot_emb
    ca = c.cond_tokens + c.audio_tokens
    q1, act, q2 = gpt.query_cond
    frame = _linear(q2, act(_linear(q1, ctx[:, None, :ca].flatten(2)))).view(ctx.shape[0], N, -1)
    qry = gpt.query_emb + gpt.slot_emb[ca:] + frame + gpt._draft(draft, draft_known)
    x = torch.cat([ctx, qry], dim=1)
    past = lag_bias(gpt.lag_bias, past_lag, W).permute(2, 0, 3, 1).unsqueeze(3)
    cur = lag_bias(gpt.lag_bias, gpt.frame_lag, W).permute(2, 3, 0, 1)
    ks, vs = [], []
    for l, blk in enumerate(gpt.blocks):
        keep = N if l == len(gpt.blocks) - 1 else None
        x, k, v = _block(blk, x, cur[l].unsqueeze(0), past_k[l], past_v[l], past[l], keep)
        ks.append(k[:, :, :P])
        vs.append(v[:, :, :P])
    h = gpt.ln_f(x[:, -N:])
    logits = gpt.code_logits(torch.bmm(h, gpt._centered_head().t().expand(h.shape[0], -1, -1)))
    return logits, torch.stack(ks), torch.stack(vs)


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch {torch.__version__} sees no CUDA device")
    return dev


class TorchBackend(Backend):
    """A :class:`~eartalk.model.bundle.ModelBundle` behind the :class:`Backend` interface."""

    name = "torch"

    def __init__(self, bundle, device: str | None = None, batch_invariant: bool = True):
        super().__init__(bundle.cfg, bundle.audio.receptive_field)
        self.bundle = bundle.eval()
        self.device = _device(device)
        for m in bundle.modules().values():
            m.to(self.device)
        self.batch_invariant = bool(batch_invariant)

    def _t(self, a, dtype=None) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a.to(device=self.device, dtype=dtype)
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=self.device)

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu").numpy()

    def tokenize(self, images):
        with torch.inference_mode():
            return self._np(self.bundle.tokenizer.encode(self._t(images, torch.float32)))

    def reference(self, portrait):
        with torch.inference_mode():
            return self._np(self.bundle.tokenizer.reference(self._t(portrait, torch.float32)))

    def prefill(self, portrait_tokens):
        with torch.inference_mode():
            k, v = self.bundle.gpt.prefill(self._t(portrait_tokens, torch.int64))
            return self._np(k), self._np(v)

    def encode_audio(self, mel_window):
        with torch.inference_mode():
            return self._np(self.bundle.audio.step(self._t(mel_window, torch.float32)))

    def step(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag):
        logits, k, v = self.step_torch(prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag)
        return self._np(logits), self._np(k), self._np(v)

    def step_torch(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag, draft=None,
                   draft_known=None):
        """``step`` taking and returning torch tensors (the engine's pool is a torch tensor, so
        K/V never leave the device on the hot path); with ``draft``/``draft_known``, a refinement pass."""
        args = (self._t(prev_tokens, torch.int64), self._t(audio, torch.float32),
                self._t(cond, torch.float32), self._t(cond_mask, torch.bool),
                self._t(past_k, torch.float32), self._t(past_v, torch.float32), self._t(past_lag, torch.int32))
        if draft is not None:
            args += (self._t(draft, torch.int64), self._t(draft_known, torch.bool))
        with torch.inference_mode():
            if self.batch_invariant:
                return batch_invariant_step(self.bundle.gpt, *args)
            return self.bundle.gpt.step(*args)

    def refine(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag, draft, draft_known):
        return self._np(self.step_torch(prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag,
                                        draft, draft_known)[0])

    def decode_float(self, codes, ref):
        c = self._t(codes, torch.float32)
        r = self._t(ref, torch.float32)
        if r.shape[0] != c.shape[0]:
            raise ValueError(f"decode: {c.shape[0]} code rows but {r.shape[0]} ref rows")
        with torch.inference_mode():
            dec = self.bundle.tokenizer.decode_codes
            if self.batch_invariant:
                out = torch.cat([dec(c[i:i + 1], r[i:i + 1]) for i in range(c.shape[0])])
            else:
                out = dec(c, r)
            return self._np(out)
