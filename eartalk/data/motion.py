"""Per-frame control tracks (pose, gaze, blink, emotion) for one synthetic clip.

Free controls follow natural idle behaviour:

* head pose: low-pass filtered noise around a per-clip offset, plus occasional larger smooth
  excursions so that a corpus covers the whole range of ``config.CONTROLS``; soft-limited into
  the range with ``tanh`` so it never clips flat;
* gaze: fixations (0.25-1.5 s) joined by fast saccades (1-2 frames);
* blink: 15-20 blinks per minute, each 100-200 ms with a fast close and a slower reopening;
* emotion: 1-3 emotions per clip in segments of 2-5 s, each segment with its own intensity.

A pinned control follows a step-hold timeline instead (see ``controls_track``). All free tracks
are drawn before pins are applied, so pins never change the random stream: the same seed gives
the same free motion with or without pins.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from eartalk.model.config import CONTROLS, EMOTIONS

TRACKS = ("yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink", "emotion", "emotion_intensity")
RANGES: dict[str, tuple[float, float]] = {
    **{k: CONTROLS[k][2] for k in ("yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink")},
    "emotion_intensity": (0.0, 1.0),
}
_CONTINUOUS = ("yaw", "pitch", "roll", "gaze_x", "gaze_y")
_RELEASE_FRAMES = 5        # after a pin is released, continuous controls ease back over 0.2 s


def controls_track(n_frames: int, rng: np.random.Generator, fps: int = 25,
                   pins: dict | None = None) -> dict[str, np.ndarray]:
    """Control tracks for ``n_frames`` frames: float32 arrays, except ``emotion`` (int64 index
    into ``config.EMOTIONS``).

    ``pins`` maps a track name to keyframes ``[(frame, value), ...]``. A value holds from its
    frame until the next keyframe (step-hold); ``None`` makes the control free again from that
    frame. ``emotion`` values may be an index or a name. Frames past the clip are ignored.
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise ValueError(f"n_frames={n_frames!r}: expected a positive int")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps={fps!r}: expected a positive number")
    keyframes = _validate_pins(pins or {})
    n = int(n_frames)

    out = {
        **_pose_tracks(n, rng, fps),
        **_gaze_tracks(n, rng, fps),
        "blink": _blink_track(n, rng, fps),
        **_emotion_tracks(n, rng, fps),
    }
    for name, keys in keyframes.items():
        out[name] = _apply_pins(out[name], keys, name in _CONTINUOUS)
    for name in TRACKS:
        out[name] = out[name].astype(np.int64 if name == "emotion" else np.float32)
    return out


# ------------------------------------------------------------------------------------ free motion
def _smooth_noise(n: int, rng, sigma_frames: float) -> np.ndarray:
    """Unit-variance low-pass Gaussian noise (padded so the ends are as smooth as the middle)."""
    pad = int(3 * sigma_frames) + 1
    x = gaussian_filter1d(rng.standard_normal(n + 2 * pad), sigma_frames)[pad:pad + n]
    # Std of Gaussian-filtered white noise is (2 sqrt(pi) sigma)^-1/2 (for sigma >~ 1 frame).
    return x * np.sqrt(2 * np.sqrt(np.pi) * max(sigma_frames, 1.0))


def _pose_tracks(n: int, rng, fps) -> dict[str, np.ndarray]:
    out = {}
    t = np.arange(n) / fps
    for name, wiggle in (("yaw", 0.18), ("pitch", 0.15), ("roll", 0.12)):
        lo, hi = RANGES[name]
        half = (hi - lo) / 2
        x = rng.uniform(-0.35, 0.35) * half                       # where this clip's head rests
        x = x + wiggle * half * _smooth_noise(n, rng, 0.6 * fps)  # slow sway
        x = x + 0.03 * half * _smooth_noise(n, rng, 0.12 * fps)   # small quick movements
        # Occasional larger excursions (about one per 8 s): a smooth bump to anywhere in range.
        for _ in range(rng.poisson(max(n / fps, 1.0) / 8.0)):
            c, dur = rng.uniform(0, n / fps), rng.uniform(2.0, 4.0)
            target = rng.uniform(-2.0, 2.0) * half                  # tanh(2) ~ 96% of range
            w = np.clip(1 - np.abs(t - c) / (dur / 2), 0, 1)
            w = 0.5 - 0.5 * np.cos(np.pi * w)                      # raised-cosine bump, 0..1
            x = x * (1 - w) + target * w
        out[name] = (lo + hi) / 2 + half * np.tanh(x / half)       # soft limit into the range
    return out


