"""Fixtures shared by the command-line tests."""
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

S = 32  # the "test" preset's frame size


@pytest.fixture
def files(tmp_path):
    """A random 32x32 portrait (p.png) and 0.44 s of noise at 16 kHz (a.wav) in tmp_path."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    sf.write(tmp_path / "a.wav", (rng.standard_normal(7000) * 0.1).astype(np.float32), 16000)
    return tmp_path
