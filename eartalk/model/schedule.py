"""Loss-weight and learning-rate schedules shared by the training stages."""
import math


def ramp(frac: float, start: float, full: float) -> float:
    """Weight factor at ``frac`` of a stage: 0 before ``start``, rising linearly to 1 at ``full``.

    ``start == full`` switches on at once at ``start`` (``(0, 0)``: on from the first step)."""
    assert 0.0 <= start <= full <= 1.0, f"ramp needs 0 <= start <= full <= 1, got ({start}, {full})"
    if frac >= full:
        return 1.0
    if frac <= start:
        return 0.0
    return (frac - start) / (full - start)


def warmup_cosine(lr: float, step: int, frac: float, warmup: int = 50, floor: float = 0.0) -> float:
    """Learning rate at ``step``, ``frac`` of the way through a stage: linear warm-up over the first
    ``warmup`` steps, then cosine decay from ``lr`` to ``floor * lr`` at ``frac`` 1 (and after it:
    a time-budgeted stage's last step can pass 1)."""
    assert 0.0 <= floor <= 1.0, f"warmup_cosine: floor {floor} is a share of lr, expected 0..1"
    cosine = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return lr * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * cosine)


def by_deadline(minutes: float, seconds_left: float | None) -> float:
    """A stage's ``minutes`` cut to end ``seconds_left`` from its start (None: not cut), though never
    under a quarter of them: a stage that a recipe's total (``recipe.run_recipe``) squeezes to
    nothing would leave its part of the model untrained."""
    if seconds_left is None:
        return minutes
    return min(minutes, max(seconds_left / 60, minutes / 4))
