"""Users' own talking-head videos: load them as clips, or import them into the corpus format.

Expected input: a folder of video files (mp4, mov, mkv, webm, m4v) with an audio track, each
already cropped to a square around the face. Frames are resampled to 25 fps and scaled to
``size`` x ``size``; audio is resampled to 16 kHz mono. There is no ground truth (``gt=None``).
"""
from __future__ import annotations

import logging
import re
import zlib
from pathlib import Path
from typing import Iterator

from eartalk.data.corpus import (Clip, clip_done, list_clips, read_meta, read_splits,
                                 write_clip, write_splits)
from eartalk.data.video_io import FPS, read_video, video_size

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".m4v")


def find_user_videos(folder) -> list[Path]:
    """The video files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"user video folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    if not files:
        raise ValueError(f"no video files in {folder}; expected files ending in {', '.join(VIDEO_EXTS)}")
    return files


def clip_id_for(path) -> str:
    """Corpus clip id for a user video: ``user_`` + its file stem with unsafe characters as '_'."""
    return "user_" + re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).stem)


def load_user_video(path, size: int = 128) -> Clip:
    """Decode one user video to a :class:`Clip` with ``size`` x ``size`` frames at 25 fps.

    Raises ValueError naming the file if its frames are not square or it has no audio track.
    """
    path = Path(path)
    h, w = video_size(path)
    if h != w:
        raise ValueError(f"user video {path} has frames of height x width {h}x{w}; expected square "
                         f"face crops ({size}x{size}, or any square size to be rescaled)")
    if h != size:
        log.warning("user video %s is %dx%d; rescaling its frames to %dx%d", path, h, w, size, size)
    frames, audio = read_video(path, fps=FPS, size=size, resize=True)
    if audio.size == 0:
        raise ValueError(f"user video {path} has an audio track with no samples")
    meta = {"kind": "user", "source": path.name, "source_size": [h, w]}
    return Clip(clip_id=clip_id_for(path), frames=frames, audio=audio, gt=None, meta=meta)


def iter_user_videos(folder, size: int = 128) -> Iterator[Clip]:
    """Yield the clips of a folder one at a time (keeps only one decoded video in memory)."""
    for p in find_user_videos(folder):
        yield load_user_video(p, size)


def load_user_videos(folder, size: int = 128) -> list[Clip]:
    """All clips of a folder as a list (see :func:`iter_user_videos` for large folders)."""
    return list(iter_user_videos(folder, size))


def _assign_splits(ids: list[str], val_fraction: float) -> dict[str, str]:
    """Stable per-file train/val assignment: the ids with the smallest name hashes go to val.

    Hash order (not file order) keeps val from being, say, all recordings of one session; with
    two or more videos at least one is held out.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if len(ids) < 2 or val_fraction == 0 else max(1, round(len(ids) * val_fraction))
    order = sorted(ids, key=lambda c: (zlib.crc32(c.encode()), c))
    val = set(order[:n_val])
    return {c: ("val" if c in val else "train") for c in ids}


def import_user_videos(folder, corpus_dir, size: int = 128, val_fraction: float = 0.2,
                       write_video: bool = False) -> dict[str, list[str]]:
    """Import a folder of user videos into ``corpus_dir`` in the corpus format.

    Each video becomes a clip (frames.npy + wav + json, plus an mp4 if ``write_video``) with
    ``meta["split"]`` "train" or "val", assigned per file. ``splits.json`` is updated (other
    clips' entries are kept), so the training code reads synthetic and user clips alike. Clips
    already imported from the same file at the same size are skipped. Returns the user clips'
    splits.
    """
    files = find_user_videos(folder)
    ids = [clip_id_for(p) for p in files]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        clash = [p.name for p, c in zip(files, ids) if c in dupes]
        raise ValueError(f"user videos {clash} in {folder} map to the same clip ids {dupes}; rename them")
    split_of = _assign_splits(ids, val_fraction)
    for path, cid in zip(files, ids):
        if clip_done(corpus_dir, cid):
            old = read_meta(corpus_dir, cid)
            if (old.get("source") == path.name and old.get("height") == size
                    and old.get("split") == split_of[cid]):
                continue
        clip = load_user_video(path, size)
        write_clip(corpus_dir, cid, clip.frames, clip.audio, None,
                   {**clip.meta, "split": split_of[cid]}, write_video=write_video)
    ours = {"train": [c for c in ids if split_of[c] == "train"],
            "val": [c for c in ids if split_of[c] == "val"]}
    splits = read_splits(corpus_dir)
    if splits is None:
        # No splits.json yet: start one from the clips' own "split" fields so existing
        # (e.g. synthetic) clips keep their assignment once the file exists.
        splits = {}
        for cid in list_clips(corpus_dir):
            s = read_meta(corpus_dir, cid).get("split")
            if s is not None:
                splits.setdefault(s, []).append(cid)
    ours_set = set(ids)
    merged = {k: [c for c in v if c not in ours_set] for k, v in splits.items()}
    for k, v in ours.items():
        merged.setdefault(k, []).extend(v)
    write_splits(corpus_dir, merged)
    return ours
