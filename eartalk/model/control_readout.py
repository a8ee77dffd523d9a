"""Training only: a control read-out on a frame's codes, and the term that makes the transformer's
predicted codes show the pinned controls.

Why: a pinned gaze changes 20-40 of a frame's 64 tokens across the whole face (the tokenizer's
codes are not local), each by a digit or two, so in the token cross-entropy it is a spread of small
changes the transformer learnt to average away (session 26: pinned gaze MAE 0.297, no better than
always looking ahead, 0.302, while the tokenizer's own codes carried 0.193). The read-out is a small
conv net trained on the *true* codes of the training frames (and their portrait's) to name the
frame's pose, gaze, blink and emotion, then frozen. In transformer training, its reading of the
*expected* codes (the softmax-weighted digits, what the runtime decodes) is scored against the
controls pinned in that frame: a gradient on exactly the digits that carry each control. Free
controls add nothing (the model picks them). Nothing here is saved in the bundle or read at
inference; the pixels are still decoded from the tokens alone.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from eartalk.model.conditions import C as N_KINDS
from eartalk.model.conditions import NUMERIC_CONTROLS, controls_from_gt
from eartalk.model.config import CONTROL_KINDS, CONTROLS, EMOTIONS, ModelConfig
from eartalk.model.tokenizer import fsq_digits, fsq_levels

NUMERIC = tuple(NUMERIC_CONTROLS)                                   # yaw pitch roll gaze_x gaze_y blink
_ROWS = tuple(CONTROL_KINDS.index(CONTROLS[n][0]) for n in NUMERIC)   # each one's condition row
_SLOTS = tuple(CONTROLS[n][1] for n in NUMERIC)                       # and its slot in that row
_EMO_ROW, _EMO_SLOT = CONTROL_KINDS.index(CONTROLS["emotion"][0]), CONTROLS["emotion"][1]
# the numeric error's scale: x10 on values in [-1, 1] weighs like a cross-entropy (train_gpt.mouth_loss)
NUMERIC_SCALE = 10.0


def digit_values(codes: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Codes ``[...]`` -> their FSQ digits as values in [-1, 1], float32 ``[..., len(levels)]``
    (digit 0 of L levels -> -1, digit L-1 -> +1; first digit least significant, as ``fsq_digits``)."""
    d = fsq_digits(codes.long(), levels).float()
    return d / (torch.tensor(levels, dtype=torch.float32) - 1) * 2 - 1


