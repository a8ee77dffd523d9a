"""Video input/output with PyAV: H.264 + AAC mp4 writing (streamed, atomic) and decoding.

Frames are always uint8 RGB [H, W, 3] in numpy order; a ``size`` is an int (square) or an
``(height, width)`` pair, in the same order as the array shape.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np

from eartalk.data.audio_io import SAMPLE_RATE, AudioAccumulator, as_pcm

FPS = 25


def _hw(size) -> tuple[int, int]:
    """Normalise a size argument to (height, width)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


class Mp4Writer:
    """Streaming H.264/AAC mp4 writer: frames and audio are encoded as they arrive.

    ``size`` is (height, width) or an int for square frames; both must be even (yuv420p halves the
    chroma planes). ``audio_rate=None`` writes a video-only file.

    Output goes to ``<path>.<pid>.partial`` and is renamed to ``path`` by :meth:`close`; if the writer
    is used as a context manager and the block raises, or :meth:`abort` is called, the partial file
    is deleted. So ``path`` only ever holds a complete file.

    Encoding is single-threaded with bit-exact muxing so the same input gives the same bytes
    (libx264's frame-threading makes the bitstream depend on thread timing).
    """

    def __init__(self, path, fps: int = FPS, size=128, audio_rate: int | None = SAMPLE_RATE, crf: int = 18):
        self.path = Path(path)
        # the pid keeps two writers of the same path (an interrupted run's straggler, say) apart
        self.partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        self.height, self.width = _hw(size)
        if self.height <= 0 or self.width <= 0 or self.height % 2 or self.width % 2:
            raise ValueError(f"Mp4Writer({self.path}): frame size must be positive and even for "
                             f"yuv420p, got height={self.height} width={self.width}")
        if not 0 <= crf <= 51:
            raise ValueError(f"Mp4Writer({self.path}): crf must be in [0, 51], got {crf}")
        self.fps = int(fps)
        self.audio_rate = audio_rate
        self.n_frames = 0
        self.n_samples = 0
        self._closed = False
        # "+bitexact" keeps the muxer from writing the library version/creation time, so identical
        # input usually gives identical bytes. Not guaranteed: inside the full test process two
        # encodes of the same frames differed by up to 5 levels, so the corpus's reference frames
        # are its lossless frames.npy and nothing compares mp4 bytes.
        self._container = av.open(str(self.partial), mode="w", format="mp4",
                                  options={"fflags": "+bitexact"})
        try:
            v = self._container.add_stream("libx264", rate=self.fps)
            v.width, v.height, v.pix_fmt = self.width, self.height, "yuv420p"
            v.codec_context.thread_count = 1
            v.codec_context.flags |= int(av.codec.context.Flags.bitexact)
            # one x264 thread and no lookahead threads: thread scheduling must not change bytes
            v.options = {"crf": str(int(crf)), "preset": "medium", "threads": "1",
                         "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0"}
            self._video = v
            self._audio = None
            if audio_rate is not None:
                a = self._container.add_stream("aac", rate=int(audio_rate), layout="mono")
                a.codec_context.flags |= int(av.codec.context.Flags.bitexact)
                a.codec_context.thread_count = 1
                self._audio = a
        except BaseException:
            self.abort()
            raise

    def write(self, frame: np.ndarray) -> None:
        """Encode one uint8 RGB frame [height, width, 3]."""
        self._check_open()
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.shape != (self.height, self.width, 3):
            raise ValueError(f"Mp4Writer({self.path}): frame {self.n_frames} is {frame.dtype} "
                             f"{frame.shape}; expected uint8 {(self.height, self.width, 3)}")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = self.n_frames  # time_base is 1/fps
        self._container.mux(self._video.encode(vf))
        self.n_frames += 1

    def write_audio(self, pcm: np.ndarray) -> None:
        """Encode a mono chunk (float32 in [-1, 1] or int16) at the writer's ``audio_rate``."""
        self._check_open()
        if self._audio is None:
            raise ValueError(f"Mp4Writer({self.path}) was opened with audio_rate=None; cannot write audio")
        x = as_pcm(pcm, sample_rate=self.audio_rate, expected_rate=self.audio_rate)
        if x.size == 0:
            return
        af = av.AudioFrame.from_ndarray(np.clip(x, -1.0, 1.0)[None, :], format="flt", layout="mono")
        af.sample_rate = self.audio_rate
        af.pts = self.n_samples
        self._container.mux(self._audio.encode(af))
        self.n_samples += x.size

    def close(self) -> None:
        """Flush the encoders, finish the file and move it to its final name."""
        if self._closed:
            return
        if self.n_frames == 0:
            self.abort()
            raise ValueError(f"Mp4Writer({self.path}): no frames were written; "
                             f"refusing to create an empty video")
        try:
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._container.mux(self._audio.encode(None))
            self._container.close()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        """Stop without producing ``path``; the partial file is removed."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.close()
        except Exception:  # the file is being thrown away; a flush error changes nothing
            pass
        if self.partial.exists():
            self.partial.unlink()

    def _check_open(self):
        if self._closed:
            raise ValueError(f"Mp4Writer({self.path}) is already closed")

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mp4(path, frames: Iterable[np.ndarray], audio: np.ndarray | None = None, fps: int = FPS,
              sample_rate: int = SAMPLE_RATE, crf: int = 18) -> None:
    """Write uint8 RGB frames (any iterable, consumed lazily) and optional mono audio as an mp4.

    The frame size is taken from the first frame. See :class:`Mp4Writer` for the encoding and the
    atomic-rename guarantees.
    """
    it = iter(frames)
    try:
        first = np.asarray(next(it))
    except StopIteration:
        raise ValueError(f"write_mp4({path}): no frames given") from None
    if first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"write_mp4({path}): frames must be [H, W, 3] RGB, got shape {first.shape}")
    writer = Mp4Writer(path, fps=fps, size=first.shape[:2],
                       audio_rate=sample_rate if audio is not None else None, crf=crf)
    with writer:
        if audio is not None:
            # Audio first: the muxer interleaves by timestamp, and one call keeps AAC framing simple.
            writer.write_audio(np.asarray(audio))
        writer.write(first)
        for f in it:
            writer.write(f)


def video_size(path) -> tuple[int, int]:
    """(height, width) of the first video stream of ``path``, without decoding it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise ValueError(f"video file {path} has no video track")
            s = c.streams.video[0]
            return int(s.height), int(s.width)
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode video file {path}: {e}") from e


