"""eSpeak phonemes -> visemes -> per-frame mouth shapes (with coarticulation).

Viseme set. Eleven classes, merged until every pair differs in something the renderer draws at
128x128 (open, width, rounding, teeth, tongue, tucked lip, pressed lips):

    sil  rest, lips together                     PP  p b m: lips pressed shut
    FF   f v: lower lip under the upper teeth    TH  T D (and Caribbean dental t[ d[): tongue out
    DD   t d n l s z k g N h ...: small opening, teeth and a little tongue (velars, /h/ and the
         sibilants look alike from the front, so they share a class)
    CH   S Z tS dZ r: lips pushed forward with teeth showing
    AA   open vowels (a, aa, A:, V, aI, aU, ...)   E  mid vowels and schwa (E, eI, e@, @, 3 ...)
    I    close spread vowels and j (i, i:, I ...)  O  rounded open vowels (0, O:, oU, OI ...)
    U    rounded close vowels and w (u:, U, w)

Coarticulation (``frame_track``). Each phoneme segment j has its class target T_j and pulls on
nearby time with a Gaussian around its centre c_j (sigma = 0.5*duration + 20 ms) scaled by a
per-class dominance s (lip closure and rounding dominate, velars and /h/ are weak):

    B(t) = sum_j s_j g_j(t) T_j / sum_j s_j g_j(t)
    shape(t) = a * T_cur(t) + (1 - a) * B(t)

where cur(t) is the segment at the frame centre and ``a`` its rigidity (0.6; 0.8 for FF; 1.0 for
PP so bilabials always reach full closure, and 1.0 for silence so a silent frame is the closed rest
mouth; the frames either side still anticipate and release it through B). With a > 0.5 the shape is a convex blend that stays
nearer the labelled class's target than any other, so label and picture agree, and every field
stays in [0, 1]. A bilabial so short that no frame centre falls inside it takes the nearest
frame, so every /p b m/ in the audio gets a closed-lips frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mouth import MOUTH_FIELDS, MouthShape
from .speech import SAMPLE_RATE, Utterance

VISEMES: tuple[str, ...] = ("sil", "PP", "FF", "TH", "DD", "CH", "AA", "E", "I", "O", "U")
VISEME_INDEX = {v: i for i, v in enumerate(VISEMES)}

TARGETS: dict[str, MouthShape] = {
    "sil": MouthShape(open=0.00, width=0.50),
    "PP": MouthShape(open=0.00, width=0.42, press=1.0),
    "FF": MouthShape(open=0.12, width=0.50, teeth=0.9, tuck=1.0),
    "TH": MouthShape(open=0.30, width=0.55, teeth=0.6, tongue=1.0),
    "DD": MouthShape(open=0.20, width=0.60, teeth=0.8, tongue=0.3),
    "CH": MouthShape(open=0.22, width=0.25, round=0.7, teeth=0.8),
    "AA": MouthShape(open=0.95, width=0.60, teeth=0.4, tongue=0.2),
    "E": MouthShape(open=0.55, width=0.72, teeth=0.5, tongue=0.1),
    "I": MouthShape(open=0.25, width=1.00, teeth=0.6),
    "O": MouthShape(open=0.65, width=0.30, round=0.8, teeth=0.2),
    "U": MouthShape(open=0.15, width=0.10, round=1.0),
}
# Temporal dominance (how far a class's shape reaches into its neighbours) and rigidity (how much
# of its own target a class keeps whatever the neighbours are): see the module docstring.
DOMINANCE = {"sil": 1.0, "PP": 2.0, "FF": 1.5, "TH": 1.2, "DD": 0.6, "CH": 1.0, "AA": 1.0,
             "E": 1.0, "I": 1.0, "O": 1.2, "U": 1.5}
RIGIDITY = {v: 0.6 for v in VISEMES} | {"sil": 1.0, "PP": 1.0, "FF": 0.8}

# Base eSpeak (English) mnemonics. Variants the voices emit (t#, t2, @2, @5, aI2, i@3, VR, w#,
# r-, ...) resolve to the longest base that prefixes them; see ``viseme_of``.
PHONEME_VISEME: dict[str, str] = {
    # pauses
    "_": "sil",
    # bilabials, labiodentals, dentals
    "p": "PP", "b": "PP", "m": "PP",
    "f": "FF", "v": "FF",
    "T": "TH", "D": "TH", "t[": "TH", "d[": "TH",
    # alveolars, velars, glottals, sibilants: all the small "DD" opening
    "t": "DD", "d": "DD", "n": "DD", "l": "DD", "s": "DD", "z": "DD",
    "k": "DD", "g": "DD", "N": "DD", "h": "DD", "x": "DD", "?": "DD",
    # post-alveolars and r: protruded lips
    "S": "CH", "Z": "CH", "tS": "CH", "dZ": "CH", "r": "CH", "*": "CH",
    # glides
    "j": "I", ";": "I", "w": "U", "W": "U",
    # open vowels
    "a": "AA", "aa": "AA", "A": "AA", "V": "AA", "aI": "AA", "aU": "AA",
    # mid vowels and the reduced ones (a# is a schwa-like reduced /a/)
    "E": "E", "e": "E", "eI": "E", "e@": "E", "@": "E", "3": "E", "a#": "E",
    # close spread vowels
    "i": "I", "I": "I",
    # rounded vowels
    "0": "O", "O": "O", "o": "O", "oU": "O", "OI": "O",
    "u": "U", "U": "U",
}
_STRESS = "'," + "%="  # stress / emphasis prefixes eSpeak puts on phoneme mnemonics


def normalize(mnemonic: str) -> str:
    """The mnemonic without stress marks; every pause (``_``, ``_:``, ``_!`` ...) becomes ``_``."""
    if not isinstance(mnemonic, str):
        raise ValueError(f"phoneme mnemonic must be a string, got {mnemonic!r}")
    p = mnemonic.lstrip(_STRESS)
    return "_" if p.startswith("_") or p == "" else p


def viseme_of(mnemonic: str) -> str:
    """Viseme class name of an eSpeak phoneme mnemonic (stress marks and variant suffixes allowed)."""
    p = normalize(mnemonic)
    for n in range(len(p), 0, -1):  # longest known prefix: "aI@" -> "aI", "t#" -> "t"
        v = PHONEME_VISEME.get(p[:n])
        if v is not None:
            return v
    raise ValueError(f"unknown eSpeak phoneme {mnemonic!r}; expected one starting with one of "
                     f"{sorted(PHONEME_VISEME)}")


def target_array() -> np.ndarray:
    """float32 [len(VISEMES), 7]: each class's target MouthShape, rows in VISEMES order."""
    return np.array([TARGETS[v].as_tuple() for v in VISEMES], dtype=np.float32)


