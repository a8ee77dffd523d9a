"""Train the transformer (and the audio encoder with it) by teacher forcing under the SFA mask.

Each example is a window of ``T`` consecutive frames cut anywhere in a clip: the frames' tokens
(from the frozen tokenizer), the clip's portrait tokens as the sink, the audio encoder's tokens
for those frames, and the ground-truth controls with random dropout, so that the model learns
both to obey a pinned control and to move on its own when a control is free.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from eartalk.data.corpus import list_clips, load_clip
from eartalk.data.visemes import VISEMES
from eartalk.model import schedule
from eartalk.model.audio import LogMel
from eartalk.model.bundle import ModelBundle
from eartalk.model.conditions import controls_from_gt, encode_controls
from eartalk.model.config import CONTROLS
from eartalk.model.control_readout import (ControlReadout, digit_values, expected_digit_values, readout_loss,
                                           train_readout)
from eartalk.model.face_state import MOUTH_GT
from eartalk.model.precision import resolve_bf16, train_autocast

# Ground truth the audio encoder is taught to predict (``mouth_loss``): the renderer's mouth
# parameters (face_state.MOUTH_GT) and the viseme class.
CACHED_GT = tuple(CONTROLS) + MOUTH_GT + ("viseme",)
CACHE_VERSION = 2   # 2: mouth parameters and visemes cached too


@dataclass
class ClipTokens:
    """What training needs of one clip, precomputed once."""
    clip_id: str
    tokens: np.ndarray      # int16 [T, N]
    portrait: np.ndarray    # int16 [N]
    mel: np.ndarray         # float32 [M, n_mels]
    gt: dict


def fit_size(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [..., H, W, 3] frames at ``size`` (only small presets train on downsized frames)."""
    if frames.shape[-2] == size:
        return frames
    from PIL import Image
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR)) for x in flat])
    return out.reshape(*frames.shape[:-3], size, size, 3)


def fit_map_size(maps: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, H, W] per-pixel maps (expression maps) at ``size``, resized as :func:`fit_size`
    resizes their frames."""
    return fit_size(np.repeat(maps[..., None], 3, -1), size)[..., 0]


def clip_portrait(clip, size: int) -> np.ndarray:
    """The sink frame: the identity's neutral portrait when known (synthetic), else frame 0."""
    ident = clip.identity
    if ident is not None:
        from eartalk.data.face import render_portrait
        from eartalk.data.identity import Identity
        return fit_size(render_portrait(Identity.from_dict(ident), size=np.asarray(clip.frames).shape[1]), size)
    return fit_size(np.asarray(clip.frames[0]), size)


@torch.no_grad()
def tokenize_corpus(bundle: ModelBundle, corpus: Path, split: str, max_clips: int | None = None,
                    progress: bool = True) -> list[ClipTokens]:
    tok, cfg = bundle.tokenizer.eval(), bundle.cfg
    logmel = LogMel(cfg)
    out = []
    ids = list_clips(corpus, split)[:max_clips]
    for cid in tqdm(ids, desc=f"tokenizing {split}", disable=not progress, unit="clip"):
        clip = load_clip(corpus, cid)
        frames = torch.from_numpy(fit_size(np.asarray(clip.frames), cfg.image_size)).permute(0, 3, 1, 2)
        portrait = torch.from_numpy(clip_portrait(clip, cfg.image_size)).permute(2, 0, 1)[None]
        toks = tok.encode_clip(frames, portrait)   # tokens are relative to the portrait
        mel = logmel(torch.from_numpy(clip.audio.astype(np.float32)))[0]
        out.append(ClipTokens(cid, toks.numpy().astype(np.int16), tok.encode(portrait)[0].numpy().astype(np.int16),
                              mel.float().numpy(), clip.gt))
    return out


def save_tokens(path: Path, data: list[ClipTokens], tokenizer_sha256: str) -> None:
    """Cache a tokenized split (tokenizing the corpus costs minutes; a resumed or repeated GPT
    stage reuses it). Plain arrays, no pickle; stamped with the tokenizer's weights hash."""
    lens = np.array([len(c.tokens) for c in data])
    mlens = np.array([len(c.mel) for c in data])
    names = sorted({k for c in data for k in (c.gt or {}) if k in CACHED_GT})
    gt = {f"gt_{k}": np.concatenate([np.asarray(c.gt[k], dtype=np.float32) if c.gt and k in c.gt
                                     else np.full(len(c.tokens), np.nan, np.float32) for c in data])
          for k in names}
    np.savez(path, version=np.array(CACHE_VERSION), tokenizer_sha256=np.array(tokenizer_sha256), clip_ids=np.array([c.clip_id for c in data]),
             lengths=lens, mel_lengths=mlens, has_gt=np.array([bool(c.gt) for c in data]),
             tokens=np.concatenate([c.tokens for c in data]), portraits=np.stack([c.portrait for c in data]),
             mel=np.concatenate([c.mel for c in data]), **gt)


