"""INT8 vs fp32 on ONNX Runtime CPU, per frame (step + decode), side by side on the same stream.

Tiny preset with RANDOM weights unless --model names a trained bundle (timing does not depend on
training; accuracy does, so the accuracy numbers here are labelled with the model).

    python bench/quant.py [--quick] --json OUT.json [--onnx DIR] [--calib DIR] [--data CORPUS]

Method (also written into the JSON under "method"):

* one fp32 stream (``export.compare.run_stream``: rendered portrait, speech, a control arriving
  mid-stream) is run and every step input is kept; then, frame by frame and interleaved (so load
  from other processes hits both alike), the fp32 and the int8 step graph run on those same
  inputs, and the fp32 and int8 decoder on the fp32 tokens. Wall time per call (perf_counter,
  host latency of one batch-1 call, not GPU time), median over frames.
* token agreement: argmax of int8 logits == fp32's on the same inputs; psnr_db: uint8 frames of
  the int8 decoder against fp32's on the same tokens (mean MSE -> dB).
* if int8 is not >= 1.5x faster per frame, "profile" holds ORT's per-node profiler summed per op
  type (ms per frame) for both precisions: where the time goes.
* ``--onnx`` without int8 graphs: they are made here (``calibrate record`` on ``--data``'s val split,
  or on speech-like synthetic streams without ``--data``; then ``calibrate quantize``).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")    # see bench/runtime.py

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

TARGET_SPEEDUP = 1.5


def _prepare(args, log):
    """-> (onnx_dir with int8 graphs, bundle)."""
    from eartalk.export import metadata as md
    from eartalk.export.compare import bundle_hash
    from eartalk.export.onnx_export import export_onnx
    from eartalk.runtime.model_loader import load_model
    bundle = load_model(args.model, random_init=args.random_init, seed=0)
    onnx_dir = Path(args.onnx) if args.onnx else Path(tempfile.mkdtemp(prefix="quant_bench_"))
    if not (onnx_dir / md.MANIFEST).is_file():
        log(f"exporting {args.model} to {onnx_dir}")
        b = bundle
        export_onnx(b.cfg, b.gpt, b.tokenizer, b.audio, onnx_dir, model_name=str(args.model),
                    weights_hash=bundle_hash(b), graphs=("step", "tokenizer_decode", "prefill", "tokenizer_encode",
                                                         "tokenizer_reference", "audio_encoder"))
    if "int8" not in md.read_manifest(onnx_dir).get("quantized", {}):
        from eartalk.calibration.quantize import quantize
        calib = Path(args.calib) if args.calib else onnx_dir / "calib"
        if not (calib / "card.json").is_file():
            if not args.data:
                raise SystemExit("no int8 graphs in --onnx and no --calib: pass --data CORPUS to record one")
            from eartalk.calibration.record import record
            record(args.model, args.data, calib, random_init=args.random_init, samples=16 if args.quick else 48,
                   max_clips=4 if args.quick else 8, max_frames=120, progress=False)
        quantize(onnx_dir, calib, "int8", log=log)
    return onnx_dir, bundle


def _profile(onnx_dir, bundle, feeds, tokens, ref, precision, frames) -> dict:
    """ORT per-node profiler over ``frames`` step+decode calls -> ms per frame per op type."""
    from eartalk.runtime.ort_backend import OrtBackend
    prefix = str(Path(tempfile.mkdtemp(prefix="ortprof_")) / precision)
    be = OrtBackend.from_bundle(onnx_dir, bundle, precision=precision, profile_prefix=prefix)
    for i in range(frames):
        be.step(*feeds[i])
        be.decode_float(be.codes_of(tokens[i][None]), ref)
    files = be.end_profiling()
    per_graph = {}
    for kind in ("step", "tokenizer_decode"):
        events = json.loads(Path(files[kind]).read_text())
        acc: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                acc[op] = acc.get(op, 0.0) + e["dur"] / 1000.0 / frames
        per_graph[kind] = dict(sorted(((k, round(v, 4)) for k, v in acc.items()), key=lambda kv: -kv[1]))
    be.close()
    return per_graph


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer frames")
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--model", default="tiny")
    p.add_argument("--onnx", default=None, help="ONNX folder (exported; int8 graphs made if missing)")
    p.add_argument("--calib", default=None, help="calibration recording (default: record one from --data)")
    p.add_argument("--data", default=None, help="corpus for recording calibration data")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frames", type=int, default=None)
    args = p.parse_args(argv)
    from eartalk.runtime.model_loader import is_trained
    args.random_init = not is_trained(args.model)    # an untrained preset: random weights, said so
    log = lambda m: print(m, flush=True)   # noqa: E731
    from eartalk.evaluate import psnr
    from eartalk.export.compare import BackendGraphs, demo_portrait, run_stream, speech_pcm
    from eartalk.runtime.backend import to_uint8_frames
    from eartalk.runtime.ort_backend import OrtBackend

    onnx_dir, bundle = _prepare(args, log)
    cfg = bundle.cfg
    T = args.frames or (40 if args.quick else 150)
    fp = OrtBackend.from_bundle(onnx_dir, bundle, threads=args.threads)
    q = OrtBackend.from_bundle(onnx_dir, bundle, threads=args.threads, precision="int8")
    stream = run_stream(BackendGraphs(fp), cfg, fp.receptive_field, T, pcm=speech_pcm(seconds=T / cfg.fps + 1),
                        record_steps=T, decode=False)
    rec = stream["recorded"]
    names = ("prev_tokens", "audio", "cond", "cond_mask", "past_k", "past_v", "past_lag")
    feeds = [tuple(rec[n][i] for n in names) for i in range(T)]
    tokens = stream["tokens"]
    ref = fp.reference(demo_portrait(cfg))          # the portrait run_stream used
    times = {k: [] for k in ("fp32_step", "int8_step", "fp32_decode", "int8_decode")}
    agree, psnrs = [], []
    for warm in (True, False):           # one untimed pass first: allocations, thread pools
        for i in range(min(5, T) if warm else T):
            for prec, be in (("fp32", fp), ("int8", q)) if i % 2 == 0 else (("int8", q), ("fp32", fp)):
                t0 = time.perf_counter()
                logits, _, _ = be.step(*feeds[i])
                t1 = time.perf_counter()
                img = be.decode_float(be.codes_of(tokens[i][None]), ref)
                t2 = time.perf_counter()
                if not warm:
                    times[f"{prec}_step"].append(t1 - t0)
                    times[f"{prec}_decode"].append(t2 - t1)
                    if prec == "fp32":
                        out_fp = (logits, img)
                    else:
                        out_q = (logits, img)
            if not warm:
                agree.append(float(np.mean(out_fp[0].argmax(-1) == out_q[0].argmax(-1))))
                psnrs.append(psnr(to_uint8_frames(out_fp[1])[0], to_uint8_frames(out_q[1])[0]))
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    frame = {p_: med[f"{p_}_step"] + med[f"{p_}_decode"] for p_ in ("fp32", "int8")}
    speed = frame["fp32"] / frame["int8"]
    mse = [0.0 if math.isinf(x) else 255.0 ** 2 / 10 ** (x / 10) for x in psnrs]
    psnr_db = math.inf if np.mean(mse) == 0 else 10 * math.log10(255.0 ** 2 / float(np.mean(mse)))
    qinfo = fp.graphs.manifest["quantized"]["int8"]
    result = {
        "int8_vs_fp32": {
            "step_ms": {"fp32": round(med["fp32_step"], 3), "int8": round(med["int8_step"], 3),
                        "speedup": round(med["fp32_step"] / med["int8_step"], 3)},
            "decode_ms": {"fp32": round(med["fp32_decode"], 3), "int8": round(med["int8_decode"], 3),
                          "speedup": round(med["fp32_decode"] / med["int8_decode"], 3)},
            "frame_ms": {"fp32": round(frame["fp32"], 3), "int8": round(frame["int8"], 3)},
            "speedup": round(speed, 3), "target_speedup": TARGET_SPEEDUP, "target_met": bool(speed >= TARGET_SPEEDUP)},
        "token_agreement": round(float(np.mean(agree)), 5),
        "psnr_db": round(psnr_db, 3) if math.isfinite(psnr_db) else "inf",
        "frames": T, "model": args.model, "random_init": args.random_init, "threads": args.threads,
        "excluded_nodes": {k: v["excluded_nodes"] for k, v in qinfo.items()},
        "calibration_method": {k: v["method"] for k, v in qinfo.items()},
        "method": "same fp32 stream inputs for both; interleaved calls; median wall ms per batch-1 call on ORT "
                  "CPU; decode on the fp32 tokens; see the module docstring",
        "notes": ["RANDOM-INIT model: accuracy numbers describe an untrained network" if args.random_init else
                  "trained model", f"CPU shared with other jobs ({os.cpu_count()} cores): absolute ms are noisy"],
    }
    if speed < TARGET_SPEEDUP:
        n = min(T, 10 if args.quick else 30)
        result["profile"] = {"unit": "ms per frame, ORT node kernel time summed per op type",
                             "fp32": _profile(onnx_dir, bundle, feeds, tokens, ref, "fp32", n),
                             "int8": _profile(onnx_dir, bundle, feeds, tokens, ref, "int8", n)}
    fp.close(), q.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps({k: result[k] for k in ("int8_vs_fp32", "token_agreement", "psnr_db")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
