"""face_state: the ground-truth state vector the tokenizer's codes are tied to in training."""
import numpy as np
import pytest

from eartalk.model.config import EMOTIONS
from eartalk.model.face_state import MOUTH_GT, STATE_DIM, face_state


def _gt(n=3):
    g = {"yaw": np.array([15.0, -30.0, 0.0]), "pitch": np.array([10.0, 0.0, -20.0]),
         "roll": np.array([0.0, 7.5, -15.0]), "gaze_x": np.array([0.5, 0.0, -1.0]),
         "gaze_y": np.array([0.0, 0.25, 1.0]), "blink": np.array([0.0, 1.0, 0.5]),
         "emotion": np.array([0, 2, 4]), "emotion_intensity": np.array([0.5, 1.0, 0.25])}
    g.update({k: np.full(n, 0.1 * (i + 1)) for i, k in enumerate(MOUTH_GT)})
    return g


def test_layout_and_scaling_are_exact():
    s = face_state(_gt(), 3)
    assert s.shape == (3, STATE_DIM) and s.dtype == np.float32
    # yaw / 30, pitch / 20, roll / 15, gaze and blink as they are
    np.testing.assert_allclose(s[:, :6], [[0.5, 0.5, 0, 0.5, 0, 0], [-1, 0, 0.5, 0, 0.25, 1],
                                          [0, -1, -1, -1, 1, 0.5]], rtol=1e-6)
    emo = s[:, 6:6 + len(EMOTIONS)]
    np.testing.assert_allclose(emo, [[0.5, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0.25]])
    np.testing.assert_allclose(s[0, 6 + len(EMOTIONS):], [0.1 * (i + 1) for i in range(len(MOUTH_GT))], rtol=1e-6)


def test_no_ground_truth_gives_nan_rows():
    assert np.isnan(face_state(None, 4)).all() and face_state(None, 4).shape == (4, STATE_DIM)
    g = _gt()
    del g["mouth_open"]                   # a partial ground truth is not a state
    assert np.isnan(face_state(g, 3)).all()


def test_bad_emotion_index_is_refused():
    g = _gt()
    g["emotion"] = np.array([0, 5, -1])
    with pytest.raises(ValueError, match="expected indices 0..4"):
        face_state(g, 3)
