"""Offline generation: one portrait + one speech file (+ a controls timeline) -> an mp4.

The frames come from the streaming runtime (``eartalk.runtime``), exactly as ``eartalk stream``
makes them, so offline and live output agree. The video has ceil(samples / 640) frames at 25 fps
(= ceil(duration x 25)) and the input speech, resampled to 16 kHz, muxed in.

``generate`` takes file names and a model name; ``render`` takes arrays and a ready backend (the
demo and the evaluation use it, and tests pass recording backends).
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from eartalk.data.image_io import read_image

__all__ = ["GenerateResult", "generate", "render", "stream_frames", "read_portrait", "fit_portrait", "open_backend"]

CHUNK_SECONDS = 1.0          # audio pushed per round: bounds memory on long inputs


@dataclass
class GenerateResult:
    """What ``generate``/``render`` wrote: ``frames`` at ``fps``, ``duration_s`` of speech."""
    out: Path
    frames: int
    duration_s: float
    seconds: float
    notices: list[str] = field(default_factory=list)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def read_portrait(path) -> np.ndarray:
    """An image file -> uint8 RGB [H, W, 3]; ValueError naming the file if it is not an image."""
    return read_image(path, "portrait")


def fit_portrait(image: np.ndarray, size: int, name: str = "portrait") -> tuple[np.ndarray, str | None]:
    """(image at size x size, notice or None): another size is centre-cropped to a square and resized."""
    from eartalk.runtime.backend import prepare_portrait
    h, w = image.shape[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # replaced by the notice below
        out = prepare_portrait(image, size)
    if (h, w) == (size, size):
        return out, None
    how = "resized" if h == w else "centre-cropped to a square and resized"
    return out, f"notice: {name} is {w}x{h} pixels (width x height); {how} to the model's {size}x{size}"


def open_backend(model, backend: str = "torch", random_init: bool = False, seed: int = 0, **options):
    """``runtime.make_backend``, with torch's weight-shape errors (a bundle whose config does not fit
    its weights) turned into a ValueError naming the model."""
    from eartalk.runtime import make_backend
    try:
        return make_backend(model, backend, random_init=random_init, seed=seed, **options)
    except RuntimeError as e:
        if "state_dict" not in str(e):
            raise
        raise ValueError(f"model {model}: its weights do not fit its config (model.json): {e}") from None


def stream_frames(session, audio: np.ndarray, chunk: int | None = None) -> Iterator:
    """Push ``audio`` (16 kHz mono float32) into ``session`` chunk by chunk, flush, and yield every
    :class:`~eartalk.runtime.Frame` as soon as it is made (ceil(len / 640) frames in all)."""
    spc = chunk or int(CHUNK_SECONDS * session.cfg.sample_rate)
    for i in range(0, audio.size, spc):
        session.push_audio(np.ascontiguousarray(audio[i:i + spc], dtype=np.float32))
        yield from session.frames()
    session.flush()
    yield from session.frames()


def render(backend, portrait: np.ndarray, audio: np.ndarray, out, timeline=(), *, seed: int = 0,
           progress: bool = True, on_frame: Callable | None = None, refine: int = 0,
           guidance: float | None = None, decode: str | None = None) -> GenerateResult:
    """Render ``audio`` (16 kHz mono float32) with ``portrait`` (uint8 RGB at the model's size) on
    ``backend`` to the mp4 ``out``, scheduling ``timeline`` [(frame, {control: value})] first.

    ``on_frame(frame)`` sees every Frame as it is written (the evaluation keeps some of them).
    ``refine``: extra refinement passes per frame (``runtime/refine.py``); ``guidance``: audio guidance
    scale (``runtime/guidance.py``; None = the default, 1 = off); ``decode``: ``"expected"`` (None, the
    default) or ``"tokens"`` (``runtime/soft_decode.py``).
    The mp4 appears only when complete (``Mp4Writer`` writes ``out.partial`` and renames it).
    """
    from tqdm import tqdm

    from eartalk.controls_timeline import apply_timeline
    from eartalk.data.video_io import Mp4Writer
    from eartalk.runtime import Engine
    cfg = backend.cfg
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out}: expected an .mp4 file name")
    if audio.size == 0:
        raise ValueError("no audio samples to generate from")
    t0 = time.perf_counter()
    n_frames = -(-audio.size // cfg.samples_per_frame)
    engine = Engine(backend, max_sessions=1)
    writer = None
    try:
        session = engine.open_session(portrait, seed=seed, refine=refine, guidance=guidance, decode=decode)
        apply_timeline(session, timeline)
        writer = Mp4Writer(out, fps=cfg.fps, size=cfg.image_size, audio_rate=cfg.sample_rate)
        writer.write_audio(np.clip(audio, -1.0, 1.0).astype(np.float32))
        with tqdm(total=n_frames, desc="generate", unit="frame", disable=not progress, file=sys.stderr) as bar:
            for f in stream_frames(session, audio):
                writer.write(f.image)
                if on_frame is not None:
                    on_frame(f)
                bar.update()
        if writer.n_frames != n_frames:      # the runtime's contract; never ship a short video
            raise RuntimeError(f"internal: made {writer.n_frames} frames for {audio.size} samples; "
                               f"expected {n_frames}")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        engine.close()
    return GenerateResult(out, n_frames, audio.size / cfg.sample_rate, time.perf_counter() - t0)


def generate(portrait, audio, out, *, controls=None, model: str = "tiny", random_init: bool = False,
             backend: str = "torch", seed: int = 0, onnx_dir=None, progress: bool = True,
             notice: Callable[[str], None] = _stderr, precision: str = "fp32", refine: int = 0,
             guidance: float | None = None, decode: str | None = None) -> GenerateResult:
    """Files in, mp4 out (see the module docstring).

    ``portrait``: image file; ``audio``: any file ``load_audio`` decodes; ``controls``: timeline
    JSON (``eartalk.controls_timeline``) or None; ``model``: preset name or bundle directory
    (a bundle whose hash or config does not match is refused); ``backend``: ``torch`` or
    ``onnxruntime`` (needs ``onnx_dir``, the folder of ``eartalk export onnx``); ``precision``:
    ``fp32``, or ``int8``/``fp8`` with onnxruntime (the Q/DQ graphs of ``eartalk calibrate quantize``).
    ``refine``: extra refinement passes per frame (models trained with refinement, torch backend).
    ``guidance``: audio guidance scale (None = ``runtime.guidance.DEFAULT_GUIDANCE``, 1 = off).
    ``decode``: ``"expected"`` (None, the default) or ``"tokens"`` (``runtime/soft_decode.py``).
    Inputs are validated before the model is loaded. Notices (resized portrait, random weights) go
    to ``notice``.
    """
    from eartalk.controls_timeline import load_timeline
    from eartalk.data.audio_io import load_audio
    from eartalk.runtime import BACKENDS
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out}: expected an .mp4 file name")
    image = read_portrait(portrait)
    pcm = load_audio(audio)                        # names the file on any decode problem
    if not np.all(np.isfinite(pcm)):
        raise ValueError(f"audio file {audio} decodes to NaN/inf samples")
    if precision != "fp32" and backend != "onnxruntime":
        raise ValueError(f"--precision {precision} needs --backend onnxruntime --onnx-dir DIR (a folder quantized "
                         f"by `eartalk calibrate quantize`)")
    opts = {"onnx_dir": onnx_dir, "precision": precision} if backend == "onnxruntime" else {}
    be = open_backend(model, backend, random_init=random_init, seed=seed, **opts)
    try:
        cfg = be.cfg
        timeline = load_timeline(controls, cfg.fps) if controls is not None else []
        image, msg = fit_portrait(image, cfg.image_size, name=f"portrait {portrait}")
        notices = [msg] if msg else []
        if random_init:
            notices.append(f"note: model {model!r} is randomly initialised (--random-init): frames are not a face")
        for m in notices:
            notice(m)
        res = render(be, image, pcm, out, timeline, seed=seed, progress=progress, refine=refine, guidance=guidance,
                     decode=decode)
    finally:
        be.close()
    res.notices = notices
    return res
