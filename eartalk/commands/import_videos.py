"""`eartalk import`: the user's own videos into the training format."""
from __future__ import annotations

from pathlib import Path

HELP = "import a folder of your own videos (mp4 with audio, faces cropped) as a training corpus"
DESCRIPTION = """Import a folder of your own videos into the corpus format that `eartalk train` reads.

Each mp4 (with an audio track, the face already cropped square) is decoded with PyAV, resampled to
25 fps and 16 kHz, resized to --size, and written as a clip (frames, wav, json); whole files go
to the train or validation split (--val-fraction). Re-running skips files already imported at the
same size. Videos carry no ground-truth controls, so the way to use them is a fine-tune of the
shipped model (its controls kept; ~9 minutes), with a synthetic corpus mixed in:

example:
  eartalk import --videos my_videos --out data/mine
  eartalk synth --out data/corpus --clips 200
  eartalk train --from tiny --data data/mine --mix data/corpus --out runs/mine
  eartalk generate --model runs/mine --portrait me.png --audio speech.wav --out me.mp4"""


def add_arguments(p):
    p.add_argument("--videos", required=True, type=Path, help="folder of .mp4 files with audio")
    p.add_argument("--out", required=True, type=Path, help="corpus folder to create or extend")
    p.add_argument("--size", type=int, default=128, help="frame size in pixels (default 128, the tiny model's)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of files held out for validation (default 0.2)")
    p.add_argument("--write-video", action="store_true", help="also write each clip's mp4 (for looking at)")


def run(args) -> int:
    from eartalk.data.user_videos import import_user_videos
    if not args.videos.is_dir():
        raise FileNotFoundError(f"--videos {args.videos}: not a folder of videos")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    splits = import_user_videos(args.videos, args.out, size=args.size, val_fraction=args.val_fraction,
                                write_video=args.write_video)
    print(f"imported into {args.out}: {len(splits['train'])} train clips, {len(splits['val'])} val clips")
    print(f"next: eartalk train --from tiny --data {args.out} --mix CORPUS --out runs/mine "
          f"(CORPUS from `eartalk synth --out CORPUS --clips 200`)")
    return 0
