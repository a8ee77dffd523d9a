"""Where a synthetic frame shows its expression: the frame against the same head in the same pose
with a neutral face (mouth closed, eyes open and ahead, no emotion), re-rendered.

Training only: the tokenizer's loss weights these pixels (``VQTokenizer.loss(expr=...)``). Why: the
lips, teeth, eyelids and brows are a few percent of a 128x128 frame, and a tokenizer trained on
whole-frame error spent its capacity on pose and background; its reconstructions lost the visemes
and emotions the transformer is asked to produce (probe on tokenizer reconstructions, 2026-12-04:
viseme accuracy 0.30 against 0.905 on the frames themselves). Nothing at inference reads the map;
a clip without ground truth (a user's video) has none, and its pixels are weighted as before.
"""
from __future__ import annotations

import numpy as np

from eartalk.data import face
from eartalk.data.identity import Identity
from eartalk.data.mouth import MouthShape

POSE = ("yaw", "pitch", "roll")
# channel-summed absolute difference (0..765) that counts as fully "expression"; the anger flush
# (a tint over the whole face) stays around a third of it, the lips and eyes saturate
FULL_DIFF = 64.0


def neutral_frames(identity: dict, gt: dict, at: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[len(at), size, size, 3]``: frames ``at`` re-rendered with their pose only."""
    ident = Identity.from_dict(identity)
    out = np.empty((len(at), size, size, 3), np.uint8)
    for j, t in enumerate(at):
        st = face.FaceState(mouth=MouthShape(), **{k: float(gt[k][t]) for k in POSE})
        out[j] = face.render(ident, st, size)
    return out


def expression_maps(clip, at: np.ndarray) -> np.ndarray | None:
    """uint8 ``[len(at), H, W]`` at the clip's own size (255 = fully expression, dilated by one
    pixel so the edge of a moving lip counts on both sides), or None when the clip has no
    identity or pose ground truth (user videos)."""
    ident = clip.identity
    if ident is None or clip.gt is None or any(k not in clip.gt for k in POSE):
        return None
    frames = np.asarray(clip.frames)
    at = np.asarray(at, np.int64)
    if len(at) and (at.min() < 0 or at.max() >= len(frames)):
        raise ValueError(f"clip {clip.clip_id}: frame indices {at.min()}..{at.max()} outside 0..{len(frames) - 1}")
    return maps_of(frames[at], neutral_frames(ident, clip.gt, at, frames.shape[1]))


def maps_of(frames: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W]``: the expression maps of ``frames`` against their ``neutral`` renders
    (:func:`neutral_frames` of the same states), for frames rendered rather than read from a clip."""
    diff = np.abs(frames.astype(np.int16) - neutral).sum(-1)
    m = np.minimum(diff / FULL_DIFF, 1.0)
    pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
    h, w = m.shape[1:]
    dil = np.max([pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)
    return np.round(dil * 255).astype(np.uint8)
