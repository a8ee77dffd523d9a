"""Renderer and identity tests: determinism, validation, and that each control is visible."""
import json

import numpy as np
import pytest

from eartalk.data.face import FaceState, render, render_portrait
from eartalk.data.identity import Identity
from eartalk.data.mouth import MouthShape
from eartalk.model.config import EMOTIONS

S = 128


@pytest.fixture(scope="module")
def idents():
    rng = np.random.default_rng(1234)
    return [Identity.sample(rng) for _ in range(6)]


def _mouth_region(img):
    return img[int(0.62 * S):int(0.92 * S), int(0.3 * S):int(0.7 * S)].astype(int)


def _dark_interior(img):
    """Pixels of the dark mouth interior colour (45, 6, 12) in the lower face."""
    r = _mouth_region(img)
    return int(np.sum((np.abs(r[..., 0] - 45) < 25) & (r[..., 1] < 25) & (r[..., 2] < 30)))


def test_deterministic(idents):
    st = FaceState(mouth=MouthShape(open=0.4, teeth=0.5), yaw=12.5, pitch=-4, roll=3, gaze_x=0.3,
                   blink=0.2, emotion=1, emotion_intensity=0.7)
    a = render(idents[0], st)
    render(idents[1], FaceState(yaw=-20))          # caches in between must not leak state
    b = render(idents[0], st)
    assert a.dtype == np.uint8 and a.shape == (S, S, 3)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("size", [0, 100, -16, 8, 16.0, True, "128"])
def test_size_validation(idents, size):
    with pytest.raises(ValueError, match="size"):
        render(idents[0], FaceState(), size)


@pytest.mark.parametrize("size", [16, 64, 256])
def test_other_sizes(idents, size):
    img = render_portrait(idents[0], size)
    assert img.shape == (size, size, 3) and img.std() > 5


def test_state_validation():
    with pytest.raises(ValueError, match=r"yaw.*\[-30.0, 30.0\]"):
        FaceState(yaw=45)
    with pytest.raises(ValueError, match="blink"):
        FaceState(blink=1.5)
    with pytest.raises(ValueError, match="emotion"):
        FaceState(emotion=len(EMOTIONS))
    with pytest.raises(ValueError, match="mouth"):
        FaceState(mouth=(0, 0))


def test_portrait_is_neutral_frontal(idents):
    assert np.array_equal(render_portrait(idents[2]), render(idents[2], FaceState()))


def test_mouth_open_vs_closed(idents):
    for idn in idents:
        closed = render(idn, FaceState(mouth=MouthShape(open=0.0)))
        opened = render(idn, FaceState(mouth=MouthShape(open=1.0)))
        diff = np.abs(closed.astype(int) - opened.astype(int)).sum(-1)
        mouth_diff = np.abs(_mouth_region(closed) - _mouth_region(opened)).sum(-1)
        assert (mouth_diff > 60).sum() > 150          # a large patch changes colour strongly
        # ...and the change is concentrated at the mouth / jaw, not the upper face.
        assert diff[: int(0.5 * S)].mean() < 0.1 * mouth_diff.mean()


