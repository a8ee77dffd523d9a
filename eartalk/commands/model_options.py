"""Options shared by the commands that run a model (generate, stream, eval), parsed one way."""
from __future__ import annotations

import os
from pathlib import Path


def add_model_options(p, backends: bool = True) -> None:
    p.add_argument("--model", default="tiny", help="preset name or bundle directory (default tiny)")
    p.add_argument("--random-init", action="store_true",
                   help="a randomly initialised model of the preset (no trained weights; output is noise)")
    if backends:
        p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"), help="default torch")
        p.add_argument("--onnx-dir", type=Path, default=None, help="exported ONNX folder (--backend onnxruntime)")
        p.add_argument("--precision", default="fp32", choices=("fp32", "int8", "fp8"),
                       help="fp32 (default), or the quantized graphs of `eartalk calibrate` (--backend onnxruntime)")
    p.add_argument("--refine", type=int, default=0, metavar="K",
                   help="K extra refinement passes per frame: the most confident tokens are kept and the rest "
                        "predicted again, K + 1 passes in all (models trained with refinement, torch backend; "
                        "default 0, one pass)")
    p.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="audio guidance: each frame's logits are pushed S times as far from what the model makes of "
                        "silence, which strengthens lip-sync (1 = off; each guided frame steps the model on two rows; "
                        "default 1.5, measured best for tiny: runtime/guidance.py, docs/model-card.md)")
    p.add_argument("--decode", default=None, choices=("expected", "tokens"),
                   help="what each frame shows: 'expected' (default), every cell decoded from its code averaged under "
                        "the model's probabilities (measured closer to the truth: PSNR, visemes, pose; runtime/soft_decode.py); "
                        "'tokens', the chosen tokens' codes (as before 2026-12-06)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for --random-init, sampling and idle motion (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def apply_threads(args) -> None:
    """Idle OpenMP threads must not spin: on a 2-core CPU they steal the core the step needs
    (3x slower ticks measured). Only effective before torch is loaded, as in the CLI."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
