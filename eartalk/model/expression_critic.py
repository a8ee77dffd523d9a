"""A small emotion and blink classifier whose features judge the decoder's frames (training only).

Why: the tokenizer's pixel loss does not value an expression's cues (a cheek flush, smile folds,
a raised lid: a few faint percent of a 128x128 frame), so its decoder never drew *happy* (session
32: 0 of 163 reconstructed happy frames read happy by the probe). A classifier trained on the true
frames' emotions learns exactly those cues; the distance between its features of the decoded frame
and of the true frame (LPIPS-style: each block's activations, unit-normalised over channels) then
joins the decoder stage's loss (``VQTokenizer.loss(critic=...)``). Matching features, not pushing
the decoded frame's class: the class term painted a grid texture the classifier reads as the class
(docs/model-history.md, sessions 32-33). It reads the blink too: a critic of emotion alone let the
decoder draw shut lids open again (a blink pinned shut shown on 70% of first frames, from 87%).

Not the probe: ``eartalk eval`` judges with the probe (:mod:`eartalk.probe`), so the critic is its
own network, trained in the stage on the training split only. Nothing at inference reads it.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from eartalk.model.config import EMOTIONS
from eartalk.model.conditions import NUMERIC_CONTROLS
from eartalk.model import schedule
from eartalk.model.face_state import EMOTION_COLS

# the blink's column in a face-state row (its range is [0, 1], so the row holds it unscaled)
BLINK_COL = list(NUMERIC_CONTROLS).index("blink")

# channels of the five conv blocks (2x average pooling between them)
WIDTHS = (24, 48, 64, 96, 96)


class ExpressionCritic(nn.Module):
    """Five conv blocks (conv, group norm, SiLU; 2x average pooling between them) and a linear head
    naming the frame's emotion and whether its eyes are shut. Input: ``[B, 3, S, S]`` (uint8, or
    float in [0, 1]), read at ``read_size`` (average pooled; S a multiple of it, it a multiple of 16)."""

    def __init__(self, image_size: int = 128, read_size: int = 64):
        super().__init__()
        if read_size % 16 or image_size % read_size:
            raise ValueError(f"image_size {image_size}, read_size {read_size}: the critic reads a multiple of 16 "
                             "that divides the frame's side")
        self.image_size, self.read_size = image_size, read_size
        self.pool = image_size // read_size
        self.blocks = nn.ModuleList()
        c_in = 3
        for c in WIDTHS:
            self.blocks.append(nn.Sequential(nn.Conv2d(c_in, c, 3, 1, 1), nn.GroupNorm(4, c), nn.SiLU()))
            c_in = c
        side = read_size // 2 ** (len(WIDTHS) - 1)
        self.head = nn.Linear(WIDTHS[-1] * side * side, len(EMOTIONS) + 1)   # emotion logits, blink logit

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"critic input has shape {tuple(x.shape)}; expected [B, 3, {self.image_size}, "
                             f"{self.image_size}]")
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check(x)
        return (F.avg_pool2d(x, self.pool) if self.pool > 1 else x) * 2 - 1

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's output, from the frame read at ``read_size``."""
        h, out = self._read(x), []
        for j, block in enumerate(self.blocks):
            h = block(F.avg_pool2d(h, 2) if j else h)
            out.append(h)
        return out

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's activations, unit-normalised over channels at every pixel."""
        return [h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-6) for h in self._activations(x)]

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (emotion logits ``[B, len(EMOTIONS)]``, blink logit ``[B]``: eyes shut above 0)."""
        out = self.head(self._activations(x)[-1].flatten(1))
        return out[:, :len(EMOTIONS)], out[:, len(EMOTIONS)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Emotion logits ``[B, len(EMOTIONS)]``."""
        return self.heads(x)[0]

    def distance(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over blocks of the squared distance between the unit-normalised features of
        ``recon`` and ``target`` (summed over channels, averaged over pixels and the batch): 0 for
        identical frames, at most 4. Gradients reach ``recon`` only."""
        with torch.no_grad():
            ft = self.features(target)
        fr = self.features(recon)
        return sum((a - b).pow(2).sum(1).mean() for a, b in zip(fr, ft)) / len(ft)


def _label_tensors(labels, blinks) -> tuple[torch.Tensor, torch.Tensor]:
    """Emotion indices as int64 and eyelid closures as float32 (all NaN when ``blinks`` is None)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if blinks is None:
        return labels, torch.full((len(labels),), float("nan"))
    return labels, torch.as_tensor(np.asarray(blinks), dtype=torch.float32)


def train_critic(frames, labels, blinks=None, *, minutes: float, steps: int = 2000, batch: int = 32,
                 lr: float = 2e-3, read_size: int = 64, val=None, seed: int = 0,
                 progress: bool = True) -> tuple[ExpressionCritic, dict]:
    """Train an :class:`ExpressionCritic` on uint8 ``frames`` ``[M, 3, S, S]``, their emotion indices
    ``labels`` ``[M]`` (-1: unknown) and eyelid closures ``blinks`` ``[M]`` in [0, 1] (NaN: unknown;
    None: all unknown) with Adam and cosine decay, ``steps`` or ``minutes`` of wall clock, whichever
    ends first; the critic reads frames at ``read_size``. Each known label adds its term (emotion
    cross-entropy, blink binary cross-entropy against the closure). ``val``: optional ``(frames,
    labels)`` or ``(frames, labels, blinks)`` scored at the end. -> the critic (frozen, in eval mode)
    and its metrics (steps, minutes, last-tenth training loss, ``val_acc``, ``val_blink_acc``)."""
    frames = torch.as_tensor(np.asarray(frames))
    labels, blinks = _label_tensors(labels, blinks)
    if frames.ndim != 4 or frames.shape[1] != 3 or labels.shape != (len(frames),) or blinks.shape != labels.shape:
        raise ValueError(f"frames {tuple(frames.shape)}, labels {tuple(labels.shape)} and blinks "
                         f"{tuple(blinks.shape)}: expected [M, 3, S, S], [M] and [M]")
    if len(labels) and (labels.max() >= len(EMOTIONS) or labels.min() < -1):
        raise ValueError(f"labels hold {sorted(set(labels.tolist()))}; expected -1 (unknown) or 0..{len(EMOTIONS) - 1}")
    b_known = ~torch.isnan(blinks)
    if ((blinks[b_known] < 0) | (blinks[b_known] > 1)).any():
        raise ValueError("blinks must be eyelid closures in [0, 1] (NaN where unknown)")
    usable = torch.nonzero((labels >= 0) | b_known).flatten()
    if len(usable) == 0:
        raise ValueError("no frame has a known emotion or blink to train the expression critic on")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    critic = ExpressionCritic(frames.shape[-1], read_size)
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    budget, t0, tail, step = minutes * 60, time.time(), [], 0
    bar = tqdm(total=steps, desc="expression critic", unit="step", disable=not progress)
    for step in range(steps):
        frac = max(step / steps, (time.time() - t0) / budget)
        if frac >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = schedule.warmup_cosine(lr, step, frac)
        i = usable[torch.randint(0, len(usable), (batch,), generator=gen)]
        emo, blink = critic.heads(frames[i])
        e, b = labels[i] >= 0, b_known[i]
        loss = (F.cross_entropy(emo[e], labels[i][e]) if e.any() else emo.sum() * 0) + \
            (F.binary_cross_entropy_with_logits(blink[b], blinks[i][b]) if b.any() else blink.sum() * 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tail = (tail + [loss.item()])[-max(1, steps // 10):]
        bar.update(1)
        bar.set_postfix(loss=f"{tail[-1]:.3f}")
    else:
        step += 1
    bar.close()
    critic.eval()
    for p in critic.parameters():
        p.requires_grad_(False)
    m = {"steps": step, "minutes": round((time.time() - t0) / 60, 2), "read_size": read_size,
         "loss": float(np.mean(tail)) if tail else None}
    if val is not None:
        m["val_acc"], m["val_blink_acc"] = critic_accuracy(critic, *val)
    return critic, m


@torch.no_grad()
def critic_accuracy(critic: ExpressionCritic, frames, labels, blinks=None, batch: int = 256) -> tuple[float, float]:
    """-> (share of ``frames`` with a known emotion (>= 0) whose emotion the critic names, share of those
    with a known blink (not NaN) it calls shut or open as the closure is above or below 0.5); NaN
    where none is known."""
    frames = torch.as_tensor(np.asarray(frames))
    labels, blinks = _label_tensors(labels, blinks)
    emo, blink = [], []
    for j in range(0, len(frames), batch):
        e, b = critic.heads(frames[j:j + batch])
        emo.append(e.argmax(1))
        blink.append(b > 0)
    emo = torch.cat(emo) if emo else torch.zeros(0, dtype=torch.int64)
    blink = torch.cat(blink) if blink else torch.zeros(0, dtype=torch.bool)
    e, b = labels >= 0, ~torch.isnan(blinks)
    acc = float((emo[e] == labels[e]).float().mean()) if e.any() else float("nan")
    bacc = float((blink[b] == (blinks[b] > 0.5)).float().mean()) if b.any() else float("nan")
    return acc, bacc


def emotion_labels(states: np.ndarray) -> np.ndarray:
    """int64 ``[M]``: each face-state row's emotion (:data:`eartalk.model.face_state.EMOTION_COLS`), -1
    for a row without ground truth (NaN)."""
    s = np.asarray(states)[:, EMOTION_COLS]
    out = s.argmax(1).astype(np.int64) if len(s) else np.zeros(0, np.int64)
    out[np.isnan(s).any(1)] = -1
    return out


def blink_values(states: np.ndarray) -> np.ndarray:
    """float32 ``[M]``: each face-state row's eyelid closure (NaN without ground truth)."""
    return np.asarray(states, np.float32)[:, BLINK_COL].copy()
