"""runtime/scheduler.py: one batched step per tick, exact equality with the single-session path,
pool admission, and failure isolation."""
import numpy as np
import pytest
import torch

from eartalk.model.bundle import new_bundle
from eartalk.model.config import preset
from eartalk.runtime import Engine, PoolFullError, SessionClosedError
from eartalk.runtime.torch_backend import TorchBackend

torch.set_num_threads(1)
CFG = preset("test")
BACKEND = TorchBackend(new_bundle(CFG, seed=0))
SPF = CFG.samples_per_frame


def script(i):
    """Session i: its own portrait, audio (speech-like noise with a silent gap), controls, join tick."""
    rng = np.random.default_rng(100 + i)
    portrait = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    n = SPF * (9 + 3 * i) + 123 * i
    audio = (rng.standard_normal(n) * 0.2).astype(np.float32)
    audio[SPF * 3: SPF * 5] = 0                               # silence: the idle driver acts
    controls = [(2, {"yaw": 10.0 * (i + 1)}), (6, {"emotion": "happy", "yaw": None})]
    return portrait, audio, controls, 3 * i


def run_alone(i):
    portrait, audio, controls, _ = script(i)
    eng = Engine(BACKEND, max_sessions=1)
    s = eng.open_session(portrait)
    for at, values in controls:
        s.control(at_frame=at, **values)
    for c in range(0, audio.size, 500):
        s.push_audio(audio[c:c + 500])
    s.flush()
    return [f for f in s.frames()]


def test_batched_equals_single_session_exactly():
    calls = []
    eng = Engine(BACKEND, max_sessions=3)
    orig = BACKEND.step_torch

    def counting(*a):
        calls.append(a[0].shape[0])
        return orig(*a)
    eng.backend = type("Counted", (), {})()   # a thin proxy counting step calls
    for name in ("cfg", "receptive_field", "encode_portrait", "prefill", "decode_codes", "code_table", "encode_audio",
                 "device", "name"):
        setattr(eng.backend, name, getattr(BACKEND, name))
    eng.backend.step_torch = counting

    sessions, scripts, out = {}, {i: script(i) for i in range(3)}, {i: [] for i in range(3)}
    pos = {i: 0 for i in range(3)}
    for tick in range(40):
        for i, (portrait, audio, controls, join) in scripts.items():
            if tick == join:
                sessions[i] = eng.open_session(portrait)
                for at, values in controls:
                    sessions[i].control(at_frame=at, **values)
            if i in sessions and pos[i] < audio.size:
                sessions[i].push_audio(audio[pos[i]:pos[i] + 700])   # a different chunking than alone
                pos[i] += 700
                if pos[i] >= audio.size:
                    sessions[i].flush()
        n_before = len(calls)
        stepped = eng.tick()
        assert len(calls) - n_before == (1 if stepped else 0)          # ONE step call per tick
        for i, s in sessions.items():
            while s._state.out:
                out[i].append(s._state.out.popleft())
    assert max(calls) == 3 * 2             # really batched: 3 sessions, two rows each (guided by default)
    for i in range(3):
        alone = run_alone(i)
        audio = scripts[i][1]
        assert len(alone) == len(out[i]) == -(-audio.size // SPF)
        for a, b in zip(alone, out[i]):
            assert a.index == b.index and np.array_equal(a.image, b.image), f"session {i} frame {a.index}"


def test_full_pool_refuses_with_its_size():
    eng = Engine(BACKEND, max_sessions=2)
    p = np.zeros((32, 32, 3), np.uint8)
    a, b = eng.open_session(p), eng.open_session(p)
    with pytest.raises(PoolFullError, match=f"pool of {2 * (CFG.sink_frames + CFG.window)} pages"):
        eng.open_session(p)
    a.close()
    c = eng.open_session(p)                                            # room again
    assert eng.pool.num_used == 2 * CFG.sink_frames
    b.close(), c.close()
    assert eng.pool.num_used == 0


def _feed(s, n_frames, seed):
    rng = np.random.default_rng(seed)
    s.push_audio((rng.standard_normal(n_frames * SPF) * 0.1).astype(np.float32))


def test_bad_audio_closes_only_that_session():
    eng = Engine(BACKEND, max_sessions=3)
    p = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    good, bad = eng.open_session(p), eng.open_session(p)
    _feed(good, 5, 1)
    _feed(bad, 5, 1)
    eng.tick()
    used = eng.pool.num_used
    with pytest.raises(ValueError, match="NaN"):
        bad.push_audio(np.full(100, np.nan, np.float32))
    assert bad.closed and eng.pool.num_used == used - (CFG.sink_frames + 1)
    frames = list(good.frames())
    assert [f.index for f in frames] == [0, 1, 2]
    with pytest.raises(SessionClosedError, match="bad audio"):
        bad.push_audio(np.zeros(10, np.float32))


def test_step_input_failure_closes_that_session_others_run_on():
    eng = Engine(BACKEND, max_sessions=3)
    p = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a, b = eng.open_session(p), eng.open_session(p)
    _feed(a, 6, 2)
    _feed(b, 6, 2)

    def boom():
        raise RuntimeError("injected")
    b._state.step_inputs = boom
    frames = list(a.frames())
    assert len(frames) == 4 and b.closed and eng.sessions == [a._state]
    with pytest.raises(SessionClosedError, match="injected"):
        list(b.frames())
    # the survivor's frames are those of a session that ran alone
    solo = Engine(BACKEND, max_sessions=1).open_session(p)
    _feed(solo, 6, 2)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(frames, solo.frames()))


def test_batched_step_failure_is_isolated_by_retrying_alone():
    eng = Engine(BACKEND, max_sessions=2)
    p = np.zeros((32, 32, 3), np.uint8)
    a, b = eng.open_session(p), eng.open_session(p)
    _feed(a, 4, 3)
    _feed(b, 4, 3)
    b._state.prev_tokens = np.zeros(CFG.tokens_per_frame + 1, np.int64)   # wrong shape: its step fails
    assert len(list(a.frames())) == 2
    assert b.closed and "step failed" in b._state.close_reason


def test_portrait_that_fails_to_encode_holds_no_pages():
    eng = Engine(BACKEND, max_sessions=1)
    with pytest.raises(ValueError, match="RGB image"):
        eng.open_session(np.zeros((32, 32), np.uint8))
    with pytest.raises(FileNotFoundError, match="portrait image not found"):
        eng.open_session("/nonexistent.png")
    assert eng.pool.num_used == 0 and eng.sessions == []
