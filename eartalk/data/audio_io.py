"""Audio input/output: decoding files, validating live PCM chunks, writing wav atomically.

Everything inside eartalk is 16 kHz mono float32 in [-1, 1] (``ModelConfig.sample_rate``). These
helpers are the only places where other rates, layouts and sample formats are turned into that.
"""
from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
# Containers libsndfile reads natively; everything else (mp3, m4a, mp4, webm, ...) goes through
# FFmpeg via PyAV. libsndfile is preferred where it works because it is exact and much faster.
_SOUNDFILE_EXTS = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif"}


def resample(audio: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample 1-D ``audio`` from ``orig_rate`` to ``target_rate`` (polyphase, exact ratio).

    Output length is ``ceil(len * target / orig)``, so 1 s of audio stays exactly 1 s.
    """
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    if orig_rate == target_rate:
        return np.asarray(audio, dtype=np.float32)
    ratio = Fraction(int(target_rate), int(orig_rate))
    out = resample_poly(np.asarray(audio, dtype=np.float64), ratio.numerator, ratio.denominator)
    return out.astype(np.float32)


def _planar_float(frame) -> np.ndarray:
    """One decoded PyAV audio frame as float32 [channels, samples], whatever its sample format."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:  # packed formats come as [1, samples * channels], interleaved
        arr = arr.reshape(-1, channels).T
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / float(-np.iinfo(arr.dtype).min)
    return arr.astype(np.float32)


class AudioAccumulator:
    """Collects decoded PyAV audio frames, then returns them as one mono float32 signal.

    Shared by :func:`load_audio` and ``video_io.read_video`` (which demuxes audio and video in
    one pass).
    """

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.rate: int | None = None

    def add(self, frame) -> None:
        if self.rate is None:
            self.rate = int(frame.sample_rate)
        elif frame.sample_rate != self.rate:
            # Mid-stream rate changes are legal in some containers but rare; refusing is clearer
            # than silently producing audio at the wrong speed.
            raise ValueError(f"audio sample rate changes mid-stream ({self.rate} -> {frame.sample_rate})")
        # Downmix by averaging channels: keeps the level of a centred voice, never clips.
        self.chunks.append(_planar_float(frame).mean(axis=0))

    def native(self, stream=None) -> np.ndarray:
        """All samples at the source rate; trimmed to ``stream``'s declared duration if known.

        AAC always decodes whole 1024-sample frames: the encoder's padding at the end is only
        dropped if we honour the duration the muxer recorded (up to 64 ms at 16 kHz otherwise).
        """
        if not self.chunks or self.rate is None:
            return np.zeros(0, dtype=np.float32)
        x = np.concatenate(self.chunks)
        if stream is not None and stream.duration and stream.time_base:
            n = int(round(float(stream.duration * stream.time_base) * self.rate))
            if 0 < n < x.size:
                x = x[:n]
        return x

    def result(self, sample_rate: int, stream=None) -> np.ndarray:
        """Mono float32 at ``sample_rate`` (see :meth:`native` for ``stream``)."""
        return resample(self.native(stream), self.rate or sample_rate, sample_rate)


def _decode_with_av(path: Path) -> tuple[np.ndarray, int]:
    import av

    acc = AudioAccumulator()
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"cannot decode audio file {path}: it has no audio track")
            for frame in container.decode(audio=0):
                acc.add(frame)
            mono = acc.native(container.streams.audio[0])
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode audio file {path}: {e}") from e
    return mono, acc.rate or 0


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio (or video) file to float32 mono at ``sample_rate``.

    wav/flac/ogg are read with soundfile; anything else (mp3, m4a, the audio track of an mp4)
    with PyAV. Multi-channel audio is averaged to mono; the rate is converted with
    ``scipy.signal.resample_poly`` at the exact rational ratio.

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it cannot be decoded or
    holds no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    if path.suffix.lower() in _SOUNDFILE_EXTS:
        try:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise ValueError(f"cannot decode audio file {path}: {e}") from e
        mono = data.mean(axis=1)
    else:
        mono, rate = _decode_with_av(path)
    if mono.size == 0:
        raise ValueError(f"audio file {path} contains no audio samples")
    return resample(mono, rate, sample_rate)


def as_pcm(x, sample_rate: int = SAMPLE_RATE, expected_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Validate one live PCM chunk (``session.push_audio``) and return it as float32 [n].

    Accepts a 1-D (or [n, 1]) numpy array of float32 samples in [-1, 1] or of int16 samples
    (scaled by 1/32768). A zero-length chunk is valid and returns an empty array.

    Raises ValueError, naming what was given and what is expected, for: a sample rate other than
    ``expected_rate`` (the runtime does not resample live audio: that would add latency and hide a
    misconfigured capture device), a non-array, another dtype, another rank, NaN/inf samples, or
    float samples far outside [-1, 1] (the usual symptom of int16 values stored as float).
    """
    if sample_rate != expected_rate:
        raise ValueError(f"PCM sample rate is {sample_rate} Hz; expected {expected_rate} Hz mono "
                         f"(resample before pushing, e.g. with eartalk.data.audio_io.resample)")
    if not isinstance(x, np.ndarray):
        raise ValueError(f"PCM chunk must be a numpy array (float32 or int16), got {type(x).__name__}")
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"PCM chunk must be mono with shape [n] or [n, 1], got shape {x.shape}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if x.dtype != np.float32:
        raise ValueError(f"PCM chunk dtype is {x.dtype}; expected float32 in [-1, 1] or int16")
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(f"PCM chunk has {bad} NaN/inf samples out of {x.size}; expected finite values")
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    # A little overshoot is normal after gain/resampling; 2.0 and beyond is a unit mistake.
    if peak > 2.0:
        raise ValueError(f"float32 PCM peak is {peak:g}; expected samples in [-1, 1] "
                         f"(int16-scaled floats? divide by 32768 or pass int16)")
    return x


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float audio as 16-bit PCM wav, atomically.

    The file is written to a temporary name in the same directory and then ``os.replace``-d, so a
    reader (or a crash) never sees a half-written file under ``path``. Samples are clipped to
    [-1, 1] first because libsndfile would otherwise wrap them around.
    """
    path = Path(path)
    audio = np.asarray(audio)
    if audio.ndim == 2 and audio.shape[1] == 1:
        audio = audio[:, 0]
    if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"write_wav({path}): audio must be 1-D float, got {audio.dtype} {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise ValueError(f"write_wav({path}): audio contains NaN/inf samples")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, np.clip(audio, -1.0, 1.0), int(sample_rate), subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
