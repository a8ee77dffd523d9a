"""runtime/session.py + the open_session facade: the single-stream API of shared/design.md."""
import numpy as np
import pytest
import torch

import eartalk
from eartalk.model.bundle import new_bundle
from eartalk.model.conditions import encode_controls
from eartalk.model.config import preset
from eartalk.runtime import Engine, ModelNotTrainedError, SessionClosedError, open_session
from eartalk.runtime.torch_backend import TorchBackend

torch.set_num_threads(1)
CFG = preset("test")
BACKEND = TorchBackend(new_bundle(CFG, seed=0))


class Recording(TorchBackend):
    """Records the conditions each step receives (a random model barely reacts to them, so
    their effect is checked at the model's input, exactly)."""

    def __init__(self, bundle):
        super().__init__(bundle)
        self.conds = []

    def step_torch(self, prev, audio, cond, cond_mask, *rest):
        self.conds += list(zip(np.asarray(cond), np.asarray(cond_mask)))
        return super().step_torch(prev, audio, cond, cond_mask, *rest)
SPF = CFG.samples_per_frame
PORTRAIT = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def speech(n, seed=0):
    return (np.random.default_rng(seed).standard_normal(n) * 0.2).astype(np.float32)


def session(backend=None, **kw):
    return Engine(backend or BACKEND, max_sessions=1).open_session(PORTRAIT, **kw)


