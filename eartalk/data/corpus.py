"""The on-disk clip format shared by the synthetic corpus and imported user videos.

A corpus directory holds, per clip, under ``clips/``::

    <clip_id>.frames.npy   uint8 [T, H, W, 3] RGB, lossless (training reads this, not the mp4)
    <clip_id>.wav          16 kHz mono PCM_16
    <clip_id>.mp4          H.264 + AAC preview/eval video (optional: ``write_video=False``)
    <clip_id>.gt.csv       per-frame ground truth, one row per frame (optional: ``gt=None``)
    <clip_id>.json         metadata; written LAST, it marks the clip as complete

and optionally ``splits.json`` = ``{"train": [...], "val": [...], "test": [...]}``.

Every file is written under a temporary ``*.partial`` name and renamed, and the json lists the
files of its clip, so a crash at any point leaves either a complete clip or leftovers that
:func:`cleanup_partial` removes. Writers of the same corpus must use distinct clip ids.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from eartalk.data.audio_io import SAMPLE_RATE, load_audio, write_wav
from eartalk.data.video_io import FPS, write_mp4

CLIPS_DIR = "clips"
SPLITS_FILE = "splits.json"
# Suffixes of a clip's data files, in write order; ".json" is always last.
SUFFIXES = (".frames.npy", ".wav", ".mp4", ".gt.csv")
_CLIP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")  # no dots: they separate id from suffix


@dataclass
class Clip:
    """One clip: frames uint8 [T, H, W, 3] (None if not loaded), audio float32 16 kHz mono,
    per-frame ground truth columns (None for user videos) and the metadata dict."""

    clip_id: str
    frames: np.ndarray | None
    audio: np.ndarray
    gt: dict[str, np.ndarray] | None
    meta: dict = field(default_factory=dict)

    @property
    def identity(self) -> dict | None:
        """The synthetic face's identity (``Identity.to_dict``), from which its frames can be rendered
        again; None for an imported video."""
        return self.meta.get("identity") if isinstance(self.meta, dict) else None


def _check_id(clip_id: str) -> str:
    if not isinstance(clip_id, str) or not _CLIP_ID.match(clip_id):
        raise ValueError(f"clip_id {clip_id!r} is invalid; expected letters, digits, '_' or '-' "
                         f"(no dots or slashes), not starting with '_' or '-'")
    return clip_id


def _clips(corpus_dir) -> Path:
    return Path(corpus_dir) / CLIPS_DIR


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- ground truth csv -------------------------------------------------------------------------

def _fmt_float(v: float) -> str:
    # 9 significant digits round-trip any float32 exactly; a '.0' keeps integral floats
    # distinguishable from int columns when the file is read back.
    s = f"{v:.9g}"
    if s.lstrip("-").isdigit():
        s += ".0"
    return s


def write_gt_csv(path, columns: Mapping[str, np.ndarray]) -> None:
    """Write per-frame columns (name -> 1-D array, all the same length) as a csv, atomically.

    Column order is the mapping's order. Floats are written with 9 significant digits (exact for
    float32), ints and bools as integers, anything else as strings; the same values always give
    the same bytes.
    """
    path = Path(path)
    if not columns:
        raise ValueError(f"write_gt_csv({path}): no columns given")
    cols = {}
    for name, values in columns.items():
        if not isinstance(name, str) or not name or any(c in name for c in ',"\n\r'):
            raise ValueError(f"write_gt_csv({path}): column name {name!r} must be a plain non-empty string")
        a = np.asarray(values)
        if a.ndim != 1:
            raise ValueError(f"write_gt_csv({path}): column {name!r} must be 1-D (one value per "
                             f"frame), got shape {a.shape}")
        if a.dtype == bool:
            cells = [str(int(v)) for v in a]
        elif np.issubdtype(a.dtype, np.integer):
            cells = [str(int(v)) for v in a]
        elif np.issubdtype(a.dtype, np.floating):
            cells = [_fmt_float(float(v)) for v in a]
        else:
            cells = [str(v) for v in a]
        cols[name] = cells
    lengths = {n: len(c) for n, c in cols.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"write_gt_csv({path}): columns have different lengths {lengths}; "
                         f"expected one row per frame")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows(zip(*cols.values()))
    _atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


_INT = re.compile(r"^-?\d+$")


def _parse_column(cells: list[str]) -> np.ndarray:
    if cells and all(_INT.match(c) for c in cells):
        return np.array([int(c) for c in cells], dtype=np.int64)
    try:
        return np.array([float(c) for c in cells], dtype=np.float32)
    except ValueError:
        return np.array(cells, dtype=str)


def read_gt_csv(path) -> dict[str, np.ndarray]:
    """Read a csv written by :func:`write_gt_csv`: name -> int64, float32 or str array, in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth csv not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"ground-truth csv {path} is empty; expected a header row")
    header, body = rows[0], rows[1:]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ValueError(f"ground-truth csv {path}: row {i + 2} has {len(r)} cells; "
                             f"expected {len(header)}")
    return {name: _parse_column([r[j] for r in body]) for j, name in enumerate(header)}


