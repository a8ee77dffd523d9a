"""Few-step refinement of one frame's tokens (models trained with ``ModelConfig.refine``).

The first pass of a step predicts all N tokens of a frame at once, each from the context alone:
two neighbouring tokens of a mouth cannot agree on how open it is. With ``refine = R`` a frame
takes R more passes of the same step (same context, so the cache page is that of the first pass):
after each pass the most confident tokens are kept as a *known draft*, which the next pass reads in
its query slots, and the rest are predicted again (MaskGIT's schedule, Chang et al. 2022). After pass
j of R + 1, ``floor(N * cos(pi/2 * j / (R + 1)))`` tokens are still hidden; after the last, none.

The engine (``scheduler.Engine._step``) runs the passes; this module holds the schedule.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["hidden_after", "grow_known", "confidence"]


def hidden_after(done: int, passes: int, n: int) -> int:
    """Tokens of ``n`` still hidden after pass ``done`` (1-based) of ``passes``."""
    if not (isinstance(passes, int) and passes >= 1 and 1 <= done <= passes):
        raise ValueError(f"pass {done} of {passes}: expected 1 <= pass <= passes")
    return int(math.floor(n * math.cos(0.5 * math.pi * done / passes) + 1e-9)) if done < passes else 0


def confidence(logits: np.ndarray) -> np.ndarray:
    """[..., N, V] logits -> [..., N] probability of each token's most likely code."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return 1.0 / np.exp(z).sum(axis=-1)


def grow_known(known: np.ndarray, conf: np.ndarray, n_hidden: int) -> np.ndarray:
    """``known`` bool [N] plus the most confident hidden tokens (by ``conf`` [N]) until only
    ``n_hidden`` are hidden. Known tokens stay known; ties go to the lower index (stable)."""
    known = np.asarray(known, bool)
    if known.shape != np.shape(conf) or known.ndim != 1:
        raise ValueError(f"known {known.shape} and conf {np.shape(conf)} must be the same 1-D shape")
    hidden = np.flatnonzero(~known)
    if not 0 <= n_hidden <= hidden.size:
        raise ValueError(f"{hidden.size} tokens are hidden; cannot leave {n_hidden} hidden")
    order = hidden[np.argsort(-np.asarray(conf)[hidden], kind="stable")]
    out = known.copy()
    out[order[:hidden.size - n_hidden]] = True
    return out
