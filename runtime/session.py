"""One stream's state (:class:`StreamState`) and its user handle (:class:`Session`).

A :class:`StreamState` holds everything of one stream that is not shared: the audio front end
(PCM -> audio tokens per frame, run at push time, batch 1), per-frame loudness for the idle
driver, the controls, the previous frame's tokens, the decoder reference, the sampler and the
queue of finished frames. The :class:`~eartalk.runtime.scheduler.Engine` steps many of them
together. :class:`Session` is the thin user-facing handle of ``shared/design.md``.

Idle motion. The model leaves free controls to itself, but a deterministic (argmax) stream in
silence tends to settle on one frame. So while a frame's audio is silent (RMS below -45 dBFS),
the kinds the user has *not* pinned -- pose, gaze, blink -- are pinned to a natural idle track
(``eartalk.data.motion.controls_track``: 15-20 blinks a minute, slow head drift at half its
amplitude, gaze fixations), seeded by the session's seed. During speech pose and gaze are free
again (speech-driven motion is the model's job), but blinks stay on the track: their timing does
not follow the speech, so an argmax stream left to itself never blinks while talking (measured:
no closed-eye frame in 10,000 frames of looped speech, docs/model-history.md). A kind the user pinned
is never touched. Emotion is never driven. ``idle_motion=False`` turns this off.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterator, NamedTuple

import numpy as np
import torch

from eartalk.data.audio_io import as_pcm
from eartalk.model.audio import StreamingAudioFrontend
from eartalk.model.conditions import encode_controls
from eartalk.model.config import CONTROLS
from eartalk.model.gpt import sample
from .soft_decode import DEFAULT_DECODE

__all__ = ["Frame", "Session", "SessionClosedError", "StreamState"]

SILENCE_RMS = 10 ** (-45 / 20)        # -45 dBFS
IDLE_TRACK_FRAMES = 1500               # 60 s, played back and forth (continuous, never repeats a jump)
IDLE_POSE_SCALE = 0.5                  # "gentle": half the corpus' idle head motion
_IDLE_NAMES = {"pose": ("yaw", "pitch", "roll"), "gaze": ("gaze_x", "gaze_y"), "blink": ("blink",)}
_SPEECH_DRIVEN = ("blink",)            # the kinds the idle track drives during speech too


class Frame(NamedTuple):
    """One output frame: ``index`` in the session (0-based), ``image`` uint8 RGB [H, W, 3]."""
    index: int
    image: np.ndarray


class SessionClosedError(RuntimeError):
    """The session was closed (by the user or because it failed); the message says which."""


class StreamState:
    """Per-stream state; created and stepped by the Engine (see the module docstring)."""

    def __init__(self, sid: int, cfg, backend, pages, portrait_tokens: np.ndarray, ref: np.ndarray,
                 temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                 idle_motion: bool = True, refine: int = 0, guidance: float = 1.0, decode: str = DEFAULT_DECODE):
        if not isinstance(refine, (int, np.integer)) or isinstance(refine, bool) or refine < 0:
            raise ValueError(f"refine must be an int >= 0 (extra passes per frame; 0 = one pass), got {refine!r}")
        why = backend.refine_blocker() if refine else None
        if why:
            raise ValueError(f"refine={refine}: {why}; or use refine=0 (one pass per frame)")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = argmax), got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
        self.sid = sid
        self.cfg = cfg
        self.pages = pages
        self.ref = ref
        self.prev_tokens = portrait_tokens.astype(np.int64)
        self.frontend = StreamingAudioFrontend(cfg, backend.encode_audio, receptive_field=backend.receptive_field)
        self.audio = deque()            # [A, F] per frame, ready to step
        self.rms = deque()              # loudness of the same frames (idle driver)
        self._pcm_tail = np.zeros(0, np.float32)   # < 640 samples not yet in an rms entry
        self.controls: dict[str, object] = {}
        self.scheduled: dict[int, dict] = {}        # frame index -> control values
        self.temperature, self.top_k, self.seed = float(temperature), top_k, int(seed)
        self.generator = torch.Generator().manual_seed(self.seed) if temperature > 0 else None
        self.idle_motion = bool(idle_motion)
        self.refine = int(refine)       # extra passes per frame (runtime/refine.py)
        self.guidance = float(guidance)   # audio guidance scale, 1 = off; checked by Engine.open_session
        self.decode = decode            # "expected" | "tokens" (runtime/soft_decode.py); checked by Engine.open_session
        self._idle = None
        self.frame_index = 0            # next frame to step
        self.out: deque[Frame] = deque()
        self.closed = False
        self.error: BaseException | None = None
        self.close_reason = ""

    # ------------------------------------------------------------------ input
    def push_audio(self, pcm) -> int:
        x = as_pcm(pcm)
        feats = self.frontend.push(x)
        self._add_rms(x, final=False)
        self.audio.extend(feats)
        return len(feats)

    def flush(self) -> int:
        feats = self.frontend.flush()
        self._add_rms(np.zeros(0, np.float32), final=True)
        self.audio.extend(feats)
        if len(self.rms) < len(self.audio):   # alignment invariant of the two queues
            raise RuntimeError(f"internal: {len(self.audio)} audio frames but {len(self.rms)} loudness values")
        return len(feats)

    def _add_rms(self, x: np.ndarray, final: bool) -> None:
        spf = self.cfg.samples_per_frame
        buf = np.concatenate([self._pcm_tail, x])
        n = buf.size // spf
        if final and buf.size % spf:
            buf = np.concatenate([buf, np.zeros(spf - buf.size % spf, np.float32)])
            n += 1
        blocks = buf[:n * spf].reshape(n, spf).astype(np.float64)
        self.rms.extend(np.sqrt((blocks ** 2).mean(axis=1)) if n else [])
        self._pcm_tail = buf[n * spf:] if not final else np.zeros(0, np.float32)

    def control(self, at_frame: int | None = None, **values) -> None:
        """Merge ``values`` into the controls from the next frame (or from ``at_frame``)."""
        merged = {**self.controls, **values}
        encode_controls(merged)                        # validates names and ranges now
        if at_frame is None or at_frame <= self.frame_index:
            self.controls = {k: v for k, v in merged.items() if v is not None}
        else:
            for k in values:
                if k not in CONTROLS:
                    raise ValueError(f"unknown control {k!r}; valid controls are {sorted(CONTROLS)}")
            self.scheduled.setdefault(int(at_frame), {}).update(values)

    # ------------------------------------------------------------------ step inputs / outputs
    @property
    def ready(self) -> bool:
        return not self.closed and bool(self.audio)

    def step_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(audio [A,F], cond [C,Dc], cond_mask [C]) of the next frame; consumes its audio."""
        due = self.scheduled.pop(self.frame_index, None)
        if due:
            self.controls = {k: v for k, v in {**self.controls, **due}.items() if v is not None}
        values = dict(self.controls)
        rms = self.rms.popleft()
        if self.idle_motion:
            values.update(self._idle_values(values, _IDLE_NAMES if rms < SILENCE_RMS else _SPEECH_DRIVEN))
        cond, mask = encode_controls(values)
        audio = self.audio.popleft()
        return np.asarray(audio, np.float32), cond, mask

    def _idle_values(self, pinned: dict, kinds) -> dict:
        """The idle track's values at this frame for ``kinds`` the user has not pinned."""
        if self._idle is None:
            from eartalk.data.motion import controls_track
            self._idle = controls_track(IDLE_TRACK_FRAMES, np.random.default_rng(self.seed), fps=self.cfg.fps)
        period = 2 * IDLE_TRACK_FRAMES - 2
        i = self.frame_index % period
        i = i if i < IDLE_TRACK_FRAMES else period - i               # back and forth
        out = {}
        for kind in kinds:
            names = _IDLE_NAMES[kind]
            if any(n in pinned for n in names):
                continue                                              # the user's pin wins
            for n in names:
                v = float(self._idle[n][i])
                out[n] = v * IDLE_POSE_SCALE if kind == "pose" else v
        return out

    def pick_tokens(self, logits: np.ndarray) -> np.ndarray:
        """logits [N, V] -> tokens int64 [N]: argmax, or seeded temperature / top-k sampling."""
        if self.temperature == 0.0:
            return np.argmax(logits, axis=-1).astype(np.int64)
        t = sample(torch.from_numpy(np.ascontiguousarray(logits)), self.temperature, self.top_k, self.generator)
        return t.numpy().astype(np.int64)

    def emit(self, tokens: np.ndarray, image: np.ndarray) -> None:
        self.prev_tokens = tokens
        self.out.append(Frame(self.frame_index, image))
        self.frame_index += 1

    def close(self, reason: str = "closed by the user", error: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.error = error
        self.pages.close()
        self.audio.clear()
        self.rms.clear()


class Session:
    """User handle of one stream (``shared/design.md``, runtime API). Context manager.

    ``push_audio(pcm)`` any length, any moment (16 kHz mono float32 or int16); ``control(**values)``
    from the next frame; ``frames()`` yields :class:`Frame` as soon as their audio (with 80 ms
    lookahead) is buffered; ``flush()`` at end of speech; ``close()`` frees the pages.
    ``realtime=True`` paces ``frames()`` to at most ``fps`` frames per wall-clock second.
    """

    def __init__(self, engine, state: StreamState, realtime: bool = False, owns_engine: bool = False):
        self._engine = engine
        self._state = state
        self.realtime = bool(realtime)
        self._owns_engine = owns_engine
        self._t0: float | None = None
        self._first_index = 0

    # ------------------------------------------------------------------ properties
    @property
    def id(self) -> int:
        return self._state.sid

    @property
    def closed(self) -> bool:
        return self._state.closed

    @property
    def frame_index(self) -> int:
        """Frames stepped so far."""
        return self._state.frame_index

    @property
    def frames_pending(self) -> int:
        """Frames whose audio is buffered but that are not yet stepped."""
        return len(self._state.audio)

    @property
    def cfg(self):
        return self._state.cfg

    # ------------------------------------------------------------------ API
    def push_audio(self, pcm) -> int:
        """Buffer PCM; returns the number of frames that became ready. Bad PCM closes the session."""
        self._check_open("push_audio")
        return self._engine._guard(self._state, "bad audio", self._state.push_audio, pcm)

    def control(self, at_frame: int | None = None, **values) -> None:
        """Set controls (``yaw=10, emotion="happy", blink=None`` (= free again), ...).

        Takes effect from the next frame stepped, or from frame ``at_frame``. Unknown names or
        out-of-range values raise ``ValueError`` and change nothing (the session stays open).
        """
        self._check_open("control")
        self._state.control(at_frame, **values)

    def flush(self) -> int:
        """End of speech: pad the lookahead with silence so every pushed sample yields its frames
        (ceil(samples / 640) in all). Returns the number of frames that became ready."""
        self._check_open("flush")
        return self._engine._guard(self._state, "flush failed", self._state.flush)

    def frames(self) -> Iterator[Frame]:
        """Yield every frame that can be made from the audio buffered so far, then return."""
        st = self._state
        while True:
            if not st.out:
                if st.closed or not st.audio:
                    break
                self._engine.tick()
                continue
            f = st.out.popleft()
            if self.realtime:
                self._pace(f.index)
            yield f
        if st.error is not None and not st.out:
            raise SessionClosedError(f"session {st.sid} closed: {st.close_reason}: {st.error}") from st.error

    def _pace(self, index: int) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._first_index = now, index
            return
        due = self._t0 + (index - self._first_index) / self.cfg.fps
        if due > now:
            time.sleep(due - now)

    def close(self) -> None:
        """Free the session's pages (idempotent)."""
        self._engine.close_session(self._state)
        if self._owns_engine:                 # open_session's private engine and backend
            self._engine.close()
            self._engine.backend.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort: pages of an abandoned session return to the pool
        try:
            if not self._state.closed:
                self._engine.close_session(self._state)
        except Exception:
            pass

    def _check_open(self, what: str) -> None:
        st = self._state
        if st.closed:
            why = f"{st.close_reason}: {st.error}" if st.error is not None else st.close_reason
            raise SessionClosedError(f"session {st.sid}.{what}(): the session is closed ({why})")

    def __repr__(self) -> str:
        return f"Session(id={self.id}, frame={self.frame_index}, pending={self.frames_pending}, closed={self.closed})"
