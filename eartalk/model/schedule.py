"""Loss-weight schedules shared by the training stages."""


def ramp(frac: float, start: float, full: float) -> float:
    """Weight factor at ``frac`` of a stage: 0 before ``start``, rising linearly to 1 at ``full``.

    ``start == full`` switches on at once at ``start`` (``(0, 0)``: on from the first step)."""
    assert 0.0 <= start <= full <= 1.0, f"ramp needs 0 <= start <= full <= 1, got ({start}, {full})"
    if frac >= full:
        return 1.0
    if frac <= start:
        return 0.0
    return (frac - start) / (full - start)