def read_video(path, fps: int = FPS, size=None, sample_rate: int = SAMPLE_RATE,
               resize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``path`` to (frames uint8 [T, H, W, 3], audio float32 mono at ``sample_rate``).

    Frames are resampled to ``fps`` by timestamp: output frame i is the decoded frame nearest to
    t = i / fps (ties go to the earlier frame), for every t inside the video, so
    T = ceil(duration * fps). Decoding is streamed: only the output frames are held in memory.
    Audio is trimmed to the duration the container records (dropping AAC padding).

    ``size`` (int or (height, width)): if given, frames of another size raise ValueError naming
    the file, its size and the expected one -- unless ``resize=True``, in which case they are
    scaled to ``size`` while decoding (area filter).

    Raises FileNotFoundError for a missing file, ValueError for a file without audio ("has no
    audio track") or video, and for a corrupt/undecodable file (naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    want = _hw(size) if size is not None else None
    out: list[np.ndarray] = []
    audio = AudioAccumulator()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise ValueError(f"video file {path} has no video track")
            if not c.streams.audio:
                raise ValueError(f"video file {path} has no audio track; eartalk needs the speech "
                                 f"that goes with the frames")
            vs = c.streams.video[0]
            src = (int(vs.height), int(vs.width))
            if want is not None and src != want and not resize:
                raise ValueError(f"video file {path} has frames of height x width {src[0]}x{src[1]}; "
                                 f"expected {want[0]}x{want[1]}")
            vs.thread_type = "AUTO"  # decoding threads do not affect the output
            # Timestamps as exact fractions: a target time halfway between two frames is a real
            # tie (e.g. 25 -> 50 fps), broken towards the earlier frame, not by rounding noise.
            prev = None                   # (time, rgb) of the last decoded video frame
            t0 = None
            last_dur = 1 / Fraction(vs.average_rate or fps)  # until a frame states its own
            for frame in c.decode(video=0, audio=0):
                if isinstance(frame, av.AudioFrame):
                    audio.add(frame)
                    continue
                if frame.pts is not None and frame.time_base:
                    t = Fraction(frame.pts) * Fraction(frame.time_base)
                else:  # no timestamp: assume constant rate after the previous frame
                    t = (prev[0] + (t0 or 0) + last_dur) if prev is not None else Fraction(0)
                if t0 is None:
                    t0 = t  # streams may start at a non-zero timestamp; the first frame is t = 0
                t -= t0
                if frame.duration and frame.time_base:
                    last_dur = Fraction(frame.duration) * Fraction(frame.time_base)
                rgb = _to_rgb(frame, want if resize else None)
                if prev is not None:
                    # Emit the output frames that are at least as close to the previous frame.
                    mid = (prev[0] + t) / 2
                    while Fraction(len(out), fps) <= mid:
                        out.append(prev[1])
                prev = (t, rgb)
            if prev is None:
                raise ValueError(f"video file {path} has no decodable video frames")
            # One output frame per time i / fps inside the video; the 1/1000-frame tolerance keeps
            # timestamp rounding in the container from adding a frame.
            n_total = max(len(out), 1, math.ceil((prev[0] + last_dur) * fps - Fraction(1, 1000)))
            while len(out) < n_total:
                out.append(prev[1])
            pcm = audio.result(sample_rate, c.streams.audio[0])
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode video file {path}: {e}") from e
    return np.stack(out), pcm


def _to_rgb(frame: av.VideoFrame, hw: tuple[int, int] | None) -> np.ndarray:
    if hw is not None and (frame.height, frame.width) != hw:
        return frame.reformat(width=hw[1], height=hw[0], format="rgb24", interpolation="AREA").to_ndarray()
    return frame.to_ndarray(format="rgb24")
