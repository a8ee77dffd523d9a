"""FCIC condition encoding: golden layout, pinned/free semantics, errors, the training helper."""
import numpy as np
import pytest

from eartalk.model.conditions import controls_from_gt, decode_controls, encode_controls
from eartalk.model.config import COND_DIM, CONTROL_KINDS, CONTROLS, EMOTIONS


def test_golden_layout():
    cond, mask = encode_controls({"yaw": 15.0, "pitch": -20.0, "blink": 0.25, "emotion": "sad"})
    assert cond.dtype == np.float32 and mask.dtype == bool
    assert cond.shape == (len(CONTROL_KINDS), COND_DIM) == (4, 16)
    expected = np.zeros((4, 16), np.float32)
    expected[0, [0, 1, 12]] = [0.5, -1.0, 1.0]      # pose: yaw 15/30, pitch -20/20, roll neutral
    expected[1, 13] = 1.0                           # gaze: free, kind one-hot only
    expected[2, [5, 14]] = [0.25, 1.0]              # blink
    expected[3, [6 + EMOTIONS.index("sad"), 15]] = 1.0
    np.testing.assert_array_equal(cond, expected)
    np.testing.assert_array_equal(mask, [True, False, True, True])


def test_nothing_given_is_all_free_and_none_means_not_given():
    cond, mask = encode_controls({})
    assert not mask.any()
    assert not cond[:, :12].any()
    c2, m2 = encode_controls({"yaw": None, "emotion": None})
    np.testing.assert_array_equal(c2, cond)
    np.testing.assert_array_equal(m2, mask)


def test_partial_kind_is_pinned_with_neutral_rest():
    cond, mask = encode_controls({"roll": -15.0})
    assert mask.tolist() == [True, False, False, False]
    np.testing.assert_array_equal(cond[0, :3], [0.0, 0.0, -1.0])


def test_round_trip():
    values = {"yaw": -12.0, "pitch": 3.0, "roll": 0.0, "gaze_x": 0.5, "gaze_y": -1.0,
              "blink": 1.0, "emotion": "surprised"}
    back = decode_controls(*encode_controls(values))
    assert back.keys() == values.keys()
    assert back.pop("emotion") == values.pop("emotion")
    assert back == pytest.approx(values)


def test_errors():
    with pytest.raises(ValueError, match="unknown control 'smile'.*yaw"):
        encode_controls({"smile": 1.0})
    with pytest.raises(ValueError, match=r"yaw=45.0 is outside its range \[-30.0, 30.0\]"):
        encode_controls({"yaw": 45.0})
    with pytest.raises(ValueError, match="outside"):
        encode_controls({"blink": float("nan")})
    with pytest.raises(ValueError, match="unknown emotion 'bored'.*neutral"):
        encode_controls({"emotion": "bored"})
    with pytest.raises(TypeError, match="number"):
        encode_controls({"yaw": "left"})


def test_controls_from_gt_matches_encode_per_frame():
    T = 5
    rng = np.random.default_rng(0)
    gt = {"yaw": np.linspace(-30, 30, T), "pitch": np.array([0, np.nan, 5, 5, np.nan]),
          "blink": rng.uniform(0, 1, T), "emotion": np.array([0, 1, -1, 4, 2])}
    cond, mask = controls_from_gt(gt, drop_prob=0.0, rng=np.random.default_rng(1))
    assert cond.shape == (T, 4, 16) and mask.shape == (T, 4)
    for t in range(T):
        frame = {}
        for name, arr in gt.items():
            if name == "emotion":
                frame[name] = EMOTIONS[arr[t]] if arr[t] >= 0 else None
            else:
                frame[name] = None if np.isnan(arr[t]) else float(arr[t])
        c, m = encode_controls(frame)
        np.testing.assert_allclose(cond[t], c, atol=1e-7)
        np.testing.assert_array_equal(mask[t], m)
    # emotion names work as well as indices
    by_name = controls_from_gt({"emotion": np.array(["happy", "sad"])}, 0.0, np.random.default_rng(0))
    by_idx = controls_from_gt({"emotion": np.array([1, 2])}, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(by_name[0], by_idx[0])


def test_controls_from_gt_dropout():
    T = 2000
    gt = {name: np.zeros(T) for name in CONTROLS if name != "emotion"}
    gt["emotion"] = np.zeros(T, dtype=int)
    cond, mask = controls_from_gt(gt, drop_prob=0.3, rng=np.random.default_rng(0))
    assert abs(1.0 - mask.mean() - 0.3) < 0.03
    assert not cond[~mask][:, :12].any()            # dropped rows carry no values
    np.testing.assert_array_equal(cond[..., 12:], np.broadcast_to(np.eye(4, dtype=np.float32), (T, 4, 4)))
    _, all_dropped = controls_from_gt(gt, 1.0, np.random.default_rng(0))
    assert not all_dropped.any()
    a = controls_from_gt(gt, 0.3, np.random.default_rng(5))
    b = controls_from_gt(gt, 0.3, np.random.default_rng(5))
    np.testing.assert_array_equal(a[1], b[1])


def test_controls_from_gt_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown control"):
        controls_from_gt({"smile": np.zeros(3)}, 0.0, rng)
    with pytest.raises(ValueError, match=r"frame 1: control gaze_x=2.0 is outside"):
        controls_from_gt({"gaze_x": np.array([0.0, 2.0])}, 0.0, rng)
    with pytest.raises(ValueError, match="different lengths"):
        controls_from_gt({"yaw": np.zeros(3), "roll": np.zeros(4)}, 0.0, rng)
    with pytest.raises(ValueError, match="unknown emotion"):
        controls_from_gt({"emotion": np.array(["happy", "bored"])}, 0.0, rng)
    with pytest.raises(ValueError, match="indices"):
        controls_from_gt({"emotion": np.array([7])}, 0.0, rng)
    with pytest.raises(ValueError, match="drop_prob"):
        controls_from_gt({"yaw": np.zeros(3)}, 1.5, rng)
