"""Frame Condition In-Context: control values -> the C condition tokens of one frame.

One token (row) per control kind, in ``CONTROL_KINDS`` order. Row layout (``COND_DIM`` = 16):
slots 0..10 hold values (each kind writes only its own slots, see ``config.CONTROLS``), slot 11 is
unused, slots 12..15 are the kind's one-hot (present in every row, pinned or free).

- Numeric values are divided by the largest magnitude of their range: pose/gaze land in [-1, 1],
  blink in [0, 1], and 0 is always neutral (head straight, eyes centred, eyelids open).
- A kind is *pinned* (mask True) as soon as any of its controls is given; its unspecified controls
  take 0, i.e. neutral (``yaw=10`` alone pins pose with pitch = roll = 0). A kind with no given
  control is *free* (mask False, values zero): the model picks it. ``None`` means "not given", so
  ``control(yaw=None)`` releases pose (if no other pose control is given).
- Emotion is a one-hot over ``EMOTIONS`` in slots 6..10.
"""
from __future__ import annotations

import numpy as np

from eartalk.model.config import COND_DIM, CONTROL_KINDS, CONTROLS, EMOTIONS

C = len(CONTROL_KINDS)
KIND_SLOT0 = 12  # the kind one-hot starts here
_KIND_INDEX = {k: i for i, k in enumerate(CONTROL_KINDS)}
# the controls that take a number (every one but emotion), in CONTROLS order
NUMERIC_CONTROLS = {n: spec for n, spec in CONTROLS.items() if not isinstance(spec[2][0], str)}


def _scale(name: str) -> float:
    lo, hi = CONTROLS[name][2]
    return max(abs(lo), abs(hi))


def _blank(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    cond = np.zeros((*shape, C, COND_DIM), dtype=np.float32)
    for i in range(C):
        cond[..., i, KIND_SLOT0 + i] = 1.0
    return cond, np.zeros((*shape, C), dtype=bool)


def _check_name(name: str):
    if name not in CONTROLS:
        raise ValueError(f"unknown control {name!r}; valid controls are {sorted(CONTROLS)}")


def _range_error(name: str, value) -> ValueError:
    lo, hi = CONTROLS[name][2]
    return ValueError(f"control {name}={value} is outside its range [{lo}, {hi}]")


def encode_controls(values: dict[str, float | str | None]) -> tuple[np.ndarray, np.ndarray]:
    """{control name: value or None} -> (cond float32 [C, Dc], cond_mask bool [C])."""
    cond, mask = _blank(())
    for name, value in values.items():
        _check_name(name)
        if value is None:
            continue
        kind, slot, rng = CONTROLS[name]
        k = _KIND_INDEX[kind]
        if name in NUMERIC_CONTROLS:
            if isinstance(value, str) or not np.isscalar(value):
                raise TypeError(f"control {name} takes a number, got {value!r}")
            if not rng[0] <= float(value) <= rng[1]:      # also rejects NaN
                raise _range_error(name, value)
            cond[k, slot] = float(value) / _scale(name)
        else:
            if value not in EMOTIONS:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(EMOTIONS)}")
            cond[k, slot + EMOTIONS.index(value)] = 1.0
        mask[k] = True
    return cond, mask


def decode_controls(cond: np.ndarray, cond_mask: np.ndarray) -> dict[str, float | str]:
    """Inverse of ``encode_controls`` for one frame: the pinned kinds' controls (neutral-filled)."""
    out: dict[str, float | str] = {}
    for name, (kind, slot, _) in CONTROLS.items():
        k = _KIND_INDEX[kind]
        if not cond_mask[k]:
            continue
        if name in NUMERIC_CONTROLS:
            out[name] = float(cond[k, slot]) * _scale(name)
        else:
            out[name] = EMOTIONS[int(np.argmax(cond[k, slot:slot + len(EMOTIONS)]))]
    return out


def controls_from_gt(gt: dict[str, np.ndarray], drop_prob: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ground truth -> (cond float32 [T, C, Dc], cond_mask bool [T, C]) for training.

    ``gt[name]`` is a [T] array: numbers in the control's range (NaN = not given at that frame),
    or for ``emotion`` indices into ``EMOTIONS`` (-1 = not given) or the emotion names. Kinds absent
    from ``gt`` are free everywhere. Each pinned (frame, kind) is then freed independently with
    probability ``drop_prob``, so the model learns every pinned/free pattern, switching at any frame.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
    if not gt:
        raise ValueError("controls_from_gt needs at least one control to know the number of frames")
    lengths = {name: np.shape(a) for name, a in gt.items()}
    T = None
    for name, shape in lengths.items():
        _check_name(name)
        if len(shape) != 1:
            raise ValueError(f"gt[{name!r}] must be a [T] array, got shape {shape}")
        T = shape[0] if T is None else T
        if shape[0] != T:
            raise ValueError(f"gt arrays have different lengths: { {n: s[0] for n, s in lengths.items()} }")
    cond, mask = _blank((T,))
    for name, arr in gt.items():
        kind, slot, spec = CONTROLS[name]
        k = _KIND_INDEX[kind]
        if name in NUMERIC_CONTROLS:
            a = np.asarray(arr, dtype=np.float64)
            given = ~np.isnan(a)
            bad = given & ((a < spec[0]) | (a > spec[1]))
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"frame {i}: {_range_error(name, a[i])}")
            cond[given, k, slot] = (a[given] / _scale(name)).astype(np.float32)
        else:
            a = np.asarray(arr)
            if a.dtype.kind in "US" or a.dtype == object:
                unknown = sorted({str(e) for e in a if e is not None and e not in EMOTIONS})
                if unknown:
                    raise ValueError(f"unknown {name} {unknown}; expected one of {list(EMOTIONS)}")
                idx = np.array([-1 if e is None else EMOTIONS.index(e) for e in a])
            else:
                idx = a.astype(np.int64)
                if ((idx < -1) | (idx >= len(EMOTIONS))).any():
                    raise ValueError(f"{name} indices must be in [-1, {len(EMOTIONS) - 1}] "
                                     f"(-1 = not given; {list(EMOTIONS)})")
            given = idx >= 0
            cond[np.nonzero(given)[0], k, slot + idx[given]] = 1.0
        mask[:, k] |= given
    drop = rng.random(mask.shape) < drop_prob
    mask &= ~drop
    cond[..., :KIND_SLOT0] *= mask[..., None]   # free rows carry no values, as in encode_controls
    return cond, mask
