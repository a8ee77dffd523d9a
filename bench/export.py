"""ONNX Runtime (CPU) vs torch eager, per frame, on the same stream (2 threads each).

    python bench/export.py [--quick] [--model tiny] --json OUT

Two measurements, both one session, after a warm-up:

* ``engine`` (the top-level ``ort_fps``, ``torch_fps``, ``ort_vs_torch``): the runtime itself,
  end to end -- an ``Engine`` with one session over ``OrtBackend`` / ``TorchBackend``, PCM pushed
  in ~62 ms chunks as a live source would and every ready frame taken out of ``frames()``; wall
  time per frame with a breakdown (audio front end = log-mel + audio encoder, gather, step,
  append, decode incl. the uint8 conversion, other = the rest of the Python per frame). The two
  backends run alternately, ``--reps`` times each, and the best rep counts (the CPU is shared).
* ``graph_harness``: :func:`eartalk.export.compare.run_stream` over the bare graphs (no engine):
  per-graph ms/frame, token agreement, logits diff, and how many uint8 pixels of the two streams'
  frames differ (``Backend.decode``'s rounding of each backend's float decode).

If the best backend is under 25 fps, ``profile`` has ORT's per-node-type time and torch's top ops.
Wall-clock numbers on a shared CPU are noisy: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from eartalk.export.compare import (BackendGraphs, TorchGraphs, bundle_hash, demo_portrait, run_stream,
                                    speech_pcm)
from eartalk.export.onnx_export import export_onnx
from eartalk.runtime.backend import to_uint8_frames
from eartalk.runtime.ort_backend import OrtBackend
from eartalk.runtime.torch_backend import TorchBackend

TARGET_FPS = 25.0
PER_FRAME = ("step", "tokenizer_decode", "audio_encoder")


def _ms_per_frame(graphs, cfg, R, frames, pcm, portrait):
    timer: dict = {}
    t0 = time.perf_counter()
    out = run_stream(graphs, cfg, R, frames, pcm=pcm, portrait=portrait, timer=timer)
    wall = time.perf_counter() - t0
    per = {k: 1e3 * timer.get(k, 0.0) / frames for k in PER_FRAME}
    # end to end: the whole stream's wall time (incl. log-mel, cache layout, argmax) per frame,
    # minus the once-per-session graphs (portrait tokenize/reference, prefill)
    once = sum(timer.get(k, 0.0) for k in ("tokenizer_encode", "tokenizer_reference", "prefill"))
    return 1e3 * (wall - once) / frames, per, out


class _Timed:
    """Accumulates wall seconds per name around the engine's per-frame calls (bench only)."""

    def __init__(self):
        self.t: dict = defaultdict(float)

    def wrap(self, obj, attr: str, name: str):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[name] += time.perf_counter() - t0
        setattr(obj, attr, timed)


