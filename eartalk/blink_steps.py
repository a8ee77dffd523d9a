"""A blink pinned as a step, as a user pins one: is it obeyed on the frame the pin applies to?

``eartalk eval``'s pinned run pins the clip's own blink track, which closes and opens over two or
three frames (values like 0.3, 1.0, 0.6): its "frame after a switch" is the frame where that
smooth track crosses 0.5, where a frame at 0.52 counts as shut. A user pins ``blink: 1`` and later
``blink: 0``. This module makes such a track (:func:`blink_steps`: eyes shut for 1 to 8 frames,
open 22 frames between) and scores the probe's eyes-closed reading on it (:func:`step_metrics`):
the first frame of each shut pulse, the first frame after it, and every shut frame.
"""
from __future__ import annotations

import numpy as np

__all__ = ["PULSES", "GAP", "START", "blink_steps", "step_metrics"]

PULSES = (2, 4, 8, 3, 1, 6)      # frames shut, in turn: a quick blink up to a third of a second
GAP = 22                         # frames open between pulses: longer than any trained blink
START = 10                       # the first pulse's frame: after the portrait's first frames


def blink_steps(n: int) -> np.ndarray:
    """float64 ``[n]``: 0 (open) with 1 (shut) for ``PULSES[k % 6]`` frames from frame ``START``,
    then every ``GAP`` open frames. The first and the last frame are always open, so clips'
    tracks can be joined end to end without a false step across the join."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"blink_steps: n={n!r}: expected a frame count >= 0")
    out = np.zeros(int(n))
    at, k = START, 0
    while at + PULSES[k % len(PULSES)] <= n - 1:
        out[at:at + PULSES[k % len(PULSES)]] = 1.0
        at += PULSES[k % len(PULSES)] + GAP
        k += 1
    return out


def step_metrics(closed: np.ndarray, steps: np.ndarray) -> dict:
    """The probe's eyes-closed reading ``closed`` (0/1 per frame) on a stepped pin ``steps``
    (:func:`blink_steps`, or several clips' joined) -> the share of pulses whose first frame reads
    shut, of pulses whose first open frame after reads open, and of all shut frames that read shut;
    NaN where there is none."""
    closed, steps = np.asarray(closed).astype(bool), np.asarray(steps) >= 0.5
    if closed.shape != steps.shape or closed.ndim != 1:
        raise ValueError(f"step_metrics: readings {closed.shape} and steps {steps.shape}: expected two equal 1-D tracks")
    prev = np.concatenate([[False], steps[:-1]])
    onset, offset = steps & ~prev, ~steps & prev

    def share(mask, want):
        return float(np.mean(closed[mask] == want)) if mask.any() else float("nan")
    return {"blink_step_shut_accuracy": share(onset, True), "blink_step_open_accuracy": share(offset, False),
            "blink_step_shut_frames": share(steps, True), "blink_step_pulses": int(onset.sum())}