def load_tokens(path: Path, tokenizer_sha256: str, clip_ids: list[str]) -> list[ClipTokens] | None:
    """The cached split, or None when absent, of another cache version, made by another tokenizer or
    of other clips."""
    if not Path(path).exists():
        return None
    z = np.load(path, allow_pickle=False)
    if "version" not in z.files or int(z["version"]) != CACHE_VERSION or str(z["tokenizer_sha256"]) != tokenizer_sha256 or list(z["clip_ids"]) != list(clip_ids):
        return None
    cut = np.cumsum(z["lengths"])[:-1]
    toks, mels = np.split(z["tokens"], cut), np.split(z["mel"], np.cumsum(z["mel_lengths"])[:-1])
    gts = {k[3:]: np.split(z[k], cut) for k in z.files if k.startswith("gt_")}
    out = []
    for i, cid in enumerate(z["clip_ids"]):
        gt = {}
        if z["has_gt"][i]:
            gt = {k: (np.where(np.isnan(v[i]), -1, v[i]).astype(np.int64) if k in ("emotion", "viseme") else v[i])
                  for k, v in gts.items()}
        out.append(ClipTokens(str(cid), toks[i], z["portraits"][i], mels[i], gt))
    return out


def cached_tokens(bundle: ModelBundle, corpus: Path, split: str, limit: int | None, cache: Path, key: str,
                  progress: bool = True) -> list[ClipTokens]:
    """The first ``limit`` clips of ``split`` tokenized, from ``cache`` when it holds exactly them under
    ``key`` (the tokenizer's hash, or whatever fixes its codes), else tokenized now and cached."""
    ids = list_clips(corpus, split)[:limit]
    data = load_tokens(cache, key, ids)
    if data is None:
        data = tokenize_corpus(bundle, corpus, split, limit, progress)
        save_tokens(cache, data, key)
    return data


def stage_tokenizer(out: Path, how: str) -> Path:
    """``out/work/tokenizer.safetensors``, what a transformer stage reads; missing, a
    FileNotFoundError that says ``how`` to make it."""
    path = Path(out) / "work" / "tokenizer.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {how}")
    return path


