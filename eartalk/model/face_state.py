"""The face-state vector of a synthetic frame: what the renderer drew, scaled to about [-1, 1].

Training only. The tokenizer ties its codes to this vector (``VQTokenizer.loss(state=...)``) so
that a frame's tokens are a function of the face's state (pose, gaze, blink, emotion, mouth) and
not of sub-pixel detail; the transformer can then predict them from the controls and the audio
instead of copying the previous frame. Nothing at inference reads it: the model still goes from
pixels to tokens to pixels, end to end. Frames without ground truth (the user's own videos) give
NaN rows, which the loss skips.
"""
from __future__ import annotations

import numpy as np

from eartalk.model.conditions import NUMERIC_CONTROLS
from eartalk.model.config import CONTROLS, EMOTIONS

# The renderer's mouth parameters (each in [0, 1]), also taught to the audio encoder (train_gpt).
MOUTH_GT = ("mouth_open", "mouth_width", "round", "teeth", "tongue", "tuck", "press")
_NUMERIC = tuple(NUMERIC_CONTROLS)
# yaw, pitch, roll, gaze_x, gaze_y, blink | emotion one-hot x intensity | mouth parameters
STATE_DIM = len(_NUMERIC) + len(EMOTIONS) + len(MOUTH_GT)
EMOTION_COLS = slice(len(_NUMERIC), len(_NUMERIC) + len(EMOTIONS))   # the emotion one-hot's columns


def face_state(gt: dict | None, n: int) -> np.ndarray:
    """Per-frame ground truth (``Clip.gt``: column -> [T] array) -> float32 ``[n, STATE_DIM]``.

    Controls are divided by the larger end of their range (yaw 30 deg -> 1), mouth parameters kept
    in [0, 1], emotion one-hot scaled by ``emotion_intensity`` (1 where absent). All NaN when ``gt``
    is None or lacks a column (a user video: no ground truth).
    """
    out = np.full((n, STATE_DIM), np.nan, np.float32)
    need = _NUMERIC + ("emotion",) + MOUTH_GT
    if not gt or any(k not in gt for k in need):
        return out
    for j, name in enumerate(_NUMERIC):
        lo, hi = CONTROLS[name][2]
        out[:, j] = np.asarray(gt[name], np.float32)[:n] / max(abs(lo), abs(hi))
    emo = np.asarray(gt["emotion"], np.int64)[:n]
    if emo.min() < 0 or emo.max() >= len(EMOTIONS):
        raise ValueError(f"gt['emotion'] holds {sorted(set(emo.tolist()))}; expected indices 0..{len(EMOTIONS) - 1}")
    inten = np.asarray(gt.get("emotion_intensity", np.ones(n)), np.float32)[:n]
    out[:, EMOTION_COLS] = 0.0
    out[np.arange(n), EMOTION_COLS.start + emo] = inten
    for j, name in enumerate(MOUTH_GT):
        out[:, EMOTION_COLS.stop + j] = np.asarray(gt[name], np.float32)[:n]
    return out
