"""`eartalk export`: ONNX graphs, TensorRT engines, trtexec commands, and parity checks."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HELP = "export ONNX graphs / TensorRT engines, print trtexec commands, compare backends"
DESCRIPTION = """Export the model for deployment.

  eartalk export onnx --model tiny [--random-init] --out DIR
      step, prefill, tokenizer_{encode,reference,decode}, audio_encoder .onnx + manifest.json
      (opset 18, dynamic batch only, provenance in metadata_props, TensorRT-10 op set checked)
  eartalk export trt --onnx DIR --precision fp16|bf16|int8|fp8 --out DIR
      TensorRT engines (Python API, strongly typed) + a sidecar .json per engine; run on the target
  eartalk export trtexec --onnx DIR [--precision P] [--trt 10|11]
      the exact trtexec build and profiling commands for every graph
  eartalk export compare --onnx DIR [--inputs recorded.npz]
      polygraphy: torch vs ONNX Runtime (vs TensorRT) on recorded step inputs, atol 1e-4

example: eartalk export onnx --model tiny --random-init --out build/onnx-tiny"""


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    o = sub.add_parser("onnx", help="export the ONNX graphs")
    _model_args(o)
    o.add_argument("--out", required=True, type=Path, help="output folder")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset, 18..20 (default 18)")
    o.add_argument("--graphs", default=None, help="comma-separated subset of graphs (default: all)")

    t = sub.add_parser("trt", help="build TensorRT engines (needs tensorrt and a GPU)")
    t.add_argument("--onnx", required=True, type=Path, help="folder written by `export onnx`")
    t.add_argument("--precision", required=True, choices=("fp32", "fp16", "bf16", "int8", "fp8"))
    t.add_argument("--out", required=True, type=Path, help="engine folder")
    t.add_argument("--opt-batch", type=int, default=1, help="batch the profile is tuned for (default 1)")
    t.add_argument("--max-batch", type=int, default=None, help="largest batch (default: the model's max_batch)")
    t.add_argument("--graphs", default=None, help="comma-separated subset of graphs")
    t.add_argument("--device", type=int, default=0, help="CUDA device (default 0)")

    x = sub.add_parser("trtexec", help="print trtexec build/profile commands")
    x.add_argument("--onnx", required=True, type=Path, help="folder written by `export onnx`")
    x.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8", "fp8"))
    x.add_argument("--trt", type=int, default=10, choices=(10, 11), help="TensorRT major version (default 10)")
    x.add_argument("--engines", type=Path, default=None, help="engine folder (default: ONNX/engines)")
    x.add_argument("--opt-batch", type=int, default=1)
    x.add_argument("--strongly-typed", action="store_true", help="TensorRT 10: strongly typed instead of flags")
    x.add_argument("--trtexec", default="trtexec", help="trtexec binary (Jetson: /usr/src/tensorrt/bin/trtexec)")
    x.add_argument("--no-write", action="store_true", help="do not write the fp16/bf16 ONNX a command needs")

    c = sub.add_parser("compare", help="polygraphy: torch vs ONNX Runtime (vs TensorRT) on step inputs")
    c.add_argument("--onnx", required=True, type=Path, help="folder written by `export onnx`")
    c.add_argument("--inputs", type=Path, default=None, help="recorded step inputs (.npz); default: record a stream")
    c.add_argument("--steps", type=int, default=8, help="steps to record when --inputs is not given")
    c.add_argument("--engine", type=Path, default=None, help="a step engine to compare too (needs tensorrt)")
    c.add_argument("--atol", type=float, default=1e-4)
    c.add_argument("--save-inputs", type=Path, default=None, help="write the recorded inputs here (.npz)")
    c.add_argument("--random-init", action="store_true",
                   help="the ONNX came from a random-init model (the torch side is rebuilt the same way)")
    c.add_argument("--json", type=Path, default=None, help="write the report as JSON")


def _model_args(p):
    p.add_argument("--model", default="tiny", help="model name or preset (default tiny)")
    p.add_argument("--random-init", action="store_true",
                   help="randomly initialised weights (until trained weights ship)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init (default 0)")


def load_models(name: str, random_init: bool, seed: int = 0):
    """(cfg, gpt, tokenizer, audio_encoder, weights_hash or None) from the runtime's model loader."""
    from eartalk.export.compare import bundle_hash
    from eartalk.runtime import model_loader
    b = model_loader.load_model(name, random_init=random_init, seed=seed)
    return b.cfg, b.gpt, b.tokenizer, b.audio, bundle_hash(b)


