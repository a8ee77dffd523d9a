import pytest

from eartalk.model.schedule import ramp


def test_ramp_is_zero_before_its_start_linear_between_and_one_after():
    assert [ramp(f, 0.5, 0.75) for f in (0.0, 0.5, 0.5625, 0.625, 0.75, 0.9, 1.0)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 1.0]


def test_a_ramp_of_no_width_switches_on_at_its_start():
    assert [ramp(f, 0.0, 0.0) for f in (0.0, 0.3)] == [1.0, 1.0]
    assert [ramp(f, 0.4, 0.4) for f in (0.0, 0.39, 0.4, 0.8)] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("bad", [(0.6, 0.5), (-0.1, 0.5), (0.2, 1.5)])
def test_a_ramp_that_ends_before_it_starts_or_leaves_the_stage_is_refused(bad):
    with pytest.raises(AssertionError, match="ramp needs"):
        ramp(0.5, *bad)