def _audio_tokens(bundle: ModelBundle, mel: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Audio tokens [T, A, F] for frames start..start+T-1, with the encoder's left context."""
    cfg, enc = bundle.cfg, bundle.audio
    mpf, la, R = cfg.mels_per_frame, cfg.lookahead_frames, enc.receptive_field
    hi = (start + T + la) * mpf                   # frame t reads mel < (t + 1 + la) * mpf
    lo = hi - (T - 1) * mpf - R
    pad_l, pad_r = max(0, -lo), max(0, hi - mel.shape[0])
    from eartalk.model.audio import SILENCE_LOG_MEL
    seg = mel[max(lo, 0):min(hi, mel.shape[0])]
    seg = F.pad(seg[None], (0, 0, pad_l, pad_r), value=SILENCE_LOG_MEL)
    # one pass of the causal convs over the whole segment: frame i's outputs are exactly those
    # ``enc.step`` computes on its own R-frame window (test_train_gpt), at a sixth of the work
    return enc.frame_tokens(enc._convs(seg))[0]                    # convs: [1, C, T * mpf]


class Batch(NamedTuple):
    """``B`` training windows of ``T`` frames (see :func:`make_batch`)."""
    tokens: torch.Tensor     # int64 [B, T, N]
    prev: torch.Tensor       # int64 [B, N]: the frame before the window (the portrait at a clip's start)
    portrait: torch.Tensor   # int64 [B, N]
    audio: torch.Tensor      # [B, T, A, F] audio tokens (with grad: the encoder trains with the GPT)
    cond: torch.Tensor       # [B, T, C, Dc]
    mask: torch.Tensor       # bool [B, T, C]: pinned controls
    mouth: torch.Tensor      # [B, T, len(MOUTH_GT)] ground-truth mouth parameters, NaN where unknown
    viseme: torch.Tensor     # int64 [B, T] ground-truth viseme, -1 where unknown
    stale: torch.Tensor      # int64 [B, T, N]: the same clip's frames, lagged or frozen (``stale_history``)
    stale_prev: torch.Tensor  # int64 [B, N]: the frame before ``stale``'s first


def stale_history(tokens: np.ndarray, portrait: np.ndarray, s: int, T: int, max_lag: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Input tokens for a window of ``T`` frames starting at ``s`` of one clip (``tokens`` [n, N])
    that a streaming model could have produced by falling behind: (inputs [T, N], prev [N]).

    Half the windows are *frozen* (every input is the clip's frame ``s - 1 - k``, k in [0, max_lag]),
    the others *lagged* (input t is frame ``s + t - k``, k in [1, max_lag]); frames before the clip
    are the portrait. Why: a model that copies its previous frame, run free, reads exactly such a
    history -- real frames of the right face in a stale state -- and the copying models of
    2026-12-02..04 all did. Replacements from another clip (``corrupt_inputs(plausible=True)``)
    are told apart by the identity and were learnt to be ignored, after which the model copied
    its own (same identity) history again. Trained on stale history with current targets, the
    model must take the state from the controls and the audio."""
    if max_lag < 1:
        raise ValueError(f"max_lag must be >= 1, got {max_lag}")
    n = len(tokens)
    at = lambda i: tokens[min(i, n - 1)] if i >= 0 else portrait   # noqa: E731
    if rng.random() < 0.5:
        f = at(s - 1 - int(rng.integers(0, max_lag + 1)))
        return np.repeat(f[None], T, axis=0), f
    k = int(rng.integers(1, max_lag + 1))
    return np.stack([at(s + t - k) for t in range(T)]), at(s - 1 - k)


def make_batch(bundle: ModelBundle, data: list[ClipTokens], batch: int, T: int, drop_prob: float,
               rng: np.random.Generator, start_prob: float = 0.0, max_lag: int = 16) -> Batch:
    """``batch`` windows of ``T`` frames; with probability ``start_prob`` a window starts at its
    clip's first frame, reading the portrait's tokens as its previous frame, as every stream does
    (a uniform cut starts there once in ~200 windows, and the portrait's codes are unlike any
    corpus frame's: 90% of a frame's tokens differ from them)."""
    toks, prev, port, aud, cond, mask, mouth, vis, stale, stale_prev = [], [], [], [], [], [], [], [], [], []
    for _ in range(batch):
        c = data[rng.integers(len(data))]
        n = len(c.tokens)
        s = 0 if rng.random() < start_prob else int(rng.integers(0, max(1, n - T + 1)))
        idx = np.minimum(np.arange(s, s + T), n - 1)
        toks.append(torch.from_numpy(c.tokens[idx].astype(np.int64)))
        prev.append(torch.from_numpy((c.tokens[s - 1] if s > 0 else c.portrait).astype(np.int64)))
        port.append(torch.from_numpy(c.portrait.astype(np.int64)))
        aud.append(_audio_tokens(bundle, torch.from_numpy(c.mel), s, T))
        gt = {k: np.asarray(v)[idx] for k, v in (c.gt or {}).items() if k in CONTROLS}
        if gt:
            cd, m = controls_from_gt(gt, drop_prob, rng)
        else:   # the user's own videos have no ground truth: every control free
            cd, m = (np.repeat(a[None], T, axis=0) for a in encode_controls({}))
        cond.append(torch.from_numpy(cd))
        mask.append(torch.from_numpy(m))
        g = c.gt or {}
        mouth.append(torch.from_numpy(np.stack([np.asarray(g[k], np.float32)[idx] if k in g else np.full(T, np.nan, np.float32)
                                                for k in MOUTH_GT], axis=-1)))
        vis.append(torch.from_numpy(np.asarray(g["viseme"], np.int64)[idx] if "viseme" in g else np.full(T, -1)))
        st, sp = stale_history(c.tokens, c.portrait, s, T, max_lag, rng)
        stale.append(torch.from_numpy(st.astype(np.int64)))
        stale_prev.append(torch.from_numpy(sp.astype(np.int64)))
    return Batch(*(torch.stack(x) for x in (toks, prev, port, aud, cond, mask, mouth, vis, stale, stale_prev)))


class MouthHead(nn.Module):
    """Training-only probe on the audio tokens: a frame's mouth parameters and viseme from its
    ``A x F`` audio tokens. Its loss teaches the audio encoder phoneme-to-mouth directly, instead of
    only through the token cross-entropy of the few mouth tokens (most of a frame's 64 tokens do not
    depend on audio). Not part of the shipped model."""

    def __init__(self, cfg):
        super().__init__()
        self.lin = nn.Linear(cfg.audio_tokens * cfg.audio_dim, len(MOUTH_GT) + len(VISEMES))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(audio.flatten(-2))
        return y[..., :len(MOUTH_GT)], y[..., len(MOUTH_GT):]


def mouth_loss(head: MouthHead, b: Batch) -> torch.Tensor:
    """Mean squared error of the mouth parameters (each in [0, 1], scaled x10 to weigh like a CE)
    plus the viseme cross-entropy, over the frames that have ground truth (0 when none has)."""
    params, logits = head(b.audio)
    known = ~torch.isnan(b.mouth)
    loss = logits.sum() * 0.0
    if known.any():
        loss = loss + 10.0 * F.mse_loss(params[known], b.mouth[known])
    if (b.viseme >= 0).any():
        loss = loss + F.cross_entropy(logits.flatten(0, 1), b.viseme.flatten(), ignore_index=-1)
    return loss


def corrupt_inputs(toks: torch.Tensor, prev: torch.Tensor, corrupt: float | tuple[float, float], V: int,
                   gen: torch.Generator | None = None, portrait: torch.Tensor | None = None,
                   portrait_share: float = 0.0, plausible: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``toks`` [B,T,N] and ``prev`` [B,N] with a fraction of their tokens replaced by random codes
    of ``V``: ``corrupt`` is that fraction, or a range ``(lo, hi)`` from which each window (batch
    row) draws its own. A random code may equal the original, so the share changed is ``rate *
    (1 - 1/V)``.

    ``portrait`` [B,N] with ``portrait_share`` > 0: that share of the replaced tokens take the
    portrait's code at their position instead of a random one. A stream that stops moving is a
    stream reading portrait-like frames (the fixed point every copying model fell into): trained
    on such history with moving targets, the model is asked to move from the audio and the
    controls. In the 2026-12-03 run (share 0.5) it still predicted the portrait's codes for 99.8%
    of tokens given an all-portrait history (docs/model-card.md).

    ``plausible``: replacements are the codes at the same position in another window of the batch
    (another clip, a random frame of it) instead of uniform random codes (a batch of one window
    has no other window: uniform codes then). Why: the tiny tokenizer
    uses ~74 of its 512 codes, so a uniform random code is noise the model can spot and ignore,
    then copy the true tokens around it; a plausible replacement can only be told apart by
    checking it against the controls and the audio (2026-12-04: with random codes the model still
    copied at step 1,200, 0.2% of tokens changing per frame free-running against 5.8%)."""
    if not 0.0 <= portrait_share <= 1.0:
        raise ValueError(f"portrait_share must be in [0, 1], got {portrait_share!r}")
    if portrait_share > 0 and (portrait is None or tuple(portrait.shape) != tuple(prev.shape)):
        raise ValueError(f"portrait_share > 0 needs portrait tokens of shape {tuple(prev.shape)}, "
                         f"got {None if portrait is None else tuple(portrait.shape)}")
    lo, hi = (corrupt, corrupt) if isinstance(corrupt, (int, float)) else corrupt
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"corrupt must be a fraction or a range (lo, hi) inside [0, 1], got {corrupt!r}")
    if hi == 0:
        return toks, prev
    B = toks.shape[0]
    rate = lo + (hi - lo) * torch.rand(B, generator=gen) if hi > lo else torch.full((B,), float(lo))
    def noisy(t):
        shape = (B, *[1] * (t.dim() - 1))
        if plausible and B > 1:
            # the code at the same position of another window (another clip, another moment):
            # indistinguishable from a true token by its code alone
            repl = t.roll(1, dims=0)
            if t.dim() == 3:
                repl = repl[:, torch.randint(0, t.shape[1], (t.shape[1],), generator=gen)]
        else:
            repl = torch.randint(0, V, t.shape, generator=gen)
        if portrait_share > 0:
            port = portrait.view(B, *[1] * (t.dim() - 2), -1).expand_as(t)
            repl = torch.where(torch.rand(t.shape, generator=gen) < portrait_share, port, repl)
        return torch.where(torch.rand(t.shape, generator=gen) < rate.view(shape), repl, t)
    return noisy(toks), noisy(prev)


def draft_mask(B: int, T: int, N: int, draft_prob: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """bool [B,T,N]: which target tokens a training frame gets as its known draft (refinement).

    A share ``draft_prob`` of the windows get drafts, the others none (every token predicted from
    scratch, the first pass of a stream). In a drafted window each frame hides each token with
    probability r = cos(pi/2 * u), u ~ U(0, 1) (MaskGIT's schedule: mostly-hidden frames, like the
    early passes, are as common as mostly-known ones), the rest are known."""
    if not 0.0 <= draft_prob <= 1.0:
        raise ValueError(f"draft_prob must be in [0, 1], got {draft_prob!r}")
    rows = torch.rand(B, generator=gen) < draft_prob
    hide = torch.cos(0.5 * math.pi * torch.rand(B, T, 1, generator=gen))
    known = torch.rand(B, T, N, generator=gen) >= hide
    return known & rows[:, None, None]


def gpt_loss(bundle: ModelBundle, b, corrupt: float | tuple[float, float] = 0.0,
             gen: torch.Generator | None = None, bf16: bool = False, change_weight: float = 1.0,
             portrait_share: float = 0.0, plausible: bool = False, stale_prob: float = 0.0,
             draft_prob: float = 0.0, return_digits: bool = False):
    """Token cross-entropy of teacher forcing. ``corrupt``: the fraction of *input* tokens (the
    previous frames the model reads) replaced by random codes, or a range ``(lo, hi)`` from which
    each window draws its own fraction; the targets stay clean. When streaming, the model reads its
    own, imperfect, frames: training on wrong inputs keeps one bad token from compounding frame
    after frame, and windows whose history is mostly noise can only be predicted from the portrait,
    the conditions and the audio, which is what a pinned control or a syllable must move (with
    clean history, copying the previous frame already gets ~77% of tokens right). ``bf16``:
    autocast the training forward to bfloat16 (validation, under no_grad, stays float32).
    ``change_weight``: weight of the tokens that differ from the previous frame's (most tokens
    repeat, so plain CE is mostly paid for copying, and a model that only copies never animates).
    ``portrait_share``: of the corrupted inputs, the share given the portrait's code (see
    :func:`corrupt_inputs`). ``stale_prob``: the share of windows that read the batch's stale
    history (``stale``/``stale_prev``, see :func:`stale_history`) instead of their own frames,
    before the corruption. ``draft_prob`` (models with ``cfg.refine``): the share of windows whose
    frames get part of their own targets as a known draft (:func:`draft_mask`); the loss then
    counts only the tokens left to predict, as a refinement pass does. ``return_digits``: return
    (loss, the per-digit logits [B,T,N,sum(levels)]) for a term on the predicted codes
    (:mod:`eartalk.model.control_readout`)."""
    toks, prev, port, aud, cond, mask = b[:6]
    inp, prev_in = toks, prev
    if stale_prob > 0:
        use = torch.rand(toks.shape[0], generator=gen) < stale_prob
        inp = torch.where(use[:, None, None], b.stale, toks)
        prev_in = torch.where(use[:, None], b.stale_prev, prev)
    inp, prev_in = corrupt_inputs(inp, prev_in, corrupt, bundle.cfg.codebook_size, gen, port, portrait_share,
                                  plausible)
    # bf16 matmuls and attention (see precision.bf16_native and EARTalkGPT.forward_train); the loss stays in
    # float32
    known = None
    if draft_prob > 0:
        if not bundle.cfg.refine:
            raise ValueError("draft_prob > 0 needs a model config with refine=True")
        known = draft_mask(*toks.shape, draft_prob, gen)
    with train_autocast(bf16):
        digits = bundle.gpt.forward_train(inp, port, aud, cond, mask, prev_first=prev_in, digits=True,
                                          draft=None if known is None else toks, draft_known=known)
    ce = bundle.gpt.code_nll(digits, toks)                   # [B,T,N], float32
    if change_weight == 1.0 and known is None:
        loss = ce.mean()
    else:
        before = torch.cat([prev[:, None], toks[:, :-1]], dim=1)
        w = torch.where(toks != before, change_weight, 1.0)
        if known is not None:
            w = w * (~known)
        loss = (ce * w).sum() / w.sum().clamp_min(1.0)
    return (loss, digits) if return_digits else loss


def train_gpt(bundle: ModelBundle, train: list[ClipTokens], val: list[ClipTokens], out_dir: Path,
              minutes: float = 50.0, max_steps: int = 100000, batch: int = 4, T: int | None = None,
              lr: float = 1e-3, warmup: int = 200, drop_prob: float = 0.5, seed: int = 0,
              progress: bool = True, resume: bool = True, corrupt: float | tuple[float, float] = 0.1,
              bf16: bool | None = None, change_weight: float = 1.0, start_prob: float = 0.0,
              mouth_weight: float = 0.0, portrait_share: float = 0.0, plausible: bool = False,
              stale_prob: float = 0.0, draft_prob: float = 0.0, readout_weight: float = 0.0,
              readout_steps: int = 1500, readout_ramp: tuple[float, float] = (0.0, 0.0),
              deadline: float | None = None) -> dict:
    """Train until ``max_steps`` or the time budget; checkpoints to ``out_dir/gpt_ckpt.pt`` (resumable).

    ``mouth_weight``: weight of :func:`mouth_loss` (the audio encoder's mouth and viseme probe) added
    to the token cross-entropy; 0 trains on tokens alone. ``readout_weight``: weight of the control
    read-out term on the predicted codes (:mod:`eartalk.model.control_readout`; its read-out is first
    fitted for ``readout_steps`` on the true codes of ``train``, outside the time budget, and kept in
    the checkpoint); 0: none. ``readout_ramp`` ``(start, full)``: the fractions of the time budget over
    which that weight rises from 0 (:func:`eartalk.model.schedule.ramp`; ``(0, 0)``: from the first
    step). ``deadline`` (a ``time.time()``): the budget ends then if that is sooner, the schedule
    fitted to it, but never under a quarter of ``minutes`` (the recipe's total, ``recipe.run_recipe``).
    ``draft_prob``: see :func:`gpt_loss`
    (refinement; validation stays draft-free, the first pass). ``bf16``: autocast the training forward
    (default: where the CPU has native bf16, :func:`eartalk.model.precision.bf16_native`)."""
    bf16 = resolve_bf16(bf16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    T = T or bundle.cfg.window + 4
    head = MouthHead(bundle.cfg)
    params = list(bundle.gpt.parameters()) + list(bundle.audio.parameters())
    if mouth_weight > 0:
        params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    ckpt = out_dir / "gpt_ckpt.pt"
    hist = {"step": [], "loss": [], "mouth": [], "readout": [], "val_step": [], "val_loss": []}
    readout, readout_report, st = None, None, {}
    step, spent = 0, 0.0
    if resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=True)
        bundle.gpt.load_state_dict(st["gpt"])
        bundle.audio.load_state_dict(st["audio"])
        if "mouth_head" in st:
            head.load_state_dict(st["mouth_head"])
        opt.load_state_dict(st["opt"])
        step, spent = int(st["step"]), float(st["spent"])
        hist = {"mouth": [], "readout": [], **json.loads(st["hist"])}
    if readout_weight > 0 and not any(c.gt and any(k in c.gt for k in CONTROLS) for c in train):
        # users' own videos: no control ground truth, so nothing to read out (every control trains free)
        warnings.warn("readout_weight > 0 but no training clip has control ground truth (users' own videos): "
                      "training without the control read-out term")
        readout_weight = 0.0
    if readout_weight > 0:
        if "readout" in st:   # the resumed run scores against the same read-out
            readout = ControlReadout(bundle.cfg)
            readout.load_state_dict(st["readout"])
            readout.eval().requires_grad_(False)
            readout_report = json.loads(st["readout_report"])
        else:
            t_ro = time.time()
            readout, readout_report = train_readout(bundle.cfg, train, val, steps=readout_steps, seed=seed,
                                                    progress=progress)
            readout_report["minutes"] = round((time.time() - t_ro) / 60, 2)
    rng = np.random.default_rng([seed, step])
    gen = torch.Generator().manual_seed(seed * 1000003 + step)
    vrng = np.random.default_rng(12345)
    vbatches = [make_batch(bundle, val, batch, T, 0.5, vrng) for _ in range(4)] if val else []
    t0 = time.time() - spent
    budget = schedule.by_deadline(minutes, None if deadline is None else deadline - t0) * 60
    # the stage ends on its time budget (steps rarely bind), so the bar counts budget seconds
    bar = tqdm(total=int(budget), initial=int(spent), desc="gpt", unit="s", disable=not progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s [{elapsed}<{remaining}{postfix}]")
    bundle.gpt.train()
    bundle.audio.train()
    while step < max_steps and time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:  # warm-up then cosine over the time budget, to a tenth of lr
            g["lr"] = schedule.warmup_cosine(lr, step, frac, warmup=warmup, floor=0.1)
        b = make_batch(bundle, train, batch, T, drop_prob, rng, start_prob)
        ce, digits = gpt_loss(bundle, b, corrupt, gen, bf16, change_weight, portrait_share, plausible, stale_prob,
                              draft_prob, return_digits=True)
        loss = ce
        w_ro = readout_weight * schedule.ramp(min(frac, 1.0), *readout_ramp) if readout is not None else 0.0
        if w_ro > 0:
            ro = readout_loss(readout, expected_digit_values(digits, readout.levels),
                              digit_values(b.portrait, readout.levels), b.cond, b.mask)
            hist["readout"].append(ro.item())
            loss = loss + w_ro * ro
        if mouth_weight > 0:
            aux = mouth_loss(head, b)
            hist["mouth"].append(aux.item())
            loss = loss + mouth_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        hist["step"].append(step)
        hist["loss"].append(ce.item())
        bar.update(min(budget, time.time() - t0) - bar.n)
        bar.set_postfix(step=step, loss=f"{np.mean(hist['loss'][-20:]):.3f}")
        last = step >= max_steps or time.time() - t0 >= budget
        if step % 200 == 0 or last:
            if vbatches:
                hist["val_step"].append(step)
                hist["val_loss"].append(_val_loss(bundle, vbatches))
            # the time saved is the time reported: a resumed run that trains no further reports the same
            spent = time.time() - t0
            extra = {"readout": readout.state_dict(), "readout_report": json.dumps(readout_report)} if readout else {}
            torch.save({"gpt": bundle.gpt.state_dict(), "audio": bundle.audio.state_dict(),
                        "mouth_head": head.state_dict(), "opt": opt.state_dict(), "step": step, "spent": spent,
                        "hist": json.dumps(hist), **extra}, ckpt)
    bar.close()
    bundle.eval()
    plot_curves(hist, out_dir / "gpt_curves.png")
    return {"steps": step, "minutes": round(spent / 60, 2), "schedule_minutes": round(budget / 60, 2),
            "train_loss": float(np.mean(hist["loss"][-50:])) if hist["loss"] else None,
            "val_loss": hist["val_loss"][-1] if hist["val_loss"] else None,
            "mouth_loss": float(np.mean(hist["mouth"][-50:])) if hist["mouth"] else None,
            "readout_loss": float(np.mean(hist["readout"][-50:])) if hist["readout"] else None,
            "readout": readout_report, "bf16": bf16}


@torch.no_grad()
def _val_loss(bundle: ModelBundle, batches) -> float:
    bundle.gpt.eval()
    bundle.audio.eval()
    v = float(np.mean([float(gpt_loss(bundle, b)) for b in batches]))
    bundle.gpt.train()
    bundle.audio.train()
    return v


def plot_curves(hist: dict, path: Path) -> None:
    """The token cross-entropy (train and validation), and beside it each auxiliary term trained
    (the audio encoder's mouth probe, the control read-out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    aux = [(name, ylabel, title) for name, ylabel, title in (
        ("mouth", "10 x MSE + viseme CE", "audio encoder's mouth probe (train)"),
        ("readout", "10 x MSE + emotion CE", "controls read from the predicted codes (train)"))
        if hist.get(name)]
    fig, axes = plt.subplots(1, 1 + len(aux), figsize=(6 + 5 * len(aux), 3.5), squeeze=False)
    ax = axes[0, 0]
    if hist["loss"]:
        k = max(1, len(hist["loss"]) // 100)
        ax.plot(hist["step"][k - 1:], np.convolve(hist["loss"], np.ones(k) / k, mode="valid"), label="train")
    if hist["val_loss"]:
        ax.plot(hist["val_step"], hist["val_loss"], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("token cross-entropy")
    ax.legend()
    ax.set_title("transformer training")
    for ax, (name, ylabel, title) in zip(axes[0, 1:], aux):
        y = hist[name]   # recorded from the step its weight was first > 0, so aligned to the last steps
        k = max(1, len(y) // 100)
        ax.plot(hist["step"][-len(y):][k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