# ---- clips ------------------------------------------------------------------------------------

def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"clip metadata value of type {type(o).__name__} is not JSON-serialisable")


def write_clip(corpus_dir, clip_id: str, frames: np.ndarray, audio: np.ndarray,
               gt: Mapping[str, np.ndarray] | None, meta: dict, write_video: bool = True) -> None:
    """Write one clip into ``corpus_dir/clips`` (see the module docstring for the files).

    ``frames`` uint8 [T, H, W, 3]; ``audio`` float 16 kHz mono; ``gt`` columns of length T or
    None; ``meta`` a JSON-serialisable dict (numpy scalars/arrays are converted). The json gets
    ``clip_id``, ``n_frames``, ``height``, ``width``, ``fps``, ``sample_rate`` and ``files``
    added. Rewriting an existing clip first removes its json, so it is never "done" with a mix
    of old and new files.
    """
    _check_id(clip_id)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_clip({clip_id}): frames must be uint8 [T, H, W, 3] with T > 0, "
                         f"got {frames.dtype} {frames.shape}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"write_clip({clip_id}): audio must be 1-D mono, got shape {audio.shape}")
    n = frames.shape[0]
    if gt is not None:
        bad = {k: len(v) for k, v in gt.items() if len(v) != n}
        if bad:
            raise ValueError(f"write_clip({clip_id}): ground-truth columns {bad} do not have one value "
                             f"per frame; expected length {n}")
    derived = dict(clip_id=clip_id, n_frames=n, height=frames.shape[1], width=frames.shape[2],
                   fps=FPS, sample_rate=SAMPLE_RATE)
    for k, v in derived.items():
        if k in meta and meta[k] != v:
            raise ValueError(f"write_clip({clip_id}): meta[{k!r}]={meta[k]!r} contradicts the data ({v!r})")
    d = _clips(corpus_dir)
    d.mkdir(parents=True, exist_ok=True)
    marker = d / f"{clip_id}.json"
    if marker.exists():
        marker.unlink()
    files = []

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    _atomic_write_bytes(d / f"{clip_id}.frames.npy", buf.getvalue())
    files.append(f"{clip_id}.frames.npy")
    write_wav(d / f"{clip_id}.wav", audio, SAMPLE_RATE)
    files.append(f"{clip_id}.wav")
    if write_video:
        write_mp4(d / f"{clip_id}.mp4", frames, audio, fps=FPS, sample_rate=SAMPLE_RATE)
        files.append(f"{clip_id}.mp4")
    if gt is not None:
        write_gt_csv(d / f"{clip_id}.gt.csv", gt)
        files.append(f"{clip_id}.gt.csv")
    # Remove files of a previous version of this clip that this version does not have.
    for suffix in SUFFIXES:
        stale = d / f"{clip_id}{suffix}"
        if stale.name not in files and stale.exists():
            stale.unlink()
    record = {**meta, **derived, "files": files}
    text = json.dumps(record, sort_keys=True, indent=1, default=_json_default) + "\n"
    _atomic_write_bytes(marker, text.encode("utf-8"))


def read_meta(corpus_dir, clip_id: str) -> dict | None:
    """A clip's json metadata, or None if it has none (yet)."""
    p = _clips(corpus_dir) / f"{clip_id}.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"clip metadata {p} is not valid JSON: {e}") from e


def clip_done(corpus_dir, clip_id: str) -> bool:
    """True if the clip's json exists and every file it lists is present."""
    meta = read_meta(corpus_dir, _check_id(clip_id))
    if meta is None:
        return False
    d = _clips(corpus_dir)
    return all((d / f).is_file() for f in meta.get("files", ()))


def _complete_meta(corpus_dir, clip_id: str) -> dict:
    """A complete clip's metadata (one read of its json), or FileNotFoundError naming the clip."""
    meta = read_meta(corpus_dir, _check_id(clip_id))
    d = _clips(corpus_dir)
    if meta is None or not all((d / f).is_file() for f in meta.get("files", ())):
        raise FileNotFoundError(f"clip {clip_id!r} in {d} is missing or incomplete "
                                f"(no {clip_id}.json, or a file it lists is absent)")
    return meta


