"""Build a model bundle by name: a preset's shipped weights, a user's bundle directory, or (only
when asked for explicitly) a randomly initialised preset.

There is no silent fallback: ``model="tiny"`` without shipped weights and without
``random_init=True`` raises :class:`ModelNotTrainedError` saying so and how to proceed, because a
random model produces noise that would otherwise look like a broken runtime.
"""
from __future__ import annotations

from pathlib import Path

from eartalk.model import bundle as _bundle
from eartalk.model.bundle import ModelNotTrainedError
from eartalk.model.config import PRESETS, preset

__all__ = ["ModelNotTrainedError", "is_trained", "load_model"]


def load_model(model: str | Path = "tiny", random_init: bool = False, seed: int = 0):
    """-> ``eartalk.model.bundle.ModelBundle`` in eval mode.

    ``model``: a preset name (``sorted(PRESETS)``) or a bundle directory (``model.json`` +
    ``model.safetensors``). ``random_init=True`` builds the preset with random weights from
    ``seed`` (for tests and benchmarks; the output is not a face).
    """
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a preset name {sorted(PRESETS)} or a bundle directory, got {model!r}")
    if random_init:
        if not (isinstance(model, str) and model in PRESETS):
            raise ValueError(f"random_init=True needs a preset name, one of {sorted(PRESETS)}; got {model!r}")
        return _bundle.new_bundle(preset(model), seed)
    if not (isinstance(model, str) and model in PRESETS) and not Path(model).is_dir():
        raise FileNotFoundError(f"model {str(model)!r} is neither a preset {sorted(PRESETS)} nor a directory")
    return _bundle.load_bundle(model)


def is_trained(model: str | Path) -> bool:
    """Whether ``model`` (preset name or bundle directory) has weights to load; benchmarks fall
    back to a random-init preset of the same shape when it has not, and say so."""
    try:
        _bundle.read_card(model)
        return True
    except (ModelNotTrainedError, FileNotFoundError):
        return False