@dataclass
class FrameTrack:
    """Per-frame ground truth for one utterance at ``fps``; frame i is centred at (i + 0.5)/fps."""
    fps: int
    phoneme: list[str]   # normalised phoneme at the frame centre ("_" = silence)
    viseme: np.ndarray   # int64 [T], index into VISEMES
    shape: np.ndarray    # float32 [T, 7], MouthShape fields in MOUTH_FIELDS order

    def __len__(self) -> int:
        return len(self.phoneme)

    @property
    def mouth_open(self) -> np.ndarray:
        return self.shape[:, MOUTH_FIELDS.index("open")]

    @property
    def mouth_width(self) -> np.ndarray:
        return self.shape[:, MOUTH_FIELDS.index("width")]


def frame_track(utt: Utterance, fps: int = 25, n_frames: int | None = None) -> FrameTrack:
    """Per-frame phoneme, viseme and smoothed mouth shape for ``utt``.

    T = ceil(duration * fps) frames, or ``n_frames`` (extra frames are silence; fewer frames cut
    the track, smoothed as if the whole utterance were there).
    """
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    if not utt.phonemes:
        raise ValueError("utt.phonemes is empty; expected the segments from synthesize()")
    natural = -(-len(utt.audio) * int(fps) // SAMPLE_RATE)  # ceil without float rounding
    if n_frames is None:
        n_frames = natural
    elif isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive integer or None, got {n_frames!r}")
    T = max(int(n_frames), natural)

    # Segments, with one trailing silence segment that covers any padding.
    starts = np.array([s for s, _, _ in utt.phonemes], dtype=np.float64)
    ends = np.array([e for _, e, _ in utt.phonemes], dtype=np.float64)
    if np.any(ends < starts) or np.any(starts[1:] < ends[:-1] - 1e-9):
        raise ValueError("utt.phonemes must be ordered, non-overlapping (start, end, name) segments")
    names = [normalize(p) for _, _, p in utt.phonemes]
    t_end = max(T / fps, ends[-1])
    if t_end > ends[-1]:
        starts = np.append(starts, ends[-1])
        ends = np.append(ends, t_end)
        names.append("_")
    vis = np.array([VISEME_INDEX[viseme_of(p)] for p in names], dtype=np.int64)

    # Segment at each frame centre (the last segment whose start is <= the centre).
    centres = (np.arange(T) + 0.5) / fps
    seg = np.clip(np.searchsorted(starts, centres, side="right") - 1, 0, len(names) - 1)

    # Closure guarantee: a bilabial that no frame centre falls in takes the nearest frame.
    pp = VISEME_INDEX["PP"]
    hit = np.zeros(len(names), dtype=bool)
    hit[seg] = True
    for j in np.flatnonzero((vis == pp) & ~hit):
        f = int(np.argmin(np.abs(centres - 0.5 * (starts[j] + ends[j]))))
        if vis[seg[f]] != pp:
            seg[f] = j

    targets = target_array()                                    # [V, 7]
    dom = np.array([DOMINANCE[v] for v in VISEMES])[vis]        # [S]
    rig = np.array([RIGIDITY[v] for v in VISEMES])[vis[seg]]    # [T]
    mid = 0.5 * (starts + ends)
    sigma = 0.5 * (ends - starts) + 0.02
    w = dom[None, :] * np.exp(-0.5 * ((centres[:, None] - mid[None, :]) / sigma[None, :]) ** 2)
    w[np.arange(T), seg] += 1e-6  # never an all-zero row (far from every centre): fall back to own
    blend = (w @ targets[vis]) / w.sum(axis=1, keepdims=True)
    own = targets[vis[seg]]
    shape = rig[:, None] * own + (1.0 - rig[:, None]) * blend
    shape = np.clip(shape, 0.0, 1.0).astype(np.float32)  # clip only removes float round-off

    T_out = int(n_frames)
    return FrameTrack(fps=int(fps), phoneme=[names[j] for j in seg[:T_out]],
                      viseme=vis[seg[:T_out]].copy(), shape=shape[:T_out].copy())