def test_openness_monotone(idents):
    for idn in idents:
        counts = [_dark_interior(render(idn, FaceState(mouth=MouthShape(open=o))))
                  for o in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
        assert counts[0] == 0
        assert all(b > a for a, b in zip(counts, counts[1:])), counts


def test_mouth_shapes_distinct(idents):
    shapes = [MouthShape(), MouthShape(open=0.8), MouthShape(open=0.3, width=0.9, teeth=1),
              MouthShape(open=0.4, round=1, width=0.1), MouthShape(press=1),
              MouthShape(open=0.15, tuck=1, teeth=0.5), MouthShape(open=0.3, tongue=1, teeth=0.5)]
    for idn in idents[:3]:
        regions = [_mouth_region(render(idn, FaceState(mouth=m))) for m in shapes]
        for i in range(len(shapes)):
            for j in range(i + 1, len(shapes)):
                d = np.abs(regions[i] - regions[j]).sum(-1)
                assert (d > 40).sum() > 25, (shapes[i], shapes[j])


def test_blink_changes_eyes(idents):
    eye_rows = slice(int(0.3 * S), int(0.55 * S))
    for idn in idents:
        a = render(idn, FaceState(blink=0.0))
        b = render(idn, FaceState(blink=1.0))
        d = np.abs(a.astype(int) - b.astype(int)).sum(-1)
        assert (d[eye_rows] > 100).sum() > 40
        assert d[int(0.6 * S):].sum() == 0               # nothing below the eyes changes
        # open eyes show near-white sclera; closed ones none
        white = lambda im: int(((im[eye_rows].astype(int) > 225).all(-1)).sum())  # noqa: E731
        assert white(a) > 8 and white(b) == 0


def test_gaze_moves_irises(idents):
    a = render(idents[0], FaceState(gaze_x=-1.0))
    b = render(idents[0], FaceState(gaze_x=1.0))
    d = np.abs(a.astype(int) - b.astype(int)).sum(-1)
    assert (d > 100).sum() > 10
    assert d[int(0.6 * S):].sum() == 0


def _nostril_x(img, idn):
    """Mean column of nostril-coloured pixels (skin * 0.45) in the mid face."""
    target = np.array(idn.skin) * 0.45 * 255
    n = img.shape[0]
    band = img[int(0.4 * n):int(0.75 * n)].astype(float)
    m = np.abs(band - target).sum(-1) < 12
    assert m.sum() > 0
    return np.nonzero(m)[1].mean()


def test_yaw_moves_nose_monotonically(idents):
    for idn in idents:
        # 256 px so that the small nostrils have fully covered (un-antialiased) pixels
        xs = [_nostril_x(render(idn, FaceState(yaw=y), 256), idn) for y in (-30, -20, -10, 0, 10, 20, 30)]
        assert all(b > a + 2.0 for a, b in zip(xs, xs[1:])), xs


def test_pitch_and_roll_change_image(idents):
    base = render(idents[0], FaceState())
    for st in (FaceState(pitch=10), FaceState(pitch=-10), FaceState(roll=10), FaceState(roll=-10)):
        assert np.abs(render(idents[0], st).astype(int) - base).mean() > 2


def test_emotions_pairwise_distinct_while_talking(idents):
    mouth = MouthShape(open=0.5, teeth=0.3)
    face = (slice(int(0.2 * S), int(0.9 * S)), slice(int(0.2 * S), int(0.8 * S)))
    for idn in idents[:3]:
        ims = [render(idn, FaceState(mouth=mouth, emotion=e))[face].astype(int) for e in range(len(EMOTIONS))]
        for i in range(len(ims)):
            for j in range(i + 1, len(ims)):
                d = np.abs(ims[i] - ims[j]).sum(-1)
                assert (d > 60).sum() > 40, (EMOTIONS[i], EMOTIONS[j])


def test_emotion_intensity_zero_is_neutral(idents):
    a = render(idents[0], FaceState(emotion=0))
    b = render(idents[0], FaceState(emotion=3, emotion_intensity=0.0))
    assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------ identity
def test_identity_round_trip():
    rng = np.random.default_rng(7)
    for _ in range(50):
        idn = Identity.sample(rng)
        d = json.loads(json.dumps(idn.to_dict()))
        back = Identity.from_dict(d)
        assert back == idn
        assert np.array_equal(back.identity_vector(), idn.identity_vector())


def test_identity_sampling_deterministic_and_varied():
    a = [Identity.sample(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(11)
    vecs = np.stack([Identity.sample(rng).identity_vector() for _ in range(300)])
    d = np.sqrt(((vecs[:, None] - vecs[None]) ** 2).sum(-1))
    assert d[np.triu_indices(len(vecs), 1)].min() > 0.3     # no near-duplicates among 300
    assert len({tuple(v) for v in vecs[:, :1]}) == 300


def test_identities_render_differently():
    rng = np.random.default_rng(5)
    ims = [render_portrait(Identity.sample(rng), 64).astype(int) for _ in range(40)]
    for i in range(len(ims)):
        for j in range(i + 1, len(ims)):
            assert np.abs(ims[i] - ims[j]).mean() > 4


def test_identity_validation():
    d = Identity.sample(np.random.default_rng(0)).to_dict()
    with pytest.raises(ValueError, match="missing fields"):
        Identity.from_dict({k: v for k, v in d.items() if k != "jaw"})
    with pytest.raises(ValueError, match="unknown fields"):
        Identity.from_dict({**d, "tail": 1.0})
    with pytest.raises(ValueError, match=r"face_width.*\[0.86, 1.1\]"):
        Identity.from_dict({**d, "face_width": 5.0})
    with pytest.raises(ValueError, match="hair_style"):
        Identity.from_dict({**d, "hair_style": 99})
    with pytest.raises(ValueError, match="skin"):
        Identity.from_dict({**d, "skin": [1.0, 2.0, 0.0]})
    with pytest.raises(ValueError, match="rng"):
        Identity.sample(42)
