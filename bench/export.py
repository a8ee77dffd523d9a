"""ONNX Runtime (CPU) vs torch eager, per frame, on the same stream (2 threads each).

    python bench/export.py [--quick] [--model tiny] --json OUT

Both backends run :func:`eartalk.export.compare.run_stream` over the same PCM and portrait: the
per-frame cost is step + tokenizer_decode + audio_encoder (end to end, including the streaming
front end's log-mel), after a warm-up stream. The JSON has ``ort_vs_torch`` (torch ms/frame over
ORT ms/frame), ``ort_fps``, ``torch_fps``, per-graph ms/frame, the token agreement of the two
streams, and -- if the best backend is under 25 fps -- ``profile``: ORT's per-node-type time and
torch's top ops, to say where the time goes. Wall-clock numbers on a shared CPU are noisy.
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
from eartalk.runtime.ort_backend import OrtBackend

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
    ap.add_argument("--onnx", type=Path, default=None, help="reuse an export of the same random-init model")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    frames = a.frames or (40 if a.quick else 200)
    torch.set_num_threads(a.threads)

    from eartalk.runtime.model_loader import load_model
    bundle = load_model(a.model, random_init=True, seed=0)
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
    tg = TorchGraphs(bundle.gpt, bundle.tokenizer, bundle.audio, threads=a.threads)
    og = BackendGraphs(ort_b)
    pcm = speech_pcm(seconds=(frames + 10) / cfg.fps)
    portrait = demo_portrait(cfg)
    for g in (og, tg):                      # warm-up: allocator, thread pools, first-call paths
        run_stream(g, cfg, R, 5, pcm=pcm, portrait=portrait)
    ort_ms, ort_per, o = _ms_per_frame(og, cfg, R, frames, pcm, portrait)
    torch_ms, torch_per, t = _ms_per_frame(tg, cfg, R, frames, pcm, portrait)
    res = {"model": a.model, "random_init": True, "frames": frames, "threads": a.threads,
           "ort_vs_torch": round(torch_ms / ort_ms, 3), "ort_fps": round(1e3 / ort_ms, 2),
           "torch_fps": round(1e3 / torch_ms, 2), "ort_ms_per_frame": round(ort_ms, 3),
           "torch_ms_per_frame": round(torch_ms, 3),
           "ort_graph_ms_per_frame": {k: round(v, 3) for k, v in ort_per.items()},
           "torch_graph_ms_per_frame": {k: round(v, 3) for k, v in torch_per.items()},
           "token_agreement": float((o["tokens"] == t["tokens"]).mean()),
           "logits_max_abs_diff": float(np.abs(o["logits"] - t["logits"]).max()),
           "export_seconds": None if export_s is None else round(export_s, 1),
           "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    if max(res["ort_fps"], res["torch_fps"]) < TARGET_FPS:
        n = min(frames, 20)
        res["profile"] = {"ort_ms_per_frame_by_node_type": _ort_profile(onnx_dir, cfg, R, pcm, portrait, n, a.threads),
                          "torch_ms_per_frame_by_op": _torch_profile(tg, cfg, R, pcm, portrait, n)}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("ort_vs_torch", "ort_fps", "torch_fps", "token_agreement")}))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
