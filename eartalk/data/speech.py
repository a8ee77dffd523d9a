"""Speech with exact phoneme timing, from eSpeak NG (the ``espeakng-loader`` wheel) through ctypes.

eSpeak is initialised in synchronous mode with phoneme events enabled, so each PHONEME event
carries the sample index at which the library itself starts that phoneme: the timings are the
synthesiser's own, not estimates. Audio arrives through the synth callback at eSpeak's native
rate (22050 Hz) and is resampled to 16 kHz mono float32.

Determinism. libespeak-ng keeps synthesis state in C statics that nothing in its API resets (the
pitch-flutter phase, the automatic gain control, the glottal cycle counter, the noise generator),
so the same text synthesised twice in one process gives slightly different samples and even a
different length; and initialisation seeds the noise generator from the clock, so breathy voices
differ between processes and seconds. ``synthesize`` therefore loads a *fresh instance* of the
library for every utterance, fixes its noise seed, and unloads it afterwards (about 1 ms). The
instance is loaded from a private copy of the shared object, so another user of ``libespeak-ng``
in the same process cannot keep it loaded (a shared object stays mapped while anyone holds it,
and its statics would then survive). A lock serialises callers in one process; each worker
process sets itself up lazily on first use.
"""
from __future__ import annotations

import _ctypes
import ctypes
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16000

# Accent x voice-variant combinations, every one checked to synthesise and to sound different from
# the others (tests/test_speech.py). Ids are eSpeak voice names: "<language>+<variant>".
# en = British (RP-like default), en-us = General American, en-us-nyc = New York,
# en-gb-scotland, en-gb-x-rp (Received Pronunciation), en-gb-x-gbclan (Lancashire),
# en-gb-x-gbcwmd (West Midlands), en-029 (Caribbean). Variants f* are female, m* male.
VOICES: tuple[str, ...] = (
    "en-us",
    "en-us+f3",
    "en+m3",
    "en+f2",
    "en-gb-scotland+m2",
    "en-gb-scotland+f4",
    "en-gb-x-rp+m7",
    "en-gb-x-rp+f1",
    "en-gb-x-gbclan+m4",
    "en-gb-x-gbcwmd+f5",
    "en-029+m5",
    "en-029+f3",
    "en-us-nyc+m1",
    "en-us-nyc+f2",
    "en-us+m6",
    "en+f4",
)

# Words per minute. From 450 up eSpeak time-compresses its output with libsonic, and the phoneme
# events then no longer match the audio (they come out of order and past its end): 449 is the top.
RATE_RANGE = (80, 449)
PITCH_RANGE = (0, 99)     # eSpeak's relative pitch (50 = the voice's normal pitch)

# ---- the parts of speak_lib.h used here
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_PARAM_RATE = 1
_PARAM_PITCH = 3
_RAND_SEED = 1


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms, truncated
        ("sample", ctypes.c_int),          # exact sample index of the event in this synthesis
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))


@dataclass
class Utterance:
    """One synthesised utterance.

    ``phonemes`` holds (start_s, end_s, mnemonic) in time order; they tile [0, duration] without
    gaps. Mnemonics are eSpeak's own (stress marks ``'`` / ``,`` included as emitted); pauses
    start with ``_``. A leading ``_`` is added when the first phoneme does not start at 0.
    """
    audio: np.ndarray                       # float32, mono, SAMPLE_RATE
    phonemes: list[tuple[float, float, str]]
    text: str
    voice: str
    rate: int
    pitch: int

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def _private_copy(src: str) -> str:
    """A copy of the shared object under a name nothing else loads, one per library build and
    user, shared by all processes (each maps it separately) and written atomically."""
    st = os.stat(src)
    d = os.path.join(tempfile.gettempdir(), f"eartalk-espeak-{os.getuid()}")
    dst = os.path.join(d, f"libespeak-ng-{st.st_size}-{st.st_mtime_ns}.so")
    if not os.path.exists(dst):
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".part")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # concurrent first users race harmlessly: same bytes either way
    return dst