def _engine_stream(backend, pcm, portrait_u8, frames):
    """One session on a fresh Engine over ``backend``: (ms/frame, breakdown ms/frame, uint8 frames)."""
    from eartalk.runtime.scheduler import Engine
    eng = Engine(backend, max_sessions=1)
    sess = eng.open_session(portrait_u8)                         # once per session: not timed
    tm = _Timed()
    st = sess._state
    tm.wrap(st.frontend.logmel, "frames_np", "log_mel")
    tm.wrap(st.frontend, "_run", "audio_encoder")
    tm.wrap(eng.cache, "gather", "gather")
    tm.wrap(eng.cache, "append", "append")
    step_attr = "step_torch" if hasattr(backend, "step_torch") else "step"   # what Engine._step calls
    tm.wrap(backend, step_attr, "step")
    tm.wrap(backend, "decode", "decode")
    out = []
    pcm = pcm[: frames * 640]
    t0 = time.perf_counter()
    for ch in np.array_split(pcm, max(1, pcm.size // 1000)):   # ~62 ms pushes, like a live source
        sess.push_audio(ch)
        out.extend(f.image for f in sess.frames())
    sess.flush()
    out.extend(f.image for f in sess.frames())
    wall = time.perf_counter() - t0
    for attr in (step_attr, "decode"):                            # undo the instance wrappers
        del backend.__dict__[attr]
    sess.close()
    eng.close()
    n = len(out)
    per = {k: 1e3 * v / n for k, v in tm.t.items()}
    per["audio_front_end"] = per.pop("log_mel", 0.0) + per.get("audio_encoder", 0.0)
    per["other"] = 1e3 * wall / n - sum(v for k, v in per.items() if k not in ("audio_encoder",))
    return 1e3 * wall / n, per, np.stack(out)


def _pixel_diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"values_differing": int((d > 0).sum()), "of": int(d.size), "max_abs": int(d.max()),
            "frames_differing": int((d.reshape(len(d), -1).max(1) > 0).sum()), "frames": int(len(d))}


def _ort_profile(onnx_dir, cfg, R, pcm, portrait, frames, threads):
    from eartalk.runtime.ort_backend import OrtGraphs
    with tempfile.TemporaryDirectory() as d:
        g = OrtGraphs(onnx_dir, threads=threads, profile_prefix=os.path.join(d, "ort"))
        run_stream(g, cfg, R, frames, pcm=pcm, portrait=portrait)
        by_type: dict = defaultdict(float)
        for kind, path in g.end_profiling().items():
            for ev in json.loads(Path(path).read_text()):
                if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                    by_type[f"{kind}:{ev['args'].get('op_name', '?')}"] += ev["dur"] / 1e3
    top = sorted(by_type.items(), key=lambda kv: -kv[1])[:15]
    return {k: round(v / frames, 3) for k, v in top}   # ms per frame


def _torch_profile(tg, cfg, R, pcm, portrait, frames):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_stream(tg, cfg, R, frames, pcm=pcm, portrait=portrait)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    return {e.key: round(e.self_cpu_time_total / 1e3 / frames, 3) for e in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 frames instead of 200")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx", type=Path, default=None, help="reuse an ONNX export of the same model (and weights)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=2, help="alternating engine runs per backend")
    a = ap.parse_args(argv)
    frames = a.frames or (40 if a.quick else 200)
    torch.set_num_threads(a.threads)

    from eartalk.runtime.model_loader import load_model
    from eartalk.runtime.model_loader import is_trained
    random_init = not is_trained(a.model)   # speed does not depend on the weights; parity does
    bundle = load_model(a.model, random_init=random_init, seed=0)
    cfg, R = bundle.cfg, bundle.audio.receptive_field
    onnx_dir = a.onnx
    tmp = None
    if onnx_dir is None:
        tmp = tempfile.TemporaryDirectory()
        onnx_dir = Path(tmp.name)
        t0 = time.perf_counter()
        export_onnx(cfg, bundle.gpt, bundle.tokenizer, bundle.audio, onnx_dir, model_name=a.model,
                    weights_hash=bundle_hash(bundle))
        export_s = time.perf_counter() - t0
    else:
        export_s = None
    ort_b = OrtBackend.from_bundle(onnx_dir, bundle, threads=a.threads)
    torch_b = TorchBackend(bundle, device="cpu")
    tg = TorchGraphs(bundle.gpt, bundle.tokenizer, bundle.audio, threads=a.threads)
    og = BackendGraphs(ort_b)
    pcm = speech_pcm(seconds=(frames + 10) / cfg.fps)
    portrait = demo_portrait(cfg)
    portrait_u8 = np.ascontiguousarray(np.round(portrait[0].transpose(1, 2, 0) * 255).astype(np.uint8))

    # --- the runtime, end to end (top-level numbers)
    engine = {"ort": [], "torch": []}
    for b in (ort_b, torch_b):                 # warm-up: allocator, thread pools, first-call paths
        _engine_stream(b, pcm, portrait_u8, 10)
    for _ in range(a.reps):                    # alternate so both see the same background load
        for name, b in (("ort", ort_b), ("torch", torch_b)):
            engine[name].append(_engine_stream(b, pcm, portrait_u8, frames))
    best = {k: min(v, key=lambda r: r[0]) for k, v in engine.items()}
    ort_ms, torch_ms = best["ort"][0], best["torch"][0]

    # --- the bare graphs (run_stream)
    for g in (og, tg):
        run_stream(g, cfg, R, 5, pcm=pcm, portrait=portrait)
    h_ort_ms, ort_per, o = _ms_per_frame(og, cfg, R, frames, pcm, portrait)
    h_torch_ms, torch_per, t = _ms_per_frame(tg, cfg, R, frames, pcm, portrait)
    res = {"model": a.model, "random_init": random_init, "frames": frames, "threads": a.threads,
           "ort_vs_torch": round(torch_ms / ort_ms, 3), "ort_fps": round(1e3 / ort_ms, 2),
           "torch_fps": round(1e3 / torch_ms, 2), "ort_ms_per_frame": round(ort_ms, 3),
           "torch_ms_per_frame": round(torch_ms, 3),
           "engine": {
               "what": "Engine + one session, PCM pushed in ~62 ms chunks, frames() drained; best of reps",
               "reps_ms_per_frame": {k: [round(r[0], 3) for r in v] for k, v in engine.items()},
               "ort_breakdown_ms_per_frame": {k: round(v, 3) for k, v in sorted(best["ort"][1].items())},
               "torch_breakdown_ms_per_frame": {k: round(v, 3) for k, v in sorted(best["torch"][1].items())},
               "uint8_frames_ort_vs_torch": _pixel_diff(best["ort"][2], best["torch"][2])},
           "graph_harness": {
               "what": "export.compare.run_stream over the bare graphs (no engine), ms per frame",
               "ort_ms_per_frame": round(h_ort_ms, 3), "torch_ms_per_frame": round(h_torch_ms, 3),
               "ort_graph_ms_per_frame": {k: round(v, 3) for k, v in ort_per.items()},
               "torch_graph_ms_per_frame": {k: round(v, 3) for k, v in torch_per.items()},
               "token_agreement": float((o["tokens"] == t["tokens"]).mean()),
               "logits_max_abs_diff": float(np.abs(o["logits"] - t["logits"]).max()),
               "decode_float_max_abs_diff": float(np.abs(o["images"] - t["images"]).max()),
               "uint8_frames_ort_vs_torch": _pixel_diff(to_uint8_frames(o["images"]), to_uint8_frames(t["images"]))},
           "export_seconds": None if export_s is None else round(export_s, 1),
           "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    if max(res["ort_fps"], res["torch_fps"]) < TARGET_FPS:
        n = min(frames, 20)
        res["profile"] = {"ort_ms_per_frame_by_node_type": _ort_profile(onnx_dir, cfg, R, pcm, portrait, n, a.threads),
                          "torch_ms_per_frame_by_op": _torch_profile(tg, cfg, R, pcm, portrait, n)}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("ort_vs_torch", "ort_fps", "torch_fps")}))
    print(json.dumps(res["engine"]["ort_breakdown_ms_per_frame"]))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
