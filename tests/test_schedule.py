import pytest

from eartalk.model.schedule import ramp, warmup_cosine


def test_ramp_is_zero_before_its_start_linear_between_and_one_after():
    assert [ramp(f, 0.5, 0.75) for f in (0.0, 0.5, 0.5625, 0.625, 0.75, 0.9, 1.0)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 1.0]


def test_a_ramp_of_no_width_switches_on_at_its_start():
    assert [ramp(f, 0.0, 0.0) for f in (0.0, 0.3)] == [1.0, 1.0]
    assert [ramp(f, 0.4, 0.4) for f in (0.0, 0.39, 0.4, 0.8)] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("bad", [(0.6, 0.5), (-0.1, 0.5), (0.2, 1.5)])
def test_a_ramp_that_ends_before_it_starts_or_leaves_the_stage_is_refused(bad):
    with pytest.raises(AssertionError, match="ramp needs"):
        ramp(0.5, *bad)


def test_warmup_cosine_rises_over_the_warmup_then_decays_to_zero():
    assert warmup_cosine(1e-3, 0, 0.0) == pytest.approx(1e-3 / 50)
    assert warmup_cosine(1e-3, 24, 0.0, warmup=50) == pytest.approx(0.5e-3)
    assert warmup_cosine(1e-3, 49, 0.0) == 1e-3
    assert warmup_cosine(1e-3, 500, 0.5) == pytest.approx(0.5e-3)
    assert warmup_cosine(1e-3, 500, 1.0) == pytest.approx(0.0, abs=1e-18)
    assert warmup_cosine(2e-3, 9, 0.25, warmup=10) == pytest.approx(2e-3 * 0.5 * (1 + 2 ** -0.5))
