"""`eartalk calibrate`: record real step inputs, quantize to INT8/FP8 Q/DQ ONNX, report accuracy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "INT8/FP8 explicit quantization calibrated on recorded streams, with an accuracy report"
DESCRIPTION = """Explicit (Q/DQ) quantization of the step graph and the decoder, for ONNX Runtime and TensorRT.

  eartalk calibrate record --model tiny [--random-init] --data CORPUS [--split val] --out DIR
      run held-out clips through the runtime and save real step/decoder inputs (npz keyed by the ONNX
      input names: KV at varied positions incl. full windows, controls pinned and free, speech and
      silence) plus a data card with the model's weights hash and config
  eartalk calibrate quantize --onnx DIR --calib DIR --precision int8|fp8 --out DIR [--method M]
      step.<p>.onnx and tokenizer_decode.<p>.onnx (QDQ, symmetric, per-channel weights) via
      onnxruntime quantize_static; nodes failing the accuracy gate stay fp32 and are named;
      --out becomes a complete ONNX folder for `eartalk export trt --precision <p>` and
      `--backend onnxruntime --precision <p>`. fp8 needs compute capability >= 8.9: --target-sm 87 is refused.
  eartalk calibrate report --onnx DIR --precision int8 --model tiny [--random-init] --data CORPUS --out DIR
      token agreement, PSNR, lip-sync and identity-drift deltas against fp32 (JSON + markdown + PNG)

example:
  eartalk export onnx --model tiny --random-init --out build/onnx-tiny
  eartalk calibrate record --model tiny --random-init --data data/corpus --out build/calib-tiny
  eartalk calibrate quantize --onnx build/onnx-tiny --calib build/calib-tiny --precision int8 --out build/onnx-tiny-q"""


def _model_args(p):
    p.add_argument("--model", default="tiny", help="preset name or bundle directory (default tiny)")
    p.add_argument("--random-init", action="store_true", help="an untrained preset (numbers say little about a trained one)")
    p.add_argument("--seed", type=int, default=0)


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = sub.add_parser("record", help="record real step/decoder inputs from held-out clips")
    _model_args(r)
    r.add_argument("--data", required=True, type=Path, help="corpus folder (eartalk synth)")
    r.add_argument("--split", default="val", help="held-out split to record (default val)")
    r.add_argument("--out", required=True, type=Path, help="output folder (npz + card)")
    r.add_argument("--samples", type=int, default=64, help="steps to keep (default 64)")
    r.add_argument("--max-clips", type=int, default=8, help="clips to run (default 8)")
    r.add_argument("--max-frames", type=int, default=250, help="frames per clip at most (default 250)")

    q = sub.add_parser("quantize", help="write Q/DQ ONNX graphs calibrated on a recording")
    q.add_argument("--onnx", required=True, type=Path, help="folder written by `eartalk export onnx`")
    q.add_argument("--calib", required=True, type=Path, help="folder written by `eartalk calibrate record`")
    q.add_argument("--precision", required=True, choices=("int8", "fp8"))
    q.add_argument("--out", type=Path, default=None, help="output ONNX folder (default: --onnx)")
    q.add_argument("--method", default=None, choices=("entropy", "percentile", "minmax", "distribution"),
                   help="calibration (int8 default: entropy for the step graph, percentile for the decoder, "
                        "as measured on tiny; fp8 uses distribution)")
    q.add_argument("--target-sm", default=None, help="compute capability of the target, e.g. 87 (Orin), 89 (Ada)")
    q.add_argument("--graphs", default="step,tokenizer_decode", help="graphs to quantize (default step,tokenizer_decode)")
    q.add_argument("--max-rounds", type=int, default=4, help="accuracy-gate rounds excluding nodes (default 4)")
    q.add_argument("--attention", action="store_true",
                   help="also quantize the attention matmuls of two activations (queries x KV cache); "
                        "default: only ops with weights, since re-quantizing the cache every frame costs "
                        "more than it saves on CPU")
    q.add_argument("--quantize-head", action="store_true",
                   help="also quantize the output heads: the step graph's logits head and the decoder's "
                        "pixel and flow convs (default: kept fp32, as LLM quantizers keep lm_head)")

    a = sub.add_parser("report", help="accuracy of a quantized folder against its fp32 graphs")
    a.add_argument("--onnx", required=True, type=Path, help="folder with the quantized graphs")
    a.add_argument("--precision", required=True, choices=("int8", "fp8"))
    _model_args(a)
    a.add_argument("--data", required=True, type=Path, help="corpus folder")
    a.add_argument("--split", default="test", help="held-out split (default test)")
    a.add_argument("--out", required=True, type=Path, help="report folder")
    a.add_argument("--max-clips", type=int, default=8,
                   help="held-out clips (default 8: on 2 clips, ~450 frames, the lip-sync r of two free-running "
                        "streams moved by a few percent from sampling alone)")
    a.add_argument("--max-frames", type=int, default=250, help="frames per clip (default 250)")
    a.add_argument("--frames-drift", type=int, default=2000, help="identity drift run length (default 2000)")
    a.add_argument("--guidance", type=float, default=1.0, metavar="S",
                   help="audio guidance of the measured streams (runtime/guidance.py; default 1, unguided, one step "
                        "row per frame, as the shipped reports; the runtime's default is 1.5)")


def run(args) -> int:
    if args.action == "record":
        from eartalk.calibration.record import record
        card = record(args.model, args.data, args.out, split=args.split, random_init=args.random_init,
                      seed=args.seed, max_clips=args.max_clips, max_frames=args.max_frames, samples=args.samples)
        print(f"recorded {card['samples']} steps from {len(card['clips'])} clips into {args.out} "
              f"(full window {card['positions']['full_window_share']:.0%}, pinned {card['user_pinned_share']:.0%}, "
              f"speech {card['speech_share']:.0%})")
        return 0
    if args.action == "quantize":
        from eartalk.calibration.quantize import quantize
        res = quantize(args.onnx, args.calib, args.precision, args.out, method=args.method, target_sm=args.target_sm,
                       activations=args.attention, quantize_head=args.quantize_head,
                       graphs=tuple(g for g in args.graphs.split(",") if g), max_rounds=args.max_rounds,
                       log=lambda m: print(m, file=sys.stderr))
        failed = []
        for kind, e in res.items():
            print(f"{e['file']}: {e['quantized_nodes']}/{e['candidate_nodes']} nodes {args.precision}, metrics "
                  f"{json.dumps({k: round(v, 4) for k, v in e['metrics'].items()})}, gate "
                  f"{'passed' if e['gate_passed'] else 'FAILED'}; kept fp32 by the gate: {', '.join(e['excluded_nodes']) or 'none'}"
                  + (f"; output heads fp32: {', '.join(e['head_nodes_fp32'])}" if e.get("head_nodes_fp32") else ""))
            if not e["gate_passed"]:
                failed.append(kind)
        if failed:
            print(f"accuracy gate failed for {failed} even after excluding nodes: see manifest.json 'quantized'",
                  file=sys.stderr)
            return 1
        return 0
    from eartalk.calibration.report import accuracy_report, format_markdown
    rep = accuracy_report(args.onnx, args.precision, args.data, args.out, model=args.model,
                          random_init=args.random_init, seed=args.seed, split=args.split, max_clips=args.max_clips,
                          max_frames=args.max_frames, frames_drift=args.frames_drift, guidance=args.guidance)
    print(format_markdown(rep))
    return 0
