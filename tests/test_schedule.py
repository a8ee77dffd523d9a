import math

import pytest

from eartalk.model.schedule import by_deadline, ramp, warmup_cosine


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


def test_warmup_cosine_with_a_floor_decays_to_that_share_of_lr_and_stays_there():
    # the transformer's schedule: cosine to a tenth of lr over the time budget
    assert warmup_cosine(1e-3, 200, 0.0, warmup=200, floor=0.1) == 1e-3
    assert warmup_cosine(1e-3, 500, 0.5, warmup=200, floor=0.1) == pytest.approx(0.55e-3)
    assert warmup_cosine(1e-3, 500, 1.0, warmup=200, floor=0.1) == pytest.approx(1e-4)
    assert warmup_cosine(1e-3, 500, 1.3, warmup=200, floor=0.1) == pytest.approx(1e-4)   # past the budget
    assert warmup_cosine(1e-3, 99, 0.0, warmup=200, floor=0.1) == pytest.approx(0.5e-3)  # warm-up scales it all


@pytest.mark.parametrize("step,frac", [(0, 0.0), (30, 0.1), (700, 0.77), (900, 0.999)])
def test_warmup_cosine_is_bit_for_bit_the_formulas_the_stages_used_before_it(step, frac):
    # the recipe must still make the shipped model: the tokenizer's (no floor) and the transformer's
    # (a tenth of lr, warm-up 200) learning rates, as they were written out in each stage
    assert warmup_cosine(2e-3, step, frac) == 2e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
    assert warmup_cosine(1e-3, step, frac, warmup=200, floor=0.1) == \
        1e-3 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1))))


@pytest.mark.parametrize("floor", [-0.1, 1.5])
def test_a_floor_outside_zero_to_one_is_refused(floor):
    with pytest.raises(AssertionError, match="floor"):
        warmup_cosine(1e-3, 10, 0.5, floor=floor)


def test_by_deadline_cuts_a_stage_to_its_deadline_but_never_under_a_quarter():
    assert by_deadline(45.0, None) == 45.0                  # no deadline: the whole budget
    assert by_deadline(45.0, 3600.0) == 45.0                # a later deadline: the whole budget
    assert by_deadline(45.0, 43.08 * 60) == 43.08           # the EPYC run's transformer stage
    assert by_deadline(45.0, 60.0) == 11.25                 # squeezed: a quarter
    assert by_deadline(45.0, -60.0) == 11.25                # already past: a quarter
