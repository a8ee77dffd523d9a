"""expression_maps: zero on a neutral face, the lips when only the mouth opens, the eyes when only
the eyes close, None without ground truth; the recipe's maps at the tokenizer's size."""
import numpy as np
import pytest

from eartalk.data import face
from eartalk.data.corpus import Clip
from eartalk.data.expression_map import expression_maps
from eartalk.data.identity import Identity
from eartalk.data.mouth import MouthShape

SIZE = 64


def _clip(states):
    ident = Identity.sample(np.random.default_rng(5))
    frames = np.stack([face.render(ident, s, SIZE) for s in states])
    gt = {k: np.array([getattr(s, k) for s in states], np.float32) for k in ("yaw", "pitch", "roll")}
    return Clip("clip000001", frames, np.zeros(0, np.float32), gt, {"identity": ident.to_dict()})


def _box(mask):
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max(), xs.min(), xs.max()


def test_neutral_face_gives_a_zero_map_and_features_light_their_own_place():
    pose = dict(yaw=12.0, pitch=-5.0, roll=3.0)
    clip = _clip([face.FaceState(**pose),
                  face.FaceState(mouth=MouthShape(open=0.9), **pose),
                  face.FaceState(blink=1.0, **pose)])
    m = expression_maps(clip, np.arange(3))
    assert m.shape == (3, SIZE, SIZE) and m.dtype == np.uint8
    assert not m[0].any()                          # same pose, neutral face: nothing to weight
    # exactly where the rendering changed (dilated by one pixel), nowhere else
    for j in (1, 2):
        changed = np.abs(clip.frames[j].astype(int) - clip.frames[0]).sum(-1) > 0
        pad = np.pad(changed, 1)
        dil = np.max([pad[a:a + SIZE, b:b + SIZE] for a in range(3) for b in range(3)], axis=0)
        assert np.array_equal(m[j] > 0, dil)
    mouth, eyes = _box(m[1] > 128), _box(m[2] > 128)
    assert mouth[0] > eyes[1]                      # the open mouth lies below the closed eyes
    assert m[1].max() == 255 and m[2].max() == 255


def test_user_video_has_no_map_and_bad_indices_are_named():
    clip = _clip([face.FaceState()])
    assert expression_maps(Clip("clip000002", clip.frames, clip.audio, None, {}), [0]) is None
    with pytest.raises(ValueError, match="clip000001: frame indices 0..3 outside 0..0"):
        expression_maps(clip, [0, 3])


def test_recipe_maps_are_resized_to_the_tokenizer_size():
    from eartalk.model.recipe import _expr_maps
    clip = _clip([face.FaceState(mouth=MouthShape(open=0.9))])
    small = _expr_maps(clip, np.array([0]), 32)
    assert small.shape == (1, 32, 32) and small.dtype == np.uint8 and small.max() > 128
    user = Clip("clip000003", clip.frames, clip.audio, None, {})
    assert np.array_equal(_expr_maps(user, np.array([0]), 32), np.zeros((1, 32, 32), np.uint8))
