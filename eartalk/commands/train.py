"""`eartalk train`: train the probe, the tokenizer or the transformer."""
from __future__ import annotations

from pathlib import Path

HELP = "train the probe (the measuring instrument), the tokenizer or the transformer"
DESCRIPTION = """Train a component on a corpus made by `eartalk synth` (or imported videos).

  eartalk train probe --data data/corpus --out eartalk/assets/probe
      the probe: from one frame, viseme, mouth openness, pose, gaze, blink, emotion and an
      identity embedding; trained only on rendered frames and their ground truth. Writes
      probe.safetensors, probe.json, report.json/.md (held-out accuracy) and loss.png."""


def add_arguments(p):
    p.add_argument("what", choices=["probe"], help="what to train")
    p.add_argument("--data", required=True, type=Path, help="corpus folder (from `eartalk synth`)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--batch", type=int, default=96, help="batch size (default 96)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--every", type=int, default=3, help="use every k-th frame of each clip (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not (args.data / "splits.json").exists():
        raise FileNotFoundError(f"--data {args.data} is not a corpus (no splits.json); make one with `eartalk synth`")
    if args.what == "probe":
        from eartalk.probe.train import report_markdown, train_probe
        rep = train_probe(args.data, args.out, steps=args.steps, batch=args.batch, lr=args.lr,
                          every=args.every, seed=args.seed, progress=not args.quiet)
        print(report_markdown(rep))
        print(f"probe written to {args.out}")
    return 0
