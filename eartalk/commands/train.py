"""`eartalk train`: train the probe, or the model by recipe."""
from __future__ import annotations

from pathlib import Path

HELP = "train the probe (the measuring instrument) or the talking-head model (--recipe)"
DESCRIPTION = """Train on a corpus made by `eartalk synth` (or imported videos).

  eartalk train probe --data data/corpus --out eartalk/assets/probe
      the probe: from one frame, viseme, mouth openness, pose, gaze, blink, emotion and an
      identity embedding; trained only on rendered frames and their ground truth. Writes
      probe.safetensors, probe.json, report.json/.md (held-out accuracy) and loss.png.

  eartalk train --recipe tiny --data data/corpus --out runs/tiny
      the whole model (tokenizer, then audio encoder + transformer, then the tokenizer's decoder
      again) as the shipped default was made; resumable (finished stages are kept in OUT/work). Writes OUT/model.safetensors +
      OUT/model.json (config and weights hash), curves as PNG. Copy OUT to eartalk/assets/models/tiny
      to ship it.

  eartalk train tokenizer --recipe tiny --data data/corpus --out runs/tiny
  eartalk train gpt --recipe tiny --data data/corpus --out runs/tiny
  eartalk train decoder --recipe tiny --data data/corpus --out runs/tiny
      the recipe's three stages one at a time: the tokenizer (OUT/work/tokenizer.safetensors, its
      held-out PSNR in OUT/work/tokenizer_report.json, curves in tokenizer_curves.png, held-out
      frames beside their reconstructions in tokenizer_samples.png), then the
      audio encoder + transformer on the frozen tokenizer (resumes from OUT/work/gpt_ckpt.pt),
      then the tokenizer's decoder trained on with its encoder frozen (every code keeps its
      meaning), on the corpus's frames and the same faces re-rendered with the eyes shut, so that a
      pinned blink is drawn (OUT/work/decoder/).

  The stages stop on time (tiny: tokenizer 25, transformer 45, decoder 9 minutes), so a CPU slower than the one
  that made the shipped model trains fewer steps, and says so at the end with the --budget-scale
  that would give about the shipped step count (a tokenizer trained in another precision than the
  shipped one's, float32 against bf16, is judged by its held-out PSNR instead, as its steps are
  worth more or less than the shipped ones). The transformer stage run again with that flag
  resumes from its checkpoint to the new budget; the tokenizer stage trains again from its start:
  eartalk train gpt --recipe tiny --data data/corpus --out runs/tiny --budget-scale 2.5

  eartalk train --from tiny --data data/mine --mix data/corpus --out runs/mine
      fine-tune a trained model on one person's videos (`eartalk import`): the tokenizer's decoder
      learns their face with its encoder frozen, so every code keeps its meaning for the model's
      transformer (8 minutes; a quarter of its frames from the --mix corpus, so that expressions
      the videos never show still decode). Writes a complete model to OUT. On a new face it
      measured +0.6 dB PSNR and +0.02 viseme accuracy on held-out clips (docs/model-card.md).
      A small synthetic corpus is enough for --mix: `eartalk synth --out data/corpus --clips 200`.

  eartalk train gpt --from tiny --data data/mine --mix data/corpus --out runs/mine
      then, optionally, the transformer and audio encoder too (15 minutes), on the person's clips
      mixed half and half with the --mix corpus's, whose ground truth keeps pinned controls
      trained. On a synthetic face it lowered the token cross-entropy but not the frames' errors;
      it is there for videos whose motion differs from the renderer's."""


