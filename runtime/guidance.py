"""Audio guidance: classifier-free guidance of a frame's logits by its speech, against silence.

A session opened with ``guidance = s != 1`` runs each frame's step twice in the engine's one
batched call: once as usual and once with the frame's audio tokens replaced by silence's (same
previous frame, controls and cached history). Its logits are then

    silent + s * (speech - silent)

so whatever the speech changes in the frame (the mouth, above all) is pushed s times as far from
what the face does in silence, while the tokens the speech does not touch (background, hair,
identity) keep their logits. In silence both rows agree and nothing changes. It needs no training
of its own: silence is the audio every stream starts from, so the model has learnt it
(Ho & Salimans 2022 guide with a dropped condition; here silence is that condition).

Measured on the shipped ``tiny`` (docs/model-history.md, 8 validation clips): mouth-openness r 0.72 /
0.78 / 0.77 / 0.76 and viseme accuracy 0.40 / 0.51 / 0.48 / 0.44 at ``s`` = 1 / 1.5 / 2 / 3, while
PSNR falls (23.2 / 23.1 / 23.0 / 22.7 dB): the default is 1.5. The guided rows cost one more row of the step per
session (``bench/runtime.py``); the cache page is the speech row's.

The engine (``scheduler.Engine``) adds the rows and combines the logits; this module holds the
arithmetic and the silence tokens.
"""
from __future__ import annotations

import math

import numpy as np

from eartalk.model.audio import SILENCE_LOG_MEL

__all__ = ["DEFAULT_GUIDANCE", "MAX_GUIDANCE", "check_guidance", "resolve_guidance", "guide", "silence_audio"]

DEFAULT_GUIDANCE = 1.5     # measured best of 1, 1.5, 2, 3 on the shipped tiny (docs/model-history.md)
MAX_GUIDANCE = 8.0         # far past any useful scale: a larger one is almost surely a typo


def check_guidance(guidance) -> float:
    """``guidance`` as a float, or ValueError saying what is accepted (1 = off)."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(guidance)) or not 0.0 <= float(guidance) <= MAX_GUIDANCE:
        raise ValueError(f"guidance must be a number in [0, {MAX_GUIDANCE:g}] (1 = off, {DEFAULT_GUIDANCE:g} = "
                         f"the default), got {guidance!r}")
    return float(guidance)


def resolve_guidance(guidance) -> float:
    """A caller's ``guidance`` (None = :data:`DEFAULT_GUIDANCE`) as a checked float."""
    return check_guidance(DEFAULT_GUIDANCE if guidance is None else guidance)


def guide(speech: np.ndarray, silent: np.ndarray, scale) -> np.ndarray:
    """Guided logits ``silent + scale * (speech - silent)``; ``scale`` broadcasts (one per row)."""
    speech, silent = np.asarray(speech, np.float32), np.asarray(silent, np.float32)
    if speech.shape != silent.shape:
        raise ValueError(f"speech logits {speech.shape} and silent logits {silent.shape} differ in shape")
    return silent + np.asarray(scale, np.float32) * (speech - silent)


def silence_audio(backend) -> np.ndarray:
    """float32 [A, F]: the audio tokens of a silent frame, as ``backend``'s audio encoder gives them
    (the same values a stream reads before its speech starts)."""
    cfg = backend.cfg
    window = np.full((1, backend.receptive_field, cfg.n_mels), SILENCE_LOG_MEL, np.float32)
    return np.asarray(backend.encode_audio(window), np.float32)[0]
