"""`eartalk eval`: measure a model on held-out synthetic clips with the shipped probe."""
from __future__ import annotations

from pathlib import Path

HELP = "evaluate a model on held-out clips: PSNR/SSIM, lip-sync, control fidelity, identity drift"
DESCRIPTION = """Evaluate a model on the held-out clips of a synthetic corpus (`eartalk synth`), measured
by the shipped probe (trained on rendered ground truth only).

Per clip, the model gets the clip's portrait and speech through the streaming runtime:
  pinned run  every non-audio control pinned to the ground truth at every frame ->
              PSNR / SSIM against the renderer's frames; yaw/pitch/roll MAE (degrees), gaze
              MAE (the eye's travel, -1..1), blink obeyed (every frame, and the first frame
              after each open/closed switch), emotion recognised by the probe (target >= 90 %
              of frames), and each emotion's share of the frames pinned to it (a model that
              cannot show one hides it in the mean; the confusion matrices, pinned emotion
              against the one read, are under "emotion_confusion" in the report)
  blink steps the same pins, but the blink pinned as a user pins it: shut for 1-8 frames, then
              open (eartalk/blink_steps.py) -> the share of pulses shown shut on their first
              frame, open again on the first frame after, and of all shut frames; its ceiling
              is the renderer's frames of the same pins
  free run    controls free -> lip-sync: mouth-openness Pearson r, viseme accuracy
  drift       the first clip's audio looped to --frames-drift frames (each loop fitted to the
              clip's frames, so it stays in step with the looped truth): identity-embedding
              distance from frame 1 at frames 100, 1000, ..., linear-trend slope, ratio
              dist(last)/dist(100) (each the mean over one loop), plot in <report>.drift.png;
              run twice: controls free (the model's own motion) and pinned to the looped
              ground truth (the renders' motion: what changes is the identity alone)
The same metrics of the probe on the ground-truth renders are the ceiling, printed beside the
model's and stored under "ceiling" in the report. With the torch backend, the same metrics on the
ground truth encoded and decoded by the model's own tokenizer are printed too ("tokenizer", stored
under "tokenizer_ceiling"): what a perfect transformer would score with this tokenizer.
<report>.frames.png shows the middle frame of the first 4 clips to look at: portrait, ground truth,
controls pinned, controls free (and the tokenizer's reconstruction of the truth).
<report>.error.png maps where the pinned frames lose their PSNR: mean squared error per pixel of
the model, of its tokenizer, and their difference. Drift costs 2 x frames-drift / fps seconds
(10,000 frames at ~20 fps: ~16 minutes on tiny).

--backend onnxruntime --onnx-dir DIR [--precision int8] evaluates the exported (or quantized)
graphs instead of torch: the same metrics, about twice the speed on a CPU.

example: eartalk eval --model runs/tiny --data data/corpus --out eval/report.json --max-clips 20"""


from eartalk.commands.model_options import add_model_options, apply_threads


def add_arguments(p):
    add_model_options(p)
    p.add_argument("--data", required=True, type=Path, help="corpus directory made by `eartalk synth`")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--out", required=True, type=Path, help="report .json (the drift plot and the frame sheet go beside it)")
    p.add_argument("--frames-drift", type=int, default=10000, help="frames of the drift run (default 10000)")
    p.add_argument("--max-clips", type=int, default=None, help="evaluate only the first K clips of the split")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    apply_threads(args)
    from eartalk.evaluate import evaluate, format_table
    from eartalk.generate import open_backend
    backend = None
    if args.backend != "torch" or args.precision != "fp32":   # e.g. the int8 graphs on ONNX Runtime
        backend = open_backend(args.model, args.backend, random_init=args.random_init, seed=args.seed,
                               onnx_dir=args.onnx_dir, precision=args.precision)
    try:
        rep = evaluate(args.model, args.data, args.out, split=args.split, frames_drift=args.frames_drift,
                       max_clips=args.max_clips, random_init=args.random_init, seed=args.seed,
                       progress=not args.quiet, backend=backend, refine=args.refine,
                       guidance=args.guidance, decode=args.decode)
    finally:
        if backend is not None:
            backend.close()
    print(format_table(rep))
    beside = [args.out.with_name(rep[k]["plot"]) for k in ("drift", "frames_sheet", "error_map")]
    print(f"wrote {args.out}, {beside[0]}, {beside[1]} and {beside[2]} in {rep['seconds']:.0f} s")
    return 0