def _frame_array(corpus_dir, clip_id: str, meta: dict, mmap: bool) -> np.ndarray:
    """The clip's frame cache, checked against the frame count its json gives (memory-mapped: read
    only where indexed)."""
    path = _clips(corpus_dir) / f"{clip_id}.frames.npy"
    arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if arr.shape[0] != meta["n_frames"]:
        raise ValueError(f"{path} has {arr.shape[0]} frames; its json says {meta['n_frames']}")
    return arr


def load_clip(corpus_dir, clip_id: str, frames: bool = True) -> Clip:
    """Load a complete clip. ``frames=False`` skips the (large) frame array (``Clip.frames`` is None).

    Raises FileNotFoundError naming the clip if it is missing or incomplete.
    """
    d = _clips(corpus_dir)
    meta = _complete_meta(corpus_dir, clip_id)
    files = set(meta["files"])
    arr = _frame_array(corpus_dir, clip_id, meta, mmap=False) if frames else None
    gt = read_gt_csv(d / f"{clip_id}.gt.csv") if f"{clip_id}.gt.csv" in files else None
    audio = load_audio(d / f"{clip_id}.wav", SAMPLE_RATE)
    return Clip(clip_id=clip_id, frames=arr, audio=audio, gt=gt, meta=meta)


def clip_frames_at(corpus_dir, clip_id: str, at) -> np.ndarray:
    """uint8 frames ``at`` (indices) of a complete clip, read through a memory map: only those
    frames leave the disk, not the whole clip as :func:`load_clip` reads it."""
    meta = _complete_meta(corpus_dir, clip_id)
    n = meta["n_frames"]
    at = np.asarray(at, np.int64)
    if at.size and (at.min() < 0 or at.max() >= n):
        raise IndexError(f"clip {clip_id!r}: frames {at.min()}..{at.max()} asked; it has {n} (0..{n - 1})")
    return np.ascontiguousarray(_frame_array(corpus_dir, clip_id, meta, mmap=True)[at])


def write_splits(corpus_dir, splits: Mapping[str, list[str]]) -> None:
    """Write ``splits.json`` (split name -> list of clip ids), atomically."""
    for name, ids in splits.items():
        for cid in ids:
            _check_id(cid)
    Path(corpus_dir).mkdir(parents=True, exist_ok=True)
    text = json.dumps({k: list(v) for k, v in splits.items()}, sort_keys=True, indent=1) + "\n"
    _atomic_write_bytes(Path(corpus_dir) / SPLITS_FILE, text.encode("utf-8"))


def read_splits(corpus_dir) -> dict[str, list[str]] | None:
    """The corpus's ``splits.json``, or None if it has none."""
    p = Path(corpus_dir) / SPLITS_FILE
    if not p.is_file():
        return None
    try:
        splits = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise ValueError(f"{p} must map split names to lists of clip ids")
    return splits


def list_clips(corpus_dir, split: str | None = None) -> list[str]:
    """Ids of the complete clips, sorted; or, with ``split``, the ids of that split in order.

    Splits come from ``splits.json``; a corpus without one uses each clip json's ``"split"``
    field. An unknown split raises ValueError listing the known ones.
    """
    d = _clips(corpus_dir)
    if not Path(corpus_dir).is_dir():
        raise FileNotFoundError(f"corpus directory not found: {corpus_dir}")
    done = sorted(p.name[:-5] for p in d.glob("*.json") if _CLIP_ID.match(p.name[:-5])
                  and clip_done(corpus_dir, p.name[:-5])) if d.is_dir() else []
    if split is None:
        return done
    splits = read_splits(corpus_dir)
    if splits is None:
        splits = {}
        for cid in done:
            s = read_meta(corpus_dir, cid).get("split")
            if s is not None:
                splits.setdefault(s, []).append(cid)
    if split not in splits:
        raise ValueError(f"unknown split {split!r} in corpus {corpus_dir}; known splits: {sorted(splits)}")
    return list(splits[split])


def cleanup_partial(corpus_dir) -> list[Path]:
    """Delete leftovers of interrupted writes: ``*.partial`` temp files, and the data files of
    clips whose json (the completion marker) is missing. Returns the removed paths.

    Only call this while no writer is active on the corpus: a live writer's temp files look the
    same as a dead one's.
    """
    d = _clips(corpus_dir)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for p in sorted(d.iterdir()):
        if not p.is_file():
            continue
        name = p.name
        if name.endswith(".partial"):
            removed.append(p)
            continue
        for suffix in SUFFIXES:
            if name.endswith(suffix):
                cid = name[: -len(suffix)]
                if not (d / f"{cid}.json").is_file():
                    removed.append(p)
                break
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
