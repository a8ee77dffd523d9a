"""Control-track tests: natural free motion statistics, step-hold pins, validation."""
import numpy as np
import pytest

from eartalk.data.motion import RANGES, TRACKS, controls_track
from eartalk.model.config import EMOTIONS

FPS = 25


def _track(n, seed=0, **kw):
    return controls_track(n, np.random.default_rng(seed), fps=FPS, **kw)


def test_shapes_ranges_and_determinism():
    a, b, c = _track(500, 1), _track(500, 1), _track(500, 2)
    assert set(a) == set(TRACKS)
    for k in TRACKS:
        assert a[k].shape == (500,)
        assert np.array_equal(a[k], b[k])
    assert a["emotion"].dtype == np.int64 and a["yaw"].dtype == np.float32
    assert not np.array_equal(a["yaw"], c["yaw"])
    for k, (lo, hi) in RANGES.items():
        assert a[k].min() >= lo and a[k].max() <= hi, k
    assert set(np.unique(a["emotion"])) <= set(range(len(EMOTIONS)))


def _blink_onsets(b):
    closed = b >= 0.5
    return np.flatnonzero(closed[1:] & ~closed[:-1]) + 1


def test_blink_rate_and_duration():
    minutes = 10
    b = _track(FPS * 60 * minutes, 3)["blink"]
    rate = len(_blink_onsets(b)) / minutes
    assert 13 <= rate <= 22, rate
    # each blink (any closure > 0.05) lasts at most ~240 ms and fully closes on one frame
    active = (b > 0.05).astype(int)
    starts = np.flatnonzero(np.diff(active) == 1) + 1
    ends = np.flatnonzero(np.diff(active) == -1) + 1
    lengths = ends[: len(starts)] - starts[: len(ends)]
    assert lengths.max() <= 6 and lengths.mean() >= 2
    assert np.isclose(b.max(), 1.0)
    assert (b == 0).mean() > 0.8                        # eyes are open most of the time


def test_head_moves_smoothly_but_not_a_statue():
    t = _track(FPS * 20, 4)
    for k in ("yaw", "pitch", "roll"):
        assert t[k].std() > 0.5, k
        assert np.abs(np.diff(t[k])).max() < 3.0, k     # degrees per frame: no jumps


def test_pose_range_covered_by_corpus():
    ys = np.concatenate([_track(FPS * 10, s)["yaw"] for s in range(120)])
    assert ys.min() < -24 and ys.max() > 24


def test_gaze_fixations_and_saccades():
    t = _track(FPS * 60, 5)
    step = np.hypot(np.diff(t["gaze_x"]), np.diff(t["gaze_y"]))
    assert (step < 0.1).mean() > 0.8                     # mostly fixating
    assert (step > 0.2).sum() >= 20                      # but with many saccades per minute


def test_emotion_segments():
    for seed in range(20):
        e = _track(FPS * 30, seed)["emotion"]
        assert 1 <= len(np.unique(e)) <= 3
        change = np.flatnonzero(np.diff(e)) + 1
        seg = np.diff(np.concatenate([[0], change]))
        assert (seg >= 2 * FPS - 1).all()                # each full segment lasts >= 2 s


def test_pins_hold_from_keyframe_and_free_before():
    free = _track(100, 9)
    t = _track(100, 9, pins={"yaw": [(30, -7.0), (10, 5.0)], "emotion": [(0, "happy")],
                             "blink": [(50, 1.0)]})
    assert (free["yaw"][:10] == t["yaw"][:10]).all()
    assert (t["yaw"][10:30] == 5.0).all() and (t["yaw"][30:] == -7.0).all()
    assert (t["emotion"] == EMOTIONS.index("happy")).all()
    assert (t["blink"][50:] == 1.0).all() and np.array_equal(t["blink"][:50], free["blink"][:50])
    for k in ("pitch", "gaze_x", "emotion_intensity"):   # unpinned tracks are untouched
        assert np.array_equal(t[k], free[k])


def test_none_frees_again():
    free = _track(100, 9)
    t = _track(100, 9, pins={"yaw": [(10, 5.0), (20, None)], "blink": [(10, 1.0), (20, None)]})
    assert (t["yaw"][10:20] == 5.0).all()
    # released continuous controls ease back onto the free track within 0.2 s
    assert np.array_equal(t["yaw"][26:], free["yaw"][26:])
    assert np.array_equal(t["blink"][20:], free["blink"][20:])


def test_pins_past_clip_are_ignored():
    t = _track(50, 1, pins={"roll": [(40, 2.0), (80, -2.0)]})
    assert (t["roll"][40:] == 2.0).all()


@pytest.mark.parametrize("pins, match", [
    ({"jaw": [(0, 1.0)]}, "valid names"),
    ({"yaw": [(0, 45.0)]}, r"\[-30.0, 30.0\]"),
    ({"blink": [(0, -0.1)]}, r"\[0.0, 1.0\]"),
    ({"emotion": [(0, "joy")]}, "neutral"),
    ({"emotion": [(0, 9)]}, "index"),
    ({"yaw": [(-1, 0.0)]}, "frame"),
    ({"yaw": [(0, 1.0), (0, 2.0)]}, "duplicate"),
    ({"yaw": [5.0]}, "pair"),
    ({"yaw": 5.0}, "list"),
])
def test_bad_pins_raise(pins, match):
    with pytest.raises(ValueError, match=match):
        _track(20, pins=pins)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_frames"):
        controls_track(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        controls_track(10, 0)
    with pytest.raises(ValueError, match="fps"):
        controls_track(10, np.random.default_rng(0), fps=0)
