"""Frame sheets: a model's frames beside the truth, as one labelled PNG.

A PSNR or a probe accuracy says how far off a frame is, not what is wrong with it (a blurred
mouth, lost brows, a smeared nose). ``eartalk eval`` and the tokenizer stage of ``eartalk train``
write one of these beside their numbers so that a reader can look.

:func:`frame_grid` lays equal-sized RGB frames out in rows, with a gap (exact pixels, no
resampling); :func:`save_frame_sheet` writes that grid with column titles and row labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GAP = 2           # pixels between tiles
GAP_VALUE = 255   # white


def frame_grid(rows, gap: int = GAP) -> np.ndarray:
    """``rows``: a list of rows, each a list of uint8 ``[H, W, 3]`` frames (all the same size and
    every row the same length) -> uint8 ``[R*H + (R-1)*gap, C*W + (C-1)*gap, 3]``; tile (r, c)
    starts at ``(r*(H+gap), c*(W+gap))``, the gaps are white."""
    if not rows or not rows[0]:
        raise ValueError("frame_grid needs at least one row with at least one frame")
    R, C = len(rows), len(rows[0])
    first = np.asarray(rows[0][0])
    if first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"frames must be [H, W, 3] RGB, got {first.shape}")
    H, W = first.shape[:2]
    grid = np.full((R * H + (R - 1) * gap, C * W + (C - 1) * gap, 3), GAP_VALUE, np.uint8)
    for r, row in enumerate(rows):
        if len(row) != C:
            raise ValueError(f"row {r} has {len(row)} frames; expected {C} like row 0")
        for c, frame in enumerate(row):
            f = np.asarray(frame)
            if f.shape != first.shape or f.dtype != np.uint8:
                raise ValueError(f"frame ({r}, {c}) is {f.dtype} {f.shape}; expected uint8 {first.shape}")
            grid[r * (H + gap): r * (H + gap) + H, c * (W + gap): c * (W + gap) + W] = f
    return grid


def error_frame(a: np.ndarray, b: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """uint8 grey ``[H, W, 3]``: ``gain`` x the mean absolute RGB difference of two uint8 frames
    (white = far off), so small errors show."""
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean(-1) * gain
    return np.repeat(np.clip(d + 0.5, 0, 255).astype(np.uint8)[..., None], 3, -1)


def save_frame_sheet(path, rows, columns: list[str], row_labels: list[str] | None = None,
                     title: str | None = None, scale: int = 2) -> Path:
    """Write ``frame_grid(rows)`` to ``path`` (PNG), each pixel ``scale`` x ``scale`` screen
    pixels (no smoothing), ``columns`` above the tiles and ``row_labels`` at their left."""
    grid = frame_grid(rows)
    C, R = len(rows[0]), len(rows)
    if len(columns) != C:
        raise ValueError(f"{len(columns)} column titles for {C} columns")
    if row_labels is not None and len(row_labels) != R:
        raise ValueError(f"{len(row_labels)} row labels for {R} rows")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dpi = 100
    H, W = grid.shape[:2]
    left, top = (1.3 if row_labels else 0.1), (0.6 if title else 0.35)
    fig = plt.figure(figsize=(W * scale / dpi + left + 0.1, H * scale / dpi + top + 0.1), dpi=dpi)
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes([left / fw, 0.1 / fh, W * scale / dpi / fw, H * scale / dpi / fh])
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([(c + 0.5) * W / C for c in range(C)], columns, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([(r + 0.5) * H / R for r in range(R)], row_labels or [""] * R, fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.12 / fh, va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
