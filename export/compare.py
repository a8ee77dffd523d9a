"""Same inputs, several executors: torch eager vs ONNX Runtime (vs TensorRT where present).

- :class:`TorchGraphs`: the torch modules behind the same ``graphs[kind](*numpy) -> [numpy]``
  interface as :class:`eartalk.runtime.ort_backend.OrtGraphs`, so one stream driver runs both.
- :func:`run_stream`: a real single-session stream (portrait -> tokens -> sink page; PCM ->
  streaming audio front end -> step -> argmax -> decode), with a control change mid-stream. It
  optionally records the exact step inputs it fed, which are the inputs :func:`compare_step`
  (and INT8/FP8 calibration) should use instead of random data.
- :func:`compare_step`: polygraphy's ``Comparator`` over the recorded inputs with an
  ``OnnxrtRunner``, a CPU torch runner (polygraphy's own ``PytRunner`` moves inputs to CUDA) and a
  ``TrtRunner`` when tensorrt imports; max abs/rel diff per output and pass/fail at ``atol``.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from eartalk.model.gpt import EMPTY, SINK

STEP_INPUTS = ("prev_tokens", "audio", "cond", "cond_mask", "past_k", "past_v", "past_lag")
STEP_OUTPUTS = ("logits", "new_k", "new_v")


class TorchGraphs:
    """``graphs[kind](*numpy_args) -> list[numpy]`` over the torch modules (eager, no_grad)."""

    def __init__(self, gpt, tokenizer, audio_encoder, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.gpt, self.tok, self.enc = gpt.eval(), tokenizer.eval(), audio_encoder.eval()
        self.receptive_field = audio_encoder.receptive_field
        self._fns = {"step": gpt.step, "prefill": gpt.prefill, "tokenizer_encode": tokenizer.encode,
                     "tokenizer_reference": tokenizer.reference, "tokenizer_decode": tokenizer.decode,
                     "audio_encoder": audio_encoder.step}

    def __getitem__(self, kind):
        fn = self._fns[kind]

        def run(*args):
            with torch.inference_mode():
                out = fn(*(torch.from_numpy(np.ascontiguousarray(a)) for a in args))
            return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
        return run


class BackendGraphs:
    """``graphs[kind]`` over a runtime :class:`~eartalk.runtime.backend.Backend` (torch, ORT, TRT)."""

    METHODS = {"step": "step", "prefill": "prefill", "tokenizer_encode": "tokenize",
               "tokenizer_reference": "reference", "tokenizer_decode": "decode_float",
               "audio_encoder": "encode_audio"}

    def __init__(self, backend):
        self.backend = backend
        self.receptive_field = backend.receptive_field

    def __getitem__(self, kind):
        fn = getattr(self.backend, self.METHODS[kind])

        def run(*args):
            out = fn(*args)
            return list(out) if isinstance(out, tuple) else [out]
        return run


def bundle_hash(bundle) -> str:
    """The weights hash written into exported files, for a runtime ModelBundle."""
    from eartalk.export.metadata import weights_sha256
    return weights_sha256({"gpt": bundle.gpt, "tokenizer": bundle.tokenizer, "audio_encoder": bundle.audio})


def synthetic_pcm(seconds: float, seed: int = 0, sample_rate: int = 16000) -> np.ndarray:
    """Speech-like test signal: a gliding harmonic voice, syllable envelope and noise (seeded)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) ** 0.5
    return (0.3 * env * voice + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def speech_pcm(text: str = "The quick brown fox jumps over the lazy dog.", seconds: float | None = None):
    """eSpeak NG speech (16 kHz) when available, else :func:`synthetic_pcm`."""
    try:
        from eartalk.data.speech import synthesize
        pcm = synthesize(text, "en").audio.astype(np.float32)
    except Exception:
        pcm = synthetic_pcm(seconds or 4.0)
    if seconds:
        reps = int(np.ceil(seconds * 16000 / max(1, pcm.size)))
        pcm = np.tile(pcm, reps)[: int(seconds * 16000)]
    return pcm


def demo_portrait(cfg, seed: int = 0) -> np.ndarray:
    """float32 [1,3,S,S] in [0,1]: a rendered synthetic face when the renderer is installed."""
    try:
        from eartalk.data.face import render_portrait
        from eartalk.data.identity import Identity
        img = render_portrait(Identity.sample(np.random.default_rng(seed)), cfg.image_size)
        img = np.asarray(img)[..., :3].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    except Exception:
        img = np.random.default_rng(seed).random((1, 3, cfg.image_size, cfg.image_size), np.float32)
    return np.ascontiguousarray(img)


def run_stream(graphs, cfg, receptive_field: int, frames: int, seed: int = 0, pcm: np.ndarray | None = None,
               portrait: np.ndarray | None = None, record_steps: int = 0, decode: bool = True,
               timer: dict | None = None) -> dict:
    """One session, ``frames`` frames, greedy tokens. Returns ``logits`` [T,N,V], ``tokens`` [T,N],
    ``images`` [T,3,S,S] (when ``decode``: each frame's expected codes decoded, as the runtime does
    by default, ``runtime/soft_decode.py``) and ``recorded``: the first ``record_steps`` step
    inputs as ``{name: [k, ...]}`` (batch axis of each kept, stacked on a new leading axis).

    The cache layout is the step contract's: sink page first, then the window oldest -> newest,
    empty slots zero with lag -2. ``timer`` (a dict) accumulates seconds per graph kind.
    """
    from eartalk.model.audio import StreamingAudioFrontend
    from eartalk.model.conditions import encode_controls
    from eartalk.model.tokenizer import code_table
    from eartalk.runtime.soft_decode import expected_codes
    c = cfg
    table = code_table(c.codebook_size).numpy()
    P, W, S = c.page_tokens, c.window, c.cache_tokens
    timer = timer if timer is not None else {}

    def call(kind, *args):
        t0 = time.perf_counter()
        out = graphs[kind](*args)
        timer[kind] = timer.get(kind, 0.0) + time.perf_counter() - t0
        return out

    portrait = demo_portrait(c, seed) if portrait is None else portrait
    pcm = speech_pcm(seconds=frames / c.fps) if pcm is None else pcm
    pcm = pcm[: frames * c.samples_per_frame]      # flush() then yields exactly `frames` frames
    (ptok,) = call("tokenizer_encode", portrait)
    (ref,) = call("tokenizer_reference", portrait)
    sink_k, sink_v = call("prefill", ptok)
    front = StreamingAudioFrontend(c, lambda w: call("audio_encoder", w)[0], receptive_field=receptive_field)
    chunks = np.array_split(pcm, max(1, pcm.size // 1000))    # ~62 ms pushes, like a live source
    audio = [a for ch in chunks for a in front.push(ch)] + list(front.flush())
    if len(audio) < frames:
        raise ValueError(f"{pcm.size} samples give {len(audio)} frames, {frames} asked")
    L, H, D = c.n_layer, c.n_head, c.head_dim
    past_k = np.zeros((L, 1, H, S, D), np.float32)
    past_v = np.zeros_like(past_k)
    past_lag = np.full((1, S), EMPTY, np.int32)
    past_k[:, :, :, :P], past_v[:, :, :, :P], past_lag[:, :P] = sink_k, sink_v, SINK
    window: list[tuple[np.ndarray, np.ndarray]] = []
    prev = ptok
    logits_all, toks, images = [], [], []
    rec = {n: [] for n in STEP_INPUTS}
    for t in range(frames):
        # a control arrives mid-stream (FCIC): pose and blink from frame T/2 on
        ctl = {"yaw": 10.0, "blink": 1.0} if t >= frames // 2 else {}
        cond, mask = encode_controls(ctl)
        for j, (k, v) in enumerate(window):          # oldest first: lag len(window)-j
            sl = slice((1 + j) * P, (2 + j) * P)
            past_k[:, :, :, sl], past_v[:, :, :, sl], past_lag[:, sl] = k, v, len(window) - j
        args = (prev, audio[t][None], cond[None], mask[None], past_k, past_v, past_lag)
        if t < record_steps:
            for n, a in zip(STEP_INPUTS, args):
                rec[n].append(np.array(a))
        logits, nk, nv = call("step", *args)
        tok = logits.argmax(-1)
        window = (window + [(nk, nv)])[-W:]
        prev = tok
        logits_all.append(logits[0])
        toks.append(tok[0])
        if decode:
            images.append(call("tokenizer_decode", expected_codes(logits, table), ref)[0][0])
    out = {"logits": np.stack(logits_all), "tokens": np.stack(toks), "timer": timer,
           "recorded": {n: np.stack(v) for n, v in rec.items() if v}}
    if decode:
        out["images"] = np.stack(images)
    return out


def save_recorded(path: str | Path, recorded: dict) -> None:
    np.savez_compressed(path, **recorded)


def load_recorded(path: str | Path) -> list[dict]:
    """Feed dicts from an npz of stacked step inputs (``[k, B, ...]`` per name; KV ``[k, L, B, ...]``)."""
    with np.load(path) as z:
        missing = [n for n in STEP_INPUTS if n not in z.files]
        if missing:
            raise ValueError(f"{path}: missing step inputs {missing}; has {z.files}")
        k = z["prev_tokens"].shape[0]
        return [OrderedDict((n, z[n][i]) for n in STEP_INPUTS) for i in range(k)]


def _torch_runner(gpt, example: dict):
    from polygraphy.backend.base import BaseRunner

    class TorchCpuRunner(BaseRunner):
        """polygraphy runner for ``gpt.step`` on the CPU."""

        def __init__(self):
            super().__init__(name="torch-eager", prefix="torch-runner")

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata
            meta = TensorMetadata()
            for n in STEP_INPUTS:   # the comparator feeds only the inputs named here
                meta.add(n, example[n].dtype, example[n].shape)
            return meta

        def infer_impl(self, feed_dict):
            t0 = time.time()
            with torch.inference_mode():
                out = gpt.step(*(torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in STEP_INPUTS))
            self.inference_time = time.time() - t0
            return OrderedDict((n, o.numpy()) for n, o in zip(STEP_OUTPUTS, out))
    return TorchCpuRunner()


def compare_step(onnx_path: str | Path, gpt, feeds: list[dict], atol: float = 1e-4,
                 engine_path: str | Path | None = None) -> dict:
    """polygraphy comparison of the step graph; returns ``{"runners", "outputs": {name: {max_abs,
    max_rel}}, "passed", "atol"}`` with torch eager as the reference."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc
    runners = [_torch_runner(gpt, feeds[0]), OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]))]
    notes = []
    if engine_path is not None:
        try:
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
            runners.append(TrtRunner(EngineFromBytes(Path(engine_path).read_bytes())))
        except ImportError as e:
            notes.append(f"TensorRT runner skipped: {e}")
    results = Comparator.run(runners, data_loader=feeds)
    # absolute tolerance only: rtol 0 means an element passes iff |diff| <= atol
    acc = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=0.0))
    pairs = list(results.items())
    ref_name, ref_iters = pairs[0]
    report = {"runners": [r for r, _ in pairs], "reference": ref_name, "atol": atol, "iterations": len(feeds), "outputs": {},
              "passed": bool(acc), "notes": notes}
    for name, iters in pairs[1:]:
        per = {}
        for out_name in STEP_OUTPUTS:
            a = np.concatenate([np.asarray(r[out_name]).ravel() for r in ref_iters])
            b = np.concatenate([np.asarray(r[out_name]).ravel() for r in iters])
            diff = np.abs(a.astype(np.float64) - b)
            per[out_name] = {"max_abs": float(diff.max()),
                             "max_rel": float((diff / np.maximum(np.abs(a), 1e-6)).max()),
                             "passed": bool(diff.max() <= atol)}
        report["outputs"][name] = per
    return report
