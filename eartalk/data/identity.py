"""Procedural identities for the synthetic talking-face corpus.

An ``Identity`` is a frozen bag of appearance parameters (face shape, colours, hair style,
accessories, background) that ``face.render`` turns into pixels. It is sampled from a seeded
``numpy.random.Generator``, serialises to plain JSON types with an exact round trip, and exposes
its numbers as one vector (``identity_vector``) so that identity is ground truth like pose is.

Colours are RGB triples of floats in [0, 1]. Categorical choices are small ints; their names are
in ``HAIR_STYLES``, ``GLASSES`` and ``HEADWEAR``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

HAIR_STYLES = ("bald", "buzz", "short", "side_part", "long", "bun", "curly")
GLASSES = ("none", "round", "square")
HEADWEAR = ("none", "headband", "beanie")

Color = tuple[float, float, float]

# Skin tones from light to deep; a sample interpolates between neighbours, so the range is
# continuous and every tone is plausible.
_SKIN_RAMP = np.array([
    (0.98, 0.87, 0.78), (0.94, 0.78, 0.66), (0.86, 0.66, 0.52),
    (0.74, 0.53, 0.38), (0.58, 0.39, 0.27), (0.42, 0.27, 0.18), (0.30, 0.19, 0.13),
])
_HAIR_COLOURS = np.array([
    (0.08, 0.06, 0.05), (0.22, 0.14, 0.08), (0.40, 0.26, 0.14), (0.72, 0.56, 0.32),
    (0.90, 0.80, 0.55), (0.60, 0.24, 0.10), (0.62, 0.62, 0.64), (0.92, 0.92, 0.92),
    (0.20, 0.35, 0.75), (0.85, 0.35, 0.60),   # dyed: rare, see weights below
])
_HAIR_WEIGHTS = np.array([20, 18, 14, 10, 8, 7, 6, 4, 1.5, 1.5])
_EYE_COLOURS = np.array([
    (0.30, 0.18, 0.09), (0.45, 0.30, 0.15), (0.22, 0.45, 0.70), (0.30, 0.55, 0.35),
    (0.50, 0.55, 0.58), (0.55, 0.45, 0.20),
])
_LIP_BASE = np.array((0.78, 0.22, 0.28))

# Numeric (float) fields and their sampling ranges: also the documented valid ranges.
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "face_width": (0.86, 1.10),     # half-width of the face, head units
    "face_height": (1.18, 1.42),    # half-height / half-width
    "jaw": (0.0, 1.0),              # 0 = round jaw, 1 = square jaw
    "chin": (0.0, 1.0),             # 0 = broad chin, 1 = pointed (V-shaped) chin
    "eye_size": (0.82, 1.22),
    "eye_spacing": (0.34, 0.44),    # eye centre distance from the midline, head units
    "eye_height": (-0.10, 0.04),    # eye line, head units (+ = lower)
    "brow_thickness": (0.55, 1.5),
    "brow_arch": (0.0, 1.0),
    "nose_length": (0.75, 1.3),
    "nose_width": (0.75, 1.3),
    "lip_fullness": (0.65, 1.4),
    "mouth_width": (0.82, 1.18),
    "ear_size": (0.8, 1.2),
    "bg_angle": (0.0, 360.0),       # gradient direction, degrees
}
COLOR_FIELDS = ("skin", "hair_color", "eye_color", "brow_color", "lip_color", "bg_color1",
                "bg_color2", "shirt_color", "glasses_color", "earring_color", "headwear_color")
INT_FIELDS: dict[str, int] = {      # name -> number of choices
    "hair_style": len(HAIR_STYLES), "glasses": len(GLASSES), "earrings": 2,
    "headwear": len(HEADWEAR),
}


def _clip01(c) -> Color:
    return tuple(float(min(1.0, max(0.0, x))) for x in c)


@dataclass(frozen=True)
class Identity:
    """Appearance parameters of one synthetic person (see module docstring for units)."""

    face_width: float
    face_height: float
    jaw: float
    chin: float
    skin: Color
    hair_style: int
    hair_color: Color
    eye_color: Color
    eye_size: float
    eye_spacing: float
    eye_height: float
    brow_thickness: float
    brow_arch: float
    brow_color: Color
    nose_length: float
    nose_width: float
    lip_color: Color
    lip_fullness: float
    mouth_width: float
    ear_size: float
    bg_color1: Color
    bg_color2: Color
    bg_angle: float
    shirt_color: Color
    glasses: int
    glasses_color: Color
    earrings: int
    earring_color: Color
    headwear: int
    headwear_color: Color

    def __post_init__(self):
        for name, (lo, hi) in FLOAT_RANGES.items():
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (lo <= v <= hi):
                raise ValueError(f"Identity.{name}={v!r}: expected a number in [{lo}, {hi}]")
        for name, n in INT_FIELDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not (0 <= v < n):
                raise ValueError(f"Identity.{name}={v!r}: expected an int in [0, {n - 1}]")
        for name in COLOR_FIELDS:
            v = getattr(self, name)
            if (not isinstance(v, tuple) or len(v) != 3
                    or not all(isinstance(x, (int, float)) and 0.0 <= x <= 1.0 for x in v)):
                raise ValueError(f"Identity.{name}={v!r}: expected an RGB tuple of 3 floats in [0, 1]")

    # ------------------------------------------------------------------ sampling
    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Identity":
        """Draw a random identity; deterministic for a given generator state."""
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        u = lambda name: float(rng.uniform(*FLOAT_RANGES[name]))  # noqa: E731

        t = rng.uniform(0, len(_SKIN_RAMP) - 1)
        i = int(t)
        j = min(i + 1, len(_SKIN_RAMP) - 1)
        skin = (1 - (t - i)) * _SKIN_RAMP[i] + (t - i) * _SKIN_RAMP[j]
        skin = skin * rng.uniform(0.95, 1.05, 3)          # small hue jitter per channel

        hair = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_WEIGHTS / _HAIR_WEIGHTS.sum())]
        hair = hair * rng.uniform(0.9, 1.1, 3)
        # Brows follow the hair but darker; very light hair still gets visible brows.
        brow = np.minimum(hair * rng.uniform(0.55, 0.85), 0.45)
        # Lips: a strong red mixed into the skin, so that they stay legible on every skin tone.
        lip = 0.45 * skin + 0.55 * _LIP_BASE * rng.uniform(0.8, 1.1, 3)
        eye = _EYE_COLOURS[rng.integers(len(_EYE_COLOURS))] * rng.uniform(0.85, 1.15, 3)

        # Backgrounds: a muted base colour and a lighter/darker companion for the gradient.
        bg1 = rng.uniform(0.15, 0.95, 3)
        bg2 = np.clip(bg1 * rng.uniform(0.6, 1.3) + rng.normal(0, 0.08, 3), 0, 1)
        shirt = rng.uniform(0.05, 0.9, 3)

        hair_style = int(rng.choice(len(HAIR_STYLES), p=[0.07, 0.13, 0.22, 0.18, 0.2, 0.1, 0.1]))
        return cls(
            face_width=u("face_width"), face_height=u("face_height"), jaw=u("jaw"), chin=u("chin"),
            skin=_clip01(skin), hair_style=hair_style, hair_color=_clip01(hair),
            eye_color=_clip01(eye), eye_size=u("eye_size"), eye_spacing=u("eye_spacing"),
            eye_height=u("eye_height"), brow_thickness=u("brow_thickness"),
            brow_arch=u("brow_arch"), brow_color=_clip01(brow), nose_length=u("nose_length"),
            nose_width=u("nose_width"), lip_color=_clip01(lip), lip_fullness=u("lip_fullness"),
            mouth_width=u("mouth_width"), ear_size=u("ear_size"), bg_color1=_clip01(bg1),
            bg_color2=_clip01(bg2), bg_angle=u("bg_angle"), shirt_color=_clip01(shirt),
            glasses=int(rng.choice(3, p=[0.65, 0.18, 0.17])),
            glasses_color=_clip01(rng.uniform(0.0, 0.6, 3)),
            earrings=int(rng.random() < 0.25),
            earring_color=_clip01(rng.choice([(0.95, 0.8, 0.3), (0.85, 0.85, 0.9), (0.9, 0.2, 0.3)])),
            headwear=int(rng.choice(3, p=[0.8, 0.1, 0.1])),
            headwear_color=_clip01(rng.uniform(0.05, 0.95, 3)),
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """JSON-safe dict (floats, ints, lists); ``from_dict`` restores an equal Identity."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = [float(x) for x in v] if f.name in COLOR_FIELDS else (
                int(v) if f.name in INT_FIELDS else float(v))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Identity":
        if not isinstance(d, dict):
            raise ValueError(f"Identity.from_dict expects a dict, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        missing, unknown = set(names) - set(d), set(d) - set(names)
        if missing or unknown:
            raise ValueError(f"Identity dict: missing fields {sorted(missing)}, unknown fields "
                             f"{sorted(unknown)}; expected exactly {names}")
        kw = {}
        for n in names:
            v = d[n]
            if n in COLOR_FIELDS:
                if not isinstance(v, (list, tuple)) or len(v) != 3:
                    raise ValueError(f"Identity.{n}={v!r}: expected a list of 3 floats")
                kw[n] = tuple(float(x) for x in v)
            elif n in INT_FIELDS:
                kw[n] = v          # validated (int in range) by __post_init__
            else:
                # JSON may give an int for a whole-valued float; bools are not numbers here.
                kw[n] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        return cls(**kw)

    def identity_vector(self) -> np.ndarray:
        """All parameters as one float32 vector: floats and colour channels in field order,
        categorical fields one-hot (so distances between identities are meaningful)."""
        parts: list[float] = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in COLOR_FIELDS:
                parts.extend(v)
            elif f.name in INT_FIELDS:
                one_hot = [0.0] * INT_FIELDS[f.name]
                one_hot[v] = 1.0
                parts.extend(one_hot)
            else:
                parts.append(v)
        return np.asarray(parts, dtype=np.float32)