@pytest.mark.parametrize("n", [1, 639, 640, 641, 1920, 5000])
def test_every_sample_yields_its_frames(n):
    s = session()
    s.push_audio(speech(n))
    early = [f.index for f in s.frames()]
    # frame t needs 80 ms (2 frames) of lookahead past its own 40 ms
    assert early == list(range(max(0, n // SPF - CFG.lookahead_frames)))
    s.flush()
    late = [f.index for f in s.frames()]
    assert early + late == list(range(-(-n // SPF)))


def test_frames_do_not_depend_on_chunking():
    audio = speech(7 * SPF + 17, seed=3)
    outs = []
    for chunk in (1 * SPF, 97, 4000):
        s = session()
        frames = []
        for i in range(0, audio.size, chunk):
            s.push_audio(audio[i:i + chunk])
            frames += list(s.frames())
        s.flush()
        frames += list(s.frames())
        outs.append(frames)
    for other in outs[1:]:
        assert all(np.array_equal(a.image, b.image) for a, b in zip(outs[0], other))


def test_int16_equals_float32():
    x16 = (np.random.default_rng(1).standard_normal(3 * SPF) * 3000).astype(np.int16)
    a, b = session(), session()
    a.push_audio(x16), a.flush()
    b.push_audio(x16.astype(np.float32) / 32768), b.flush()
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.frames(), b.frames()))


@pytest.mark.parametrize("pcm, match", [
    (np.zeros(10, np.float64), "dtype is float64"),
    (np.zeros((10, 2), np.float32), "mono"),
    (np.array([0.0, np.nan], np.float32), "NaN"),
    ([0.0, 0.1], "numpy array"),
])
def test_bad_pcm_raises_closes_and_frees(pcm, match):
    eng = Engine(BACKEND, max_sessions=1)
    s = eng.open_session(PORTRAIT)
    with pytest.raises(ValueError, match=match):
        s.push_audio(pcm)
    assert s.closed and eng.pool.num_used == 0


def test_controls_validate_and_apply_from_next_frame():
    rec = Recording(new_bundle(CFG, seed=0))
    s = session(rec, guidance=1, idle_motion=False)   # one step row per frame; no idle blinks
    with pytest.raises(ValueError, match="valid controls are .*yaw"):
        s.control(nod=1)
    with pytest.raises(ValueError, match=r"yaw=99 is outside its range \[-30.0, 30.0\]"):
        s.control(yaw=99)
    assert not s.closed
    audio = speech(6 * SPF)
    s.push_audio(audio[:4 * SPF])
    assert len(list(s.frames())) == 2                       # frames 0, 1
    s.control(yaw=25, emotion="surprised")
    s.control(at_frame=4, yaw=None, blink=1.0)               # scheduled: releases pose at frame 4
    s.push_audio(audio[4 * SPF:])
    s.flush()
    assert len(list(s.frames())) == 4
    free = encode_controls({})
    want = [free, free, encode_controls({"yaw": 25, "emotion": "surprised"}),
            encode_controls({"yaw": 25, "emotion": "surprised"}),
            encode_controls({"emotion": "surprised", "blink": 1.0}),
            encode_controls({"emotion": "surprised", "blink": 1.0})]
    assert len(rec.conds) == 6
    for (c, m), (wc, wm) in zip(rec.conds, want):
        assert np.array_equal(c, wc) and np.array_equal(m, wm)


def test_closed_session_errors_and_close_is_idempotent():
    eng = Engine(BACKEND, max_sessions=1)
    with eng.open_session(PORTRAIT) as s:
        pass
    assert s.closed and eng.pool.num_used == 0
    s.close()
    with pytest.raises(SessionClosedError, match="control.*closed"):
        s.control(yaw=1)
    with pytest.raises(SessionClosedError):
        s.push_audio(np.zeros(4, np.float32))


def test_idle_driver_pins_only_free_kinds_pose_and_gaze_only_in_silence_blinks_always():
    s = session(seed=1)
    s.control(yaw=5)                                   # the user pins pose
    audio = speech(8 * SPF)
    audio[: 4 * SPF] = 0                               # frames 0-3 silent, 4-7 speech
    s.push_audio(audio)
    s.flush()
    masks = [s._state.step_inputs()[2] for _ in range(8)]
    pose, gaze, blink, emotion = range(4)              # CONTROL_KINDS order
    for t, m in enumerate(masks):
        assert m[pose]                                 # user pin, always
        assert not m[emotion]                          # never driven
        assert m[gaze] == (t < 4)                      # idle track only while silent
        assert m[blink]                                # blinks follow the track during speech too
    s = session(seed=1)
    s.control(blink=1.0)                               # the user's pin wins, in speech too
    s.push_audio(speech(3 * SPF))
    s.flush()
    for _ in range(3):
        cond, m = s._state.step_inputs()[1:]
        assert m[blink] and cond[blink, 5] == 1.0


def test_face_stays_alive_in_silence():
    """In 4 s of digital silence the idle driver moves pose, gaze and blink every few frames."""
    rec = Recording(new_bundle(CFG, seed=0))
    s = session(rec, seed=1)
    s.push_audio(np.zeros(100 * SPF, np.float32))
    s.flush()
    assert len(list(s.frames())) == 100
    conds = np.stack([c for c, _ in rec.conds])
    assert all(m[:3].all() and not m[3] for _, m in rec.conds)
    assert len({c.tobytes() for c in conds}) > 50                 # the conditions keep changing
    blink = conds[:, 2, 5]
    assert blink.max() > 0.8 and np.median(blink) < 0.1          # eyes open, with real blinks
    yaw = conds[:, 0, 0] * 30
    assert 0 < np.abs(yaw).max() <= 15                            # gentle: half the idle range


def test_sampling_is_seeded():
    audio = speech(5 * SPF)
    runs = []
    for seed in (7, 7, 8):
        # the frames of the sampled tokens themselves: an expected-code frame (the default) does
        # not depend on the token sampled for it, only on the history it feeds
        s = session(temperature=1.0, top_k=4, seed=seed, decode="tokens")
        s.push_audio(audio)
        s.flush()
        runs.append(np.stack([f.image for f in s.frames()]))
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    with pytest.raises(ValueError, match="temperature"):
        session(temperature=-1)


def test_open_session_facade_and_untrained_default_model():
    with eartalk.open_session(model="test", random_init=True, portrait=PORTRAIT) as s:
        s.push_audio(speech(3 * SPF))
        s.flush()
        assert [f.index for f in s.frames()] == [0, 1, 2]
    with pytest.raises(ModelNotTrainedError, match="has not been trained yet.*random_init=True"):
        open_session(model="small", portrait=PORTRAIT)     # a preset not shipped trained
    with pytest.raises(ValueError, match="portrait="):
        open_session(model="test", random_init=True)
    with pytest.raises(ValueError, match="unknown backend"):
        open_session(model="test", backend="tensorflow", random_init=True, portrait=PORTRAIT)


def test_realtime_yields_every_frame():
    s = session(realtime=True)
    s.push_audio(speech(4 * SPF))
    s.flush()
    assert [f.index for f in s.frames()] == [0, 1, 2, 3]