def add_arguments(p):
    p.add_argument("what", nargs="?", choices=["probe", "tokenizer", "gpt", "decoder"],
                   help="probe; or one stage of --recipe (tokenizer, gpt, decoder) or --from (decoder, gpt); omit for "
                        "the whole recipe, or --from's decoder stage")
    p.add_argument("--recipe", choices=None, default=None, help="model recipe: tiny (or smoke, seconds)")
    p.add_argument("--from", dest="base", default=None, metavar="MODEL",
                   help="fine-tune this trained model (preset name or bundle folder) on --data instead of "
                        "training by recipe: its decoder; with `gpt`, its transformer too")
    p.add_argument("--mix", type=Path, default=None, metavar="CORPUS",
                   help="--from: a synthetic corpus whose frames and clips are mixed into the fine-tune (keeps expressions "
                        "and controls)")
    p.add_argument("--data", required=True, type=Path, help="corpus folder (from `eartalk synth` or `eartalk import`)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--budget-scale", type=float, default=1.0, metavar="X",
                   help="recipe or --from: multiply each stage's minutes by X (default 1); X times slower CPU, "
                        "X times the minutes, about the shipped model's steps")
    p.add_argument("--steps", type=int, default=3000, help="probe: optimizer steps (default 3000)")
    p.add_argument("--batch", type=int, default=96, help="probe: batch size (default 96)")
    p.add_argument("--lr", type=float, default=2e-3, help="probe: peak learning rate (default 2e-3)")
    p.add_argument("--every", type=int, default=3, help="probe: use every k-th frame of each clip (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if not (args.data / "splits.json").exists():
        raise FileNotFoundError(f"--data {args.data} is not a corpus (no splits.json); make one with `eartalk synth`")
    if args.budget_scale != 1.0 and args.what == "probe":
        raise ValueError("--budget-scale applies to the recipe's stages (--recipe, tokenizer, gpt), not to the probe")
    if args.mix is not None and args.base is None:
        raise ValueError("--mix goes with --from (a fine-tune); the recipe trains on --data alone")
    if args.base is not None:
        return _finetune(args)
    from eartalk.model import recipe
    if args.what in ("tokenizer", "gpt", "decoder"):
        from eartalk.model.decoder_stage import decoder_stage
        name = args.recipe or "tiny"
        stage = {"tokenizer": recipe.tokenizer_stage, "gpt": recipe.gpt_stage, "decoder": decoder_stage}[args.what]
        rep = stage(name, args.data, args.out, progress=not args.quiet, seed=args.seed, budget_scale=args.budget_scale)
        print({k: v for k, v in rep.items() if k != "val_curve"})
        print(f"{args.what} stage of recipe {name} written to {args.out}")
        _shortfall(name, {args.what: rep}, args.budget_scale)
        return 0
    if args.recipe:
        rep = recipe.run_recipe(args.recipe, args.data, args.out, progress=not args.quiet, seed=args.seed,
                                budget_scale=args.budget_scale)
        gpt = rep["gpt"]
        if gpt.get("schedule_minutes", gpt["budget_minutes"]) < gpt["budget_minutes"]:
            print(f"the transformer stage trained {gpt['schedule_minutes']:g} of its {gpt['budget_minutes']:g} minutes, "
                  f"so that the recipe keeps to its {rep['total_budget_minutes']:g}")
        print(f"recipe {args.recipe}: {rep['total_minutes']} min (its budget {rep['total_budget_minutes']:g}); "
              f"model written to {args.out}")
        _shortfall(args.recipe, rep, args.budget_scale)
        return 0
    if args.what == "probe":
        from eartalk.probe.train import report_markdown, train_probe
        rep = train_probe(args.data, args.out, steps=args.steps, batch=args.batch, lr=args.lr,
                          every=args.every, seed=args.seed, progress=not args.quiet)
        print(report_markdown(rep))
        print(f"probe written to {args.out}")
        return 0
    raise ValueError("say what to train: `eartalk train probe ...`, `eartalk train --recipe tiny ...` or "
                     "`eartalk train --from tiny ...` (a fine-tune)")


def _finetune(args) -> int:
    """``--from MODEL``: the decoder stage, or the stage named (:mod:`eartalk.model.finetune`)."""
    if args.what == "probe":
        raise ValueError("--from fine-tunes a talking-head model; the probe trains from scratch (drop --from)")
    if args.recipe:
        raise ValueError(f"--from {args.base} and --recipe {args.recipe}: choose one (a fine-tune has its own settings)")
    if args.mix is not None and not (args.mix / "splits.json").exists():
        raise FileNotFoundError(f"--mix {args.mix} is not a corpus (no splits.json); make one with `eartalk synth`")
    from eartalk.model import finetune
    kw = dict(mix=args.mix, progress=not args.quiet, seed=args.seed, budget_scale=args.budget_scale)
    if args.what in ("tokenizer", "gpt", "decoder"):      # a fine-tune's tokenizer stage is its decoder stage
        stage = finetune.gpt_stage if args.what == "gpt" else finetune.decoder_stage
        rep = stage(args.base, args.data, args.out, **kw)
        print({k: v for k, v in rep.items() if k != "val_curve"})
        print(f"{args.what} stage of the fine-tune of {args.base} written to {args.out}")
        return 0
    rep = finetune.run_finetune(args.base, args.data, args.out, **kw)
    print(f"fine-tune of {args.base} (decoder stage): {rep['total_minutes']} min; model written to {args.out}")
    dec = rep.get("tokenizer")
    if dec and dec.get("val_psnr_before") is not None:
        print(f"held-out PSNR of the tokenizer on your validation clips: {dec['val_psnr_before']:.2f} -> "
              f"{dec['val_psnr']:.2f} dB")
    return 0


def _shortfall(name: str, reports: dict, budget_scale: float) -> None:
    """Print, for each stage trained, the notice of :func:`eartalk.model.recipe.step_shortfall`."""
    import sys

    from eartalk.model.recipe import step_shortfall
    for stage in ("tokenizer", "gpt", "decoder"):
        if isinstance(reports.get(stage), dict) and "steps" in reports[stage]:
            rep = reports[stage]
            trained = rep.get("schedule_minutes")     # the decoder's follows its critic's, both in its budget
            if trained is not None and stage == "decoder":
                trained += (rep.get("expression_critic") or {}).get("minutes", 0.0)
            notice = step_shortfall(name, stage, int(rep["steps"]), budget_scale, trained, rep.get("bf16"),
                                    rep.get("val_psnr"))
            if notice:
                print(f"notice: {notice}", file=sys.stderr)
