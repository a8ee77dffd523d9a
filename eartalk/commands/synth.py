"""`eartalk synth`: generate the synthetic talking-face corpus."""
from __future__ import annotations

from pathlib import Path

HELP = "generate a synthetic talking-face corpus (speech, video, exact per-frame ground truth)"
DESCRIPTION = """Generate a synthetic talking-face corpus.

Each clip: an mp4 (H.264 + AAC, 25 fps), a 16 kHz wav, and <clip>.gt.csv with one row per frame
(phoneme, viseme, mouth shape, pose, gaze, blink, emotion, identity parameters), plus
<clip>.json metadata. Speech comes from eSpeak NG with phoneme timing from its own events; faces
from a procedural renderer. The same --seed gives the same frames and byte-identical ground
truth. Splits (splits.json) hold out whole identities and whole voices; a data card
(data_card.md / .json) is written beside the data. An interrupted run resumes where it stopped.

example: eartalk synth --out data/corpus --clips 8 --seed 7"""


def add_arguments(p):
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--clips", required=True, type=int, help="number of clips (> 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=128, help="frame size in pixels, a multiple of 16 (default 128)")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: all cores)")
    p.add_argument("--identities", type=int, default=None,
                   help="number of distinct faces (default: about one per 4 clips, at least 3)")
    p.add_argument("--voices", default=None,
                   help="comma-separated eSpeak voices to use (default: all built-in voices)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from eartalk.data.synth import synthesize_corpus
    voices = tuple(v.strip() for v in args.voices.split(",")) if args.voices else None
    card = synthesize_corpus(args.out, args.clips, args.seed, size=args.size, workers=args.workers,
                             n_identities=args.identities, voices=voices, progress=not args.quiet)
    print(f"wrote {card['clips']} clips ({card['hours'] * 60:.1f} min of speech, {card['identities']} identities, "
          f"{len(card['voices'])} voices) to {args.out}; data card: {Path(args.out) / 'data_card.md'}")
    return 0
