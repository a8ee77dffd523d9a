"""Visual tokenizer: a reference-conditioned VQ autoencoder (VQ-VAE-lite, no GAN).

``encode`` turns a frame into ``N = token_grid**2`` codebook indices. ``decode`` turns indices back
into a frame *given the session's portrait*: a small reference encoder runs once per session and
returns one tensor ``ref [B, Cr + 48, S/4, S/4]`` (learned features + the portrait itself packed by
space-to-depth), from which ``decode`` derives its coarser scales by average pooling. Identity and
background detail therefore come from the portrait; the tokens only need to carry what changes.
The decoder's output blends a generated image with the portrait through a predicted per-pixel mask.

Graphs for export (fixed contract, dynamic batch; the wrappers put the model in eval mode): :class:`TokenizerEncode`
``images float [B,3,S,S] -> tokens int64 [B,N]``, :class:`TokenizerReference`
``portrait float [B,3,S,S] -> ref``, :class:`TokenizerDecode` ``(tokens, ref) -> images [B,3,S,S]``.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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


class CosineVQ(nn.Module):
    """Vector quantiser with cosine assignment to unit-norm codes and straight-through gradients.

    Unit-norm codes keep all codes in play (none can be starved just by a small norm). Three
    defences against the usual collapse (every input mapped to one code per cell):

    * ``bypass`` (set by the trainer for a warm-up): the decoder sees the continuous unit vector,
      so it learns to *use* the tokens before quantisation hides their differences;
    * data init: the first quantised training batch seeds the codebook by a few rounds of
      spherical k-means on the encoder outputs (``initialized`` buffer, saved with the weights);
    * dead-code restarts: training keeps an EMA of usage, and codes under ``dead_fraction / V``
      are restarted on random encoder outputs of the current batch every ``restart_every`` steps.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, usage_decay: float = 0.99,
                 dead_fraction: float = 0.1, restart_every: int = 20):
        super().__init__()
        self.codebook = nn.Parameter(F.normalize(torch.randn(num_codes, dim), dim=1))
        self.beta = beta
        self.usage_decay = usage_decay
        self.dead_fraction = dead_fraction
        self.restart_every = restart_every
        self.bypass = False
        self.register_buffer("usage", torch.full((num_codes,), 1.0 / num_codes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.long))

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, D, g, g]`` -> nearest code per cell ``[B, g*g]`` int64 (row-major)."""
        zf = F.normalize(z.flatten(2).transpose(1, 2), dim=-1)        # [B, N, D]
        return torch.argmax(zf @ self.codes().t(), dim=-1)

    def lookup(self, idx: torch.Tensor, grid: int) -> torch.Tensor:
        """``[B, N]`` indices -> code vectors ``[B, D, g, g]``."""
        q = F.embedding(idx, self.codes())                             # [B, N, D]
        return q.transpose(1, 2).reshape(idx.shape[0], -1, grid, grid)

    def forward(self, z: torch.Tensor):
        """-> (quantised z with straight-through gradient, vq loss, indices).

        Assignment is by cosine, but the commitment term and the straight-through estimator act on
        the *raw* ``z`` against the unit-norm codes: that pins ``|z|`` near 1. (Passing gradients
        through ``normalize(z)`` instead lets ``|z|`` grow without bound under Adam, which shrinks
        the encoder's gradient as ``1/|z|`` until every frame maps to the same tokens.)
        """
        B, D, g, _ = z.shape
        zr = z.flatten(2).transpose(1, 2)                                # [B, N, D]
        zf = F.normalize(zr, dim=-1)
        if self.training and self.bypass:
            q, loss = zf, self.beta * F.mse_loss(zr, zf.detach())
            idx = torch.argmax(zf.detach() @ self.codes().t(), dim=-1)
        else:
            if self.training and not int(self.initialized):
                self._data_init(zf.detach().reshape(-1, D))
            codes = self.codes()
            idx = torch.argmax(zf @ codes.t(), dim=-1)
            q = F.embedding(idx, codes)
            loss = F.mse_loss(q, zr.detach()) + self.beta * F.mse_loss(zr, q.detach())
            if self.training:
                self._track(idx, zf.detach())
            q = zr + (q - zr).detach()
        return q.transpose(1, 2).reshape(B, D, g, g), loss, idx

    @torch.no_grad()
    def _data_init(self, pool, iters: int = 5):
        V = self.codebook.shape[0]
        pick = torch.randperm(pool.shape[0])[:V] if pool.shape[0] >= V else \
            torch.randint(0, pool.shape[0], (V,))
        c = F.normalize(pool[pick] + 0.01 * torch.randn(V, pool.shape[1]), dim=1)
        for _ in range(iters):                                          # spherical k-means
            a = torch.argmax(pool @ c.t(), dim=1)
            s = torch.zeros_like(c).index_add_(0, a, pool)
            filled = torch.bincount(a, minlength=V) > 0
            c[filled] = F.normalize(s[filled], dim=1)
        self.codebook.data.copy_(c)
        self.initialized.fill_(1)

    @torch.no_grad()
    def _track(self, idx, zf):
        counts = torch.bincount(idx.flatten(), minlength=self.usage.numel()).float()
        self.usage.mul_(self.usage_decay).add_(counts / counts.sum(), alpha=1 - self.usage_decay)
        self.steps += 1
        if int(self.steps) % self.restart_every:
            return
        dead = torch.nonzero(self.usage < self.dead_fraction / self.usage.numel()).flatten()
        if dead.numel() == 0:
            return
        pool = zf.reshape(-1, zf.shape[-1])
        pick = torch.randint(0, pool.shape[0], (dead.numel(),), device=pool.device)
        noise = 0.01 * torch.randn_like(pool[pick])   # restarted twins of one vector must differ
        self.codebook.data[dead] = F.normalize(pool[pick] + noise, dim=1)
        self.usage[dead] = 1.0 / self.usage.numel()


class VQTokenizer(nn.Module):
    """Reference-conditioned VQ tokenizer for ``cfg.image_size`` frames, ``cfg.token_grid``² tokens.

    Public API: :meth:`encode`, :meth:`reference`, :meth:`decode`, :meth:`forward`, :meth:`loss`,
    :meth:`codebook_usage`. Images are RGB ``[B, 3, S, S]``, float in [0, 1] or uint8.
    """

    def __init__(self, cfg, code_dim: int = 32, width: int = 32, ref_channels: int = 32,
                 max_width: int = 128, attn_dim: int = 64):
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

        # encoder: space-to-depth (cheap full-res read) then conv stages down to the token grid
        enc = [nn.PixelUnshuffle(SUBPIX), nn.Conv2d(PIX_CH, widths[0], 3, padding=1), nn.SiLU()]
        for i in range(1, self.n_scale + 1):
            enc += [nn.Conv2d(widths[i - 1], widths[i], 3, stride=2, padding=1), nn.SiLU(),
                    ResBlock(widths[i])]
        enc += [_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.vq = CosineVQ(cfg.codebook_size, code_dim)

        # reference encoder: features at S/4; the packed portrait is appended by reference()
        self.ref_encoder = nn.Sequential(
            nn.PixelUnshuffle(SUBPIX), nn.Conv2d(PIX_CH, widths[0], 3, padding=1), nn.SiLU(),
            ResBlock(widths[0]), nn.Conv2d(widths[0], ref_channels, 3, padding=1))
        ref_in = ref_channels + PIX_CH

        # decoder: token grid -> S/4, fusing the reference at every scale (coarse first)
        top = widths[-1]
        self.dec_in = nn.Conv2d(code_dim, top, 1)
        self.attn_q = nn.Conv2d(top, attn_dim, 1)
        self.attn_kv = nn.Conv2d(ref_in, 2 * attn_dim, 1)
        self.attn_out = nn.Conv2d(attn_dim, top, 1)
        self.dec_top = ResBlock(top)
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
        # head: per S/4 cell, 16 sub-pixels x (RGB + blend mask)
        self.head_norm = _norm(widths[0])
        self.head = nn.Conv2d(widths[0], SUBPIX * SUBPIX * 4, 1)
        with torch.no_grad():  # start by showing the portrait (mask ~0.95): learn only departures
            self.head.bias.view(4, SUBPIX * SUBPIX)[3].fill_(3.0)

    # ------------------------------------------------------------------ public API
    @property
    def tokens_per_frame(self) -> int:
        return self.g * self.g

    def encode(self, images) -> torch.Tensor:
        """images uint8 or float ``[B, 3, S, S]`` -> tokens int64 ``[B, N]`` (row-major grid)."""
        x = self._check_size(_to_float01(images))
        return self.vq.indices(self.encoder(x * 2 - 1))

    def reference(self, portrait) -> torch.Tensor:
        """portrait ``[B, 3, S, S]`` -> ``ref [B, Cr + 48, S/4, S/4]``; compute once per session."""
        p = self._check_size(_to_float01(portrait))
        return torch.cat([self.ref_encoder(p * 2 - 1), F.pixel_unshuffle(p, SUBPIX)], 1)

    def decode(self, tokens: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """tokens int64 ``[B, N]`` + ``ref`` from :meth:`reference` -> images float ``[B,3,S,S]`` in [0, 1]."""
        if tokens.dim() != 2 or tokens.shape[1] != self.tokens_per_frame:
            raise ValueError(f"expected tokens [B, {self.tokens_per_frame}], got {tuple(tokens.shape)}")
        return self._decode(self.vq.lookup(tokens, self.g), ref)

    def forward(self, images, portrait):
        """Training pass -> ``(recon [B,3,S,S], vq_loss scalar, tokens [B,N])``."""
        x = self._check_size(_to_float01(images))
        q, vq_loss, idx = self.vq(self.encoder(x * 2 - 1))
        return self._decode(q, self.reference(portrait)), vq_loss, idx

    def loss(self, images, portrait, grad_weight: float = 0.5, vq_weight: float = 1.0,
             change_weight: float = 1.0) -> dict:
        """Weighted L1 + L1 of image gradients (edges: lips, eyelids) + VQ loss -> dict of scalars.

        Pixels are weighted by ``1 + change_weight * |frame - portrait| / mean|frame - portrait|``:
        what differs from the portrait (mouth, eyes, pose) is exactly what the tokens must carry,
        and with plain L1 the portrait pathway alone is a deep local minimum (tokens collapse).
        ``loss`` is the total to backpropagate; ``l1`` (unweighted), ``grad``, ``vq`` its parts;
        ``psnr`` for logging (no gradient).
        """
        x = _to_float01(images)
        p = _to_float01(portrait)
        recon, vq_loss, _ = self(x, p)
        diff = (x - p).abs().mean(1, keepdim=True)
        w = 1 + change_weight * diff / (diff.mean() + 1e-3)
        err = (recon - x).abs()
        wl1 = (w * err).mean() / w.mean()
        g = lambda t: (t[..., 1:, :] - t[..., :-1, :], t[..., :, 1:] - t[..., :, :-1])  # noqa: E731
        (ry, rx), (xy, xx) = g(recon), g(x)
        grad = (ry - xy).abs().mean() + (rx - xx).abs().mean()
        with torch.no_grad():
            psnr = -10 * torch.log10(F.mse_loss(recon, x).clamp_min(1e-10))
        return {"loss": wl1 + grad_weight * grad + vq_weight * vq_loss, "l1": err.mean().detach(),
                "grad": grad, "vq": vq_loss, "psnr": psnr}

    def codebook_usage(self) -> dict:
        """From the training-time usage EMA: ``used`` codes (usage above the dead threshold),
        ``fraction`` of the codebook, and ``perplexity`` (effective number of codes)."""
        u = self.vq.usage / self.vq.usage.sum().clamp_min(1e-12)
        used = int((u >= self.vq.dead_fraction / u.numel()).sum())
        ent = -(u * torch.log(u.clamp_min(1e-12))).sum()
        return {"used": used, "fraction": used / u.numel(), "perplexity": float(torch.exp(ent))}

    # ------------------------------------------------------------------ internals
    def _check_size(self, x):
        if x.shape[-2:] != (self.S, self.S):
            raise ValueError(f"expected {self.S}x{self.S} images, got {tuple(x.shape[-2:])}")
        return x

    def _decode(self, q, ref):
        exp = (ref.shape[1], self.S // SUBPIX, self.S // SUBPIX)
        if ref.dim() != 4 or tuple(ref.shape[1:]) != exp:
            raise ValueError(f"expected ref [B, {exp[0]}, {exp[1]}, {exp[2]}] from reference(), "
                             f"got {tuple(ref.shape)}")
        # reference pyramid: index s = 0 is the token grid, n_scale is S/4
        pyr = [ref]
        for _ in range(self.n_scale):
            pyr.insert(0, F.avg_pool2d(pyr[0], 2))
        h = self.dec_in(q)
        # coarse cross-attention: each token cell may fetch portrait content from anywhere, which
        # a conv cannot do once the head has moved further than its receptive field
        B, _, g, _ = h.shape
        qa = self.attn_q(h).flatten(2)                                  # [B, d, g*g]
        k, v = self.attn_kv(pyr[0]).flatten(2).chunk(2, dim=1)          # [B, d, g*g] each
        att = torch.softmax(qa.transpose(1, 2) @ k / math.sqrt(qa.shape[1]), dim=-1)
        h = h + self.attn_out((v @ att.transpose(1, 2)).reshape(B, -1, g, g))
        h = self.dec_top(h)
        for s in range(self.n_scale + 1):
            h = h + self.fuse[s](torch.cat([F.silu(self.fuse_norm[s](h)), self.ref_proj[s](pyr[s])], 1))
            h = self.refine[s](h)
            if s < self.n_scale:
                h = self.up[s](F.silu(h))
        out = F.pixel_shuffle(self.head(F.silu(self.head_norm(h))), SUBPIX)              # [B, 4, S, S]
        rgb, mask = torch.sigmoid(out[:, :3]), torch.sigmoid(out[:, 3:])
        portrait = F.pixel_shuffle(ref[:, self.ref_channels:], SUBPIX)
        return mask * portrait + (1 - mask) * rgb

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
    """``(tokens int64 [B,N], ref) -> images float [B,3,S,S]``."""

    def __init__(self, tok: VQTokenizer):
        super().__init__()
        self.tok = tok
        self.eval()   # export graphs are inference graphs (puts ``tok`` in eval mode too)

    def forward(self, tokens, ref):
        return self.tok.decode(tokens, ref)


# ---------------------------------------------------------------------- training
def train_tokenizer(frames, portraits, cfg, steps: int = 2000, lr: float = 2e-3, batch: int = 16,
                    out_dir: str | None = None, progress: bool = True, portrait_index=None,
                    tokenizer: VQTokenizer | None = None, seed: int = 0,
                    warmup: float = 0.2, change_weight: float = 1.0,
                    max_minutes: float | None = None) -> dict:
    """Train (or continue training) a :class:`VQTokenizer` with Adam and cosine LR decay.

    ``frames``: array ``[M, 3, S, S]`` (uint8 or float [0, 1]). ``portraits``: ``[P, 3, S, S]``;
    frame ``i`` is reconstructed against ``portraits[portrait_index[i]]`` (default: ``i`` when
    ``P == M``, else 0 when ``P == 1``). The first ``warmup`` fraction of steps trains without
    quantisation (see :class:`CosineVQ`) unless the codebook is already initialised. Writes ``out_dir/tokenizer.safetensors`` when ``out_dir``
    is given. Returns metrics of the last 10% of steps plus codebook usage; the trained model is
    ``metrics["model"]``.
    """
    frames = torch.as_tensor(np.asarray(frames))
    portraits = torch.as_tensor(np.asarray(portraits))
    M, P = frames.shape[0], portraits.shape[0]
    if portrait_index is None:
        if P not in (1, M):
            raise ValueError(f"{P} portraits for {M} frames: pass portrait_index")
        portrait_index = np.arange(M) if P == M else np.zeros(M, np.int64)
    portrait_index = torch.as_tensor(np.asarray(portrait_index), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tok = tokenizer or VQTokenizer(cfg)
    tok.train()
    opt = torch.optim.Adam(tok.parameters(), lr=lr, betas=(0.9, 0.99))
    budget = max_minutes * 60 if max_minutes else float("inf")
    tail, t0 = [], time.time()
    warm = 0 if int(tok.vq.initialized) else int(warmup * steps)
    last = steps - 1
    for step in range(steps):
        # progress is steps or wall clock, whichever runs out first (the recipe has a time budget)
        frac = min(1.0, max(step / steps, (time.time() - t0) / budget))
        if frac >= 1.0 and step > warm:
            last = step
            break
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        tok.vq.bypass = step < warm
        i = torch.randint(0, M, (batch,), generator=gen)
        d = tok.loss(frames[i], portraits[portrait_index[i]], change_weight=change_weight)
        opt.zero_grad(set_to_none=True)
        d["loss"].backward()
        opt.step()
        tail.append({k: float(v.detach()) for k, v in d.items()})
        tail = tail[-max(1, steps // 10):]
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"tokenizer step {step}/{steps} loss {float(d['loss'].detach()):.4f} "
                  f"psnr {float(d['psnr']):.2f} used {tok.codebook_usage()['used']} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    tok.vq.bypass = False
    tok.eval()
    metrics = {k: float(np.mean([t[k] for t in tail])) for k in tail[0]}
    metrics.update(codebook=tok.codebook_usage(), steps=last + 1, minutes=round((time.time() - t0) / 60, 2))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tok.save(os.path.join(out_dir, "tokenizer.safetensors"))
    metrics["model"] = tok
    return metrics