def _gaze_tracks(n: int, rng, fps) -> dict[str, np.ndarray]:
    gx, gy = np.empty(n), np.empty(n)
    cur = np.array([0.0, 0.0])
    f = 0
    while f < n:
        target = np.clip(rng.normal(0.0, [0.45, 0.3]), -1.0, 1.0)
        sac = int(rng.integers(1, 3))                              # saccade: 1-2 frames
        fix = max(1, int(round(rng.uniform(0.25, 1.5) * fps)))     # fixation
        for k in range(sac):
            if f + k < n:
                gx[f + k], gy[f + k] = cur + (target - cur) * (k + 1) / (sac + 1)
        f += sac
        jitter = 0.02 * rng.standard_normal((fix, 2))              # fixational micro-motion
        for k in range(fix):
            if f + k < n:
                gx[f + k], gy[f + k] = np.clip(target + jitter[k], -1, 1)
        f += fix
        cur = target
    return {"gaze_x": gx, "gaze_y": gy}


def _blink_track(n: int, rng, fps) -> np.ndarray:
    """Blinks as a renewal process; each peaks (fully closed) exactly on a frame."""
    rate = rng.uniform(15.0, 20.0) / 60.0                          # blinks per second
    refractory = 0.6                                               # s: no double blinks
    out = np.zeros(n)
    t = rng.uniform(0, 1 / rate)
    while True:
        peak = int(round(t * fps))
        if peak >= n + 3:
            break
        dur = rng.uniform(0.10, 0.20)
        close, reopen = 0.35 * dur, 0.65 * dur                     # fast close, slower reopening
        for f in range(max(0, peak - 4), min(n, peak + 6)):
            dt = (f - peak) / fps
            if -close < dt <= 0:
                v = np.cos(0.5 * np.pi * dt / close) ** 2
            elif 0 < dt < reopen:
                v = np.cos(0.5 * np.pi * dt / reopen) ** 2
            else:
                continue
            out[f] = max(out[f], v)
        t += refractory + rng.exponential(1 / rate - refractory)
    return out


def _emotion_tracks(n: int, rng, fps) -> dict[str, np.ndarray]:
    k = int(rng.integers(1, 4))
    chosen = rng.choice(len(EMOTIONS), size=k, replace=False)
    emo, inten = np.empty(n, np.int64), np.empty(n)
    f, prev = 0, -1
    while f < n:
        options = [e for e in chosen if e != prev] or list(chosen)
        e = int(rng.choice(options))
        seg = max(1, int(round(rng.uniform(2.0, 5.0) * fps)))
        emo[f:f + seg] = e
        inten[f:f + seg] = 1.0 if EMOTIONS[e] == "neutral" else rng.uniform(0.6, 1.0)
        f, prev = f + seg, e
    return {"emotion": emo, "emotion_intensity": inten}


# ------------------------------------------------------------------------------------ pins
def _validate_pins(pins) -> dict[str, list[tuple[int, object]]]:
    if not isinstance(pins, dict):
        raise ValueError(f"pins must be a dict of control name -> [(frame, value), ...], "
                         f"got {type(pins).__name__}")
    out = {}
    for name, keys in pins.items():
        if name not in TRACKS:
            raise ValueError(f"unknown control {name!r} in pins; valid names: {list(TRACKS)}")
        if not isinstance(keys, (list, tuple)):
            raise ValueError(f"pins[{name!r}] must be a list of (frame, value) keyframes")
        clean = []
        for kf in keys:
            if not isinstance(kf, (list, tuple)) or len(kf) != 2:
                raise ValueError(f"pins[{name!r}]: keyframe {kf!r} is not a (frame, value) pair")
            frame, value = kf
            if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or frame < 0:
                raise ValueError(f"pins[{name!r}]: frame {frame!r} must be an int >= 0")
            clean.append((int(frame), None if value is None else _check_value(name, value)))
        frames = [f for f, _ in clean]
        if len(set(frames)) != len(frames):
            raise ValueError(f"pins[{name!r}]: duplicate keyframe frames {sorted(frames)}")
        out[name] = sorted(clean, key=lambda kv: kv[0])
    return out


def _check_value(name: str, value):
    if name == "emotion":
        if isinstance(value, str):
            if value not in EMOTIONS:
                raise ValueError(f"emotion pin {value!r}: expected one of {EMOTIONS} or an index")
            return EMOTIONS.index(value)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value < len(EMOTIONS):
            raise ValueError(f"emotion pin {value!r}: expected an index in [0, {len(EMOTIONS) - 1}] "
                             f"or a name in {EMOTIONS}")
        return int(value)
    lo, hi = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not lo <= value <= hi:
        raise ValueError(f"{name} pin value {value!r} is outside the range [{lo}, {hi}]")
    return float(value)


def _apply_pins(free: np.ndarray, keys, ease: bool) -> np.ndarray:
    out = free.astype(float).copy()
    n = len(out)
    prev = None
    for i, (frame, value) in enumerate(keys):
        if frame >= n:
            break
        end = keys[i + 1][0] if i + 1 < len(keys) else n
        end = min(end, n)
        if value is not None:
            out[frame:end] = value
        elif ease and prev is not None:
            # Released: ease from the last pinned value back onto the free track.
            held = out[frame - 1]
            m = min(_RELEASE_FRAMES, end - frame)
            w = (np.arange(1, m + 1) / (_RELEASE_FRAMES + 1))
            out[frame:frame + m] = held * (1 - w) + free[frame:frame + m] * w
        prev = value
    return out