def run(args) -> int:
    return {"onnx": _onnx, "trt": _trt, "trtexec": _trtexec, "compare": _compare}[args.action](args)


def _graphs(s):
    return tuple(g.strip() for g in s.split(",")) if s else None


def _onnx(args) -> int:
    from eartalk.export.onnx_export import export_onnx
    t0 = time.perf_counter()
    cfg, gpt, tok, enc, wh = load_models(args.model, args.random_init, args.seed)
    m = export_onnx(cfg, gpt, tok, enc, args.out, model_name=args.model, weights_hash=wh, opset=args.opset,
                    graphs=_graphs(args.graphs), log=print)
    print(f"wrote {len(m['files'])} graphs + manifest.json to {args.out} in {time.perf_counter() - t0:.1f} s "
          f"(opset {m['opset']}, weights sha256 {m['weights_sha256'][:16]}...)")
    return 0


def _trt(args) -> int:
    from eartalk.export.trt_build import PrecisionUnsupported, TensorRTUnavailable, build_all
    try:
        metas = build_all(args.onnx, args.out, args.precision, graphs=_graphs(args.graphs),
                          opt_batch=args.opt_batch, max_batch=args.max_batch, device=args.device)
    except TensorRTUnavailable as e:
        print(f"eartalk export trt: {e}", file=sys.stderr)
        return 3
    except PrecisionUnsupported as e:
        print(f"eartalk export trt: refused: {e}", file=sys.stderr)
        return 4
    for m in metas:
        print(f"{m['graph']}: TensorRT {m['tensorrt_version']}, sm_{m['compute_capability'].replace('.', '')}, {m['precision']}")
    return 0


def _trtexec(args) -> int:
    from eartalk.export import metadata as md
    from eartalk.export.trt_build import precision_onnx
    from eartalk.export.trtexec import render
    manifest = md.read_manifest(args.onnx)
    st = True if args.strongly_typed else None
    strongly = args.trt >= 11 or args.strongly_typed
    if args.precision in ("fp16", "bf16") and strongly and not args.no_write:
        for kind in manifest["files"]:   # the typed ONNX the strongly typed commands read
            print(f"# wrote {precision_onnx(args.onnx, kind, args.precision, args.onnx)}")
    print(render(manifest, str(args.onnx), str(args.engines) if args.engines else None, args.precision,
                 args.trt, args.opt_batch, st, trtexec=args.trtexec), end="")
    return 0


def _compare(args) -> int:
    from eartalk.export import metadata as md
    from eartalk.export.compare import compare_step, load_recorded, run_stream, save_recorded
    from eartalk.runtime.ort_backend import OrtGraphs
    manifest = md.read_manifest(args.onnx)
    cfg, gpt, tok, enc, wh = load_models(manifest["model"], args.random_init)
    if manifest["model_config"] != cfg.to_dict():
        raise ValueError(f"{args.onnx}: exported for another config than model {manifest['model']!r}")
    if args.inputs:
        feeds = load_recorded(args.inputs)
    else:
        # record from a real stream through ONNX Runtime (speech + a rendered portrait)
        rec = run_stream(OrtGraphs(args.onnx), cfg, enc.receptive_field, frames=max(args.steps, 2),
                         record_steps=args.steps, decode=False)["recorded"]
        if args.save_inputs:
            save_recorded(args.save_inputs, rec)
        feeds = [{n: rec[n][i] for n in rec} for i in range(args.steps)]
    report = compare_step(args.onnx / manifest["files"]["step"]["file"], gpt, feeds, atol=args.atol,
                          engine_path=args.engine)
    for runner, outs in report["outputs"].items():
        for name, r in outs.items():
            print(f"{report['reference']} vs {runner}: {name:7s} max abs {r['max_abs']:.3e}  max rel "
                  f"{r['max_rel']:.3e}  {'PASS' if r['passed'] else 'FAIL'} (atol {args.atol:g})")
    for n in report["notes"]:
        print(n)
    print("PASSED" if report["passed"] else "FAILED", f"over {report['iterations']} recorded steps")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1