def expected_digit_values(digit_logits: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Per-digit logits ``[..., sum(levels)]`` (``EARTalkGPT.forward_train(digits=True)``) -> the
    softmax-weighted digit values ``[..., len(levels)]`` in [-1, 1], float32; differentiable. A
    peaked softmax gives ``digit_values`` of its argmax code."""
    parts = digit_logits.float().split(list(levels), dim=-1)
    return torch.stack([p.softmax(-1) @ torch.linspace(-1, 1, L) for p, L in zip(parts, levels)], dim=-1)


def readout_targets(cond: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Condition tokens ``[..., C, Dc]`` and their pinned mask ``[..., C]`` -> (numeric values
    ``[..., 6]`` as the conditions hold them (divided by their range's larger end), which of them
    are pinned ``[..., 6]`` bool, emotion index ``[...]`` with -1 where emotion is free)."""
    if cond.shape[-2] != N_KINDS or mask.shape != cond.shape[:-1]:
        raise ValueError(f"expected cond [..., {N_KINDS}, Dc] and mask [..., {N_KINDS}], got "
                         f"{tuple(cond.shape)} and {tuple(mask.shape)}")
    values = cond[..., list(_ROWS), list(_SLOTS)]
    pinned = mask[..., list(_ROWS)]
    emo = cond[..., _EMO_ROW, _EMO_SLOT:_EMO_SLOT + len(EMOTIONS)].argmax(-1)
    return values, pinned, torch.where(mask[..., _EMO_ROW], emo, torch.full_like(emo, -1))


class ControlReadout(nn.Module):
    """A frame's code digits and its portrait's, ``[M, N, digits]`` each -> ``[M, 6 + 5]``: the six
    numeric controls (scaled as in the conditions) and the emotion logits. The N cells are read as
    the token grid (frame-code cells included), so a control's signature may sit anywhere in it."""

    def __init__(self, cfg: ModelConfig, width: int = 64):
        super().__init__()
        self.levels, self.grid = fsq_levels(cfg.codebook_size), cfg.token_grid
        half = math.ceil(self.grid / 2)
        self.net = nn.Sequential(
            nn.Conv2d(2 * len(self.levels), width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(),
            nn.Linear(width * half * half, 2 * width), nn.GELU(), nn.Linear(2 * width, len(NUMERIC) + len(EMOTIONS)))

    def forward(self, frame: torch.Tensor, portrait: torch.Tensor) -> torch.Tensor:
        M, N, D = frame.shape
        if N != self.grid ** 2 or D != len(self.levels) or portrait.shape != frame.shape:
            raise ValueError(f"expected frame and portrait digit values [M, {self.grid ** 2}, {len(self.levels)}], "
                             f"got {tuple(frame.shape)} and {tuple(portrait.shape)}")
        x = torch.cat([frame, portrait], -1).transpose(1, 2).reshape(M, 2 * D, self.grid, self.grid)
        return self.net(x)


def readout_loss(head: ControlReadout, frame_values: torch.Tensor, portrait_values: torch.Tensor,
                 cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The read-out's error on the pinned controls of ``B x T`` frames: ``NUMERIC_SCALE`` x the mean
    squared error over the pinned numeric controls plus the emotion cross-entropy over the frames
    with emotion pinned (0 where nothing is pinned).

    ``frame_values`` [B,T,N,digits] (``digit_values`` or ``expected_digit_values``), ``portrait_values``
    [B,N,digits], ``cond`` [B,T,C,Dc], ``mask`` [B,T,C]."""
    B, T = frame_values.shape[:2]
    y = head(frame_values.flatten(0, 1), portrait_values[:, None].expand(-1, T, -1, -1).flatten(0, 1))
    values, pinned, emo = readout_targets(cond.flatten(0, 1), mask.flatten(0, 1))
    w = pinned.float()
    loss = NUMERIC_SCALE * ((y[:, :len(NUMERIC)] - values) ** 2 * w).sum() / w.sum().clamp_min(1.0)
    if (emo >= 0).any():
        loss = loss + F.cross_entropy(y[:, len(NUMERIC):], emo, ignore_index=-1)
    return loss


def _frames(data, levels) -> dict | None:
    """Every frame with ground truth of ``data`` (``train_gpt.ClipTokens``): digit values of the
    frame and of its portrait, conditions with every control pinned; None when no clip has any."""
    toks, ports, conds, masks = [], [], [], []
    rng = np.random.default_rng(0)   # drop_prob 0: nothing random is drawn
    for c in data:
        gt = {k: np.asarray(v) for k, v in (c.gt or {}).items() if k in CONTROLS}
        if not gt:
            continue
        cd, m = controls_from_gt(gt, 0.0, rng)
        toks.append(c.tokens)
        ports.append(np.repeat(c.portrait[None], len(c.tokens), 0))
        conds.append(cd)
        masks.append(m)
    if not toks:
        return None
    t = lambda a, dt: torch.from_numpy(np.concatenate(a).astype(dt))   # noqa: E731
    return dict(frame=digit_values(t(toks, np.int64), levels), portrait=digit_values(t(ports, np.int64), levels),
                cond=t(conds, np.float32), mask=t(masks, bool))


@torch.no_grad()
def readout_errors(head: ControlReadout, frames: dict) -> dict:
    """Mean absolute error of each numeric control in its own units (degrees, gaze travel, eyelid
    closure) and emotion accuracy of ``head`` on ``frames`` (``_frames``), with what always
    answering the mean (numeric) or the commonest emotion would score beside it."""
    y = torch.cat([head(f, p) for f, p in zip(frames["frame"].split(1024), frames["portrait"].split(1024))])
    values, pinned, emo = readout_targets(frames["cond"], frames["mask"])
    scale = torch.tensor([max(abs(lo), abs(hi)) for lo, hi in (CONTROLS[n][2] for n in NUMERIC)])
    w = pinned.float()
    count = w.sum(0).clamp_min(1.0)
    mean = (values * w).sum(0) / count
    mae = ((y[:, :len(NUMERIC)] - values).abs() * w).sum(0) / count * scale
    base = ((values - mean).abs() * w).sum(0) / count * scale
    known = emo >= 0
    emo_acc = (y[known, len(NUMERIC):].argmax(-1) == emo[known]).float().mean().item() if known.any() else float("nan")
    common = torch.bincount(emo[known], minlength=len(EMOTIONS)).max().item() / max(1, int(known.sum()))
    return {"mae": dict(zip(NUMERIC, mae.tolist())), "mae_of_the_mean": dict(zip(NUMERIC, base.tolist())),
            "emotion_accuracy": emo_acc, "emotion_commonest": common, "frames": len(emo)}


def train_readout(cfg: ModelConfig, train, val=None, steps: int = 1500, batch: int = 256, lr: float = 1e-3,
                  seed: int = 0, progress: bool = True) -> tuple[ControlReadout, dict]:
    """Fit a :class:`ControlReadout` on the true codes of ``train`` (``ClipTokens`` with ground truth;
    clips without any are skipped), frozen on return, with its errors on ``val`` (or on ``train``
    when ``val`` has no ground truth) in the report. 1,500 steps of 256 frames: ~1 min on 2 cores."""
    levels = fsq_levels(cfg.codebook_size)
    tr = _frames(train, levels)
    if tr is None:
        raise ValueError("train_readout needs clips with control ground truth (synthetic clips); none has any")
    va = _frames(val or [], levels) or tr
    torch.manual_seed(seed)
    head = ControlReadout(cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    n = len(tr["frame"])
    for s in tqdm(range(steps), desc="control read-out", disable=not progress, unit="step"):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * s / steps))
        i = torch.randint(0, n, (batch,), generator=gen)
        loss = readout_loss(head, tr["frame"][i, None], tr["portrait"][i], tr["cond"][i, None], tr["mask"][i, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.eval().requires_grad_(False)
    return head, {"steps": steps, "train_frames": n, "held_out": va is not tr, **readout_errors(head, va)}
