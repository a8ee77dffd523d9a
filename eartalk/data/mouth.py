"""The mouth's shape: the contract between speech timing (visemes.py) and the renderer (face.py).

All fields are in [0, 1]. A viseme is a target ``MouthShape``; coarticulation blends targets over
time; the renderer draws whatever shape it is given.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields


@dataclass(frozen=True)
class MouthShape:
    open: float = 0.0     # jaw / lip opening (0 = lips together)
    width: float = 0.5    # lip corner spread (0 = narrow/pursed, 1 = wide smile-like spread)
    round: float = 0.0    # lip rounding / protrusion (O, U, W)
    teeth: float = 0.0    # how much of the teeth shows
    tongue: float = 0.0   # tongue visible (TH, L, D)
    tuck: float = 0.0     # lower lip tucked under upper teeth (F, V)
    press: float = 0.0    # lips pressed together (P, B, M)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"MouthShape.{f.name}={v} is outside [0, 1]")

    def as_tuple(self) -> tuple[float, ...]:
        return astuple(self)


MOUTH_FIELDS = tuple(f.name for f in fields(MouthShape))
