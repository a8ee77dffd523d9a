"""eartalk.runtime: streaming talking-head sessions over a paged KV cache.

Thin facade over small modules::

    model_loader  preset / bundle directory -> model bundle (random weights only when asked)
    backend       the numpy-in/numpy-out engine interface (torch here; ONNX Runtime, TensorRT plug in)
    torch_backend the PyTorch implementation (batch-invariant step and decode)
    page_pool, page_table, kv_cache   which pages are live / the pool tensor and append, gather
    session       one stream's state and its user handle
    scheduler     Engine: all sessions of one backend, one batched step per tick
    refine        few-step refinement schedule (extra passes per frame, models trained for it)
    guidance      audio guidance: each frame's logits pushed away from those of silence
    soft_decode   the frame shown decoded from each cell's expected code, not its picked token

Quick start::

    import eartalk
    with eartalk.open_session(model="tiny", random_init=True, portrait="me.png") as s:
        s.push_audio(pcm)                 # any length, 16 kHz mono float32 / int16
        s.control(yaw=10)                 # from the next frame
        for f in s.frames():              # Frame(index, image uint8 [H, W, 3])
            ...
        s.flush()                         # end of speech: the last frames
        for f in s.frames():
            ...

Many sessions: ``engine = Engine(make_backend(...), max_sessions=16)`` then
``engine.open_session(portrait)`` per stream; they share the pool and are stepped as one batch.
"""
from __future__ import annotations

from .backend import Backend
from .model_loader import ModelNotTrainedError, load_model
from .page_pool import PoolFullError
from .scheduler import Engine
from .session import Frame, Session, SessionClosedError

__all__ = ["open_session", "make_backend", "Engine", "Session", "Frame", "Backend", "PoolFullError",
           "SessionClosedError", "ModelNotTrainedError", "load_model", "BACKENDS"]

BACKENDS = ("torch", "onnxruntime")


def make_backend(model="tiny", backend: str = "torch", random_init: bool = False, seed: int = 0,
                 device: str | None = None, precision: str = "fp32", **backend_options) -> Backend:
    """A backend serving ``model`` (a preset name or bundle directory).

    ``backend="torch"`` runs the bundle in PyTorch (``device`` default: CUDA if present, else
    CPU; ``batch_invariant=False`` trades bit-exact batching for speed). ``"onnxruntime"`` needs
    ``runtime/ort_backend.py`` and an exported ONNX folder (``onnx_dir=...``). ``precision``:
    ``fp32``, or ``int8``/``fp8`` (onnxruntime only: the Q/DQ graphs of ``eartalk calibrate``).
    """
    if precision != "fp32" and backend != "onnxruntime":
        raise ValueError(f"precision {precision!r} needs backend='onnxruntime' and an ONNX folder quantized by "
                         f"`eartalk calibrate quantize` (the torch backend runs fp32 only)")
    if backend == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(load_model(model, random_init=random_init, seed=seed), device=device, **backend_options)
    if backend == "onnxruntime":
        from . import ort_backend
        cls = getattr(ort_backend, "OrtBackend", None)
        if cls is None:
            raise RuntimeError("the onnxruntime backend is not available in this build (runtime/ort_backend.py "
                               "has no OrtBackend)")
        return cls(model=model, random_init=random_init, seed=seed, device=device, precision=precision,
                   **backend_options)
    raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")


def open_session(model="tiny", backend: str = "torch", portrait=None, *, random_init: bool = False,
                 seed: int = 0, device: str | None = None, realtime: bool = False,
                 temperature: float = 0.0, top_k: int | None = None, idle_motion: bool = True,
                 controls: dict | None = None, precision: str = "fp32", refine: int = 0,
                 guidance: float | None = None, decode: str | None = None, **backend_options) -> Session:
    """Open one streaming session (a one-session :class:`Engine`; closing the session closes it).

    ``portrait``: image path or uint8 RGB array [H, W, 3] (another size is cropped/resized with a
    warning). ``model="tiny"`` needs trained weights unless ``random_init=True`` (random weights
    from ``seed``: for tests and benchmarks). Decoding is argmax unless ``temperature > 0``
    (optionally ``top_k``), sampled with a generator seeded by ``seed``. ``realtime=True`` paces
    ``frames()`` to 25 fps. ``controls``: initial control values (see ``Session.control``).
    ``refine``: extra refinement passes per frame (``runtime/refine.py``; models trained with
    ``refine``, torch backend); 0 = one pass per frame. ``guidance``: audio guidance scale
    (``runtime/guidance.py``; None = ``DEFAULT_GUIDANCE``, 1 = off). ``decode``: frames decoded from
    each cell's ``"expected"`` code (None, the default) or from the picked ``"tokens"``
    (``runtime/soft_decode.py``).
    """
    if portrait is None:
        raise ValueError("open_session needs portrait= (an image path or a uint8 RGB array [H, W, 3])")
    eng = Engine(make_backend(model, backend, random_init=random_init, seed=seed, device=device,
                              precision=precision, **backend_options), max_sessions=1)
    return eng.open_session(portrait, realtime=realtime, temperature=temperature, top_k=top_k, seed=seed,
                            idle_motion=idle_motion, controls=controls, refine=refine, guidance=guidance,
                            decode=decode, _owns_engine=True)
