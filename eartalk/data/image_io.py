"""Reading a portrait image: one place that says which file was not an image."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def read_image(path, what: str = "portrait") -> np.ndarray:
    """An image file -> uint8 RGB ``[H, W, 3]``; FileNotFoundError / ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} image not found: {p}")
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{what} {p} is not a readable image (png, jpg, ...): {e}") from None
