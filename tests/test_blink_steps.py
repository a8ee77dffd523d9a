"""eartalk/blink_steps.py: the stepped blink track (golden pulse frames) and its scores on hand-made
readings."""
import math

import numpy as np
import pytest

from eartalk.blink_steps import blink_steps, step_metrics


def test_pulses_shut_1_to_8_frames_22_open_between_and_the_ends_stay_open():
    assert np.flatnonzero(blink_steps(100)).tolist() == [10, 11, 34, 35, 36, 37, 60, 61, 62, 63, 64, 65, 66, 67,
                                                         90, 91, 92]
    assert np.flatnonzero(blink_steps(13)).tolist() == [10, 11]        # frame 12 open: the last frame
    assert not blink_steps(12).any() and len(blink_steps(0)) == 0
    long = blink_steps(1000)
    assert long[0] == 0 and long[-1] == 0 and set(np.unique(long)) == {0.0, 1.0}
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], long, [0]]))))[::2]   # lengths of the shut runs
    assert runs[:7].tolist() == [2, 4, 8, 3, 1, 6, 2]


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_a_bad_frame_count_is_named(n):
    with pytest.raises(ValueError, match="blink_steps: n="):
        blink_steps(n)


def test_scores_count_the_first_shut_frame_the_first_open_frame_and_every_shut_frame():
    steps = blink_steps(40)                                  # shut 10-11 and 34-37
    closed = np.zeros(40, np.int64)
    closed[11] = 1                                           # one frame late
    closed[34:39] = 1                                        # on time, one frame late to open
    m = step_metrics(closed, steps)
    assert m == {"blink_step_shut_accuracy": 0.5, "blink_step_open_accuracy": 0.5,
                 "blink_step_shut_frames": 5 / 6, "blink_step_pulses": 2}
    assert step_metrics(steps, steps)["blink_step_shut_accuracy"] == 1.0       # the pins read back exactly
    # two clips joined end to end: no step across the join
    assert step_metrics(np.concatenate([closed, closed]), np.concatenate([steps, steps]))["blink_step_pulses"] == 4


def test_no_pulse_is_nan_and_mismatched_tracks_are_refused():
    m = step_metrics(np.zeros(5), blink_steps(5))
    assert math.isnan(m["blink_step_shut_accuracy"]) and m["blink_step_pulses"] == 0
    with pytest.raises(ValueError, match="two equal 1-D tracks"):
        step_metrics(np.zeros(4), blink_steps(5))