class _State:
    """Per-process state: the private library copy and the capture buffers of the callback."""

    def __init__(self):
        import espeakng_loader  # imported lazily: importing this module must not need it

        self.pid = os.getpid()
        self.data_path = espeakng_loader.get_data_path().encode()
        self.lib_path = _private_copy(espeakng_loader.get_library_path())
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[int, str]] = []
        self.callback = _CALLBACK(self._on_synth)  # kept alive for as long as the state
        self.unload_checked = False

    def _on_synth(self, wav, n, events):
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            e = events[i]
            if e.type == _EVENT_PHONEME:
                self.events.append((e.sample, e.id.string.decode("ascii", "replace")))
            i += 1
        return 0  # 0 = continue synthesis


_lock = threading.Lock()
_state: _State | None = None


def _get_state() -> _State:
    global _state
    if _state is None or _state.pid != os.getpid():
        # A forked child inherits the parent's state object, callback buffers included: give it
        # its own.
        _state = _State()
    return _state


def _mapped(path: str) -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any(path in line for line in f)
    except OSError:  # not Linux: cannot check, the determinism test still guards
        return False


def _synth_native(st: _State, text: bytes, voice: str, rate: int, pitch: int
                  ) -> tuple[np.ndarray, list[tuple[int, str]], int]:
    """Run one utterance on a freshly loaded library; return int16 audio, events, native rate."""
    st.chunks.clear()
    st.events.clear()
    lib = ctypes.CDLL(st.lib_path)
    try:
        sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, st.data_path,
                                   _INITIALIZE_PHONEME_EVENTS)
        if sr <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({sr}) with data at {st.data_path!r}")
        # Breathy variants (f1..f5 ...) add noise from eSpeak's generator, which initialisation
        # seeds from the clock: a fixed seed makes them reproducible across processes and time.
        lib.espeak_ng_SetRandSeed(ctypes.c_long(_RAND_SEED))
        lib.espeak_SetSynthCallback(st.callback)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak could not load voice {voice!r}")
        lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
        err = lib.espeak_Synth(text, len(text) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err}")
        lib.espeak_Terminate()
    finally:
        _ctypes.dlclose(lib._handle)
    if not st.unload_checked:
        if _mapped(st.lib_path):
            raise RuntimeError("libespeak-ng stayed loaded after dlclose: synthesis would not be "
                               "deterministic")
        st.unload_checked = True
    audio = np.concatenate(st.chunks) if st.chunks else np.zeros(0, np.int16)
    return audio, list(st.events), sr


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def synthesize(text: str, voice: str, rate: int = 175, pitch: int = 50) -> Utterance:
    """Speak ``text`` with eSpeak NG ``voice`` (one of ``VOICES``) at ``rate`` words per minute.

    Returns 16 kHz float32 audio and the phoneme segments from eSpeak's own phoneme events.
    Same arguments -> bit-identical output, in any process and any call order.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if voice not in VOICES:
        raise ValueError(f"unknown voice {voice!r}; expected one of {list(VOICES)}")
    rate = _check_int("rate", rate, *RATE_RANGE)
    pitch = _check_int("pitch", pitch, *PITCH_RANGE)

    with _lock:
        native, events, sr = _synth_native(_get_state(), text.strip().encode("utf-8"),
                                           voice, rate, pitch)
    if len(native) == 0 or not events:
        raise ValueError(f"eSpeak produced no speech for text {text!r}")

    g = math.gcd(SAMPLE_RATE, sr)
    audio = resample_poly(native.astype(np.float32) / 32768.0, SAMPLE_RATE // g, sr // g)
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    duration = len(audio) / SAMPLE_RATE

    # Segments run from one PHONEME event to the next; the last one ends with the audio.
    # Events at the same sample (e.g. a zero-length pause at a clause boundary) give empty
    # segments, which are dropped.
    starts = [s for s, _ in events]
    if any(b < a for a, b in zip(starts, starts[1:])) or starts[0] < 0 or starts[-1] > len(native):
        raise RuntimeError(f"eSpeak phoneme events are not ordered within the audio: {starts}")
    bounds = [s / sr for s in starts] + [duration]
    names = [n for _, n in events]
    if bounds[0] > 0:
        bounds.insert(0, 0.0)
        names.insert(0, "_")
    phonemes = [(bounds[i], bounds[i + 1], names[i]) for i in range(len(names))
                if bounds[i + 1] > bounds[i]]
    return Utterance(audio=audio, phonemes=phonemes, text=text, voice=voice, rate=rate, pitch=pitch)
