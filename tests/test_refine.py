"""runtime/refine.py and the engine's refinement passes: the MaskGIT schedule (golden values), the
passes against a hand-written loop over ``gpt.step``, batching, and the refusals."""
import math

import numpy as np
import pytest
import torch

from eartalk.model.bundle import new_bundle
from eartalk.model.config import preset
from eartalk.runtime import Engine
from eartalk.runtime.backend import Backend
from eartalk.runtime.refine import confidence, grow_known, hidden_after
from eartalk.runtime.torch_backend import TorchBackend
from manual_stream import assert_engine_matches_loop, manual_stream

torch.set_num_threads(1)
CFG = preset("test", refine=True)

def _bundle():
    """A random model whose drafts matter: at init a draft moves the logits by ~1e-3, too little to
    flip an argmax, so the tests would pass with the draft ignored. With these weights the
    refined streams below differ from the one-pass stream (asserted)."""
    b = new_bundle(CFG, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (b.gpt.draft_known, b.gpt.digit_emb.weight, b.gpt.head.weight):
            p.copy_(torch.randn(p.shape, generator=g))
        g.manual_seed(1)
        for blk in b.gpt.blocks:
            for p in (blk.attn.qkv.weight, blk.attn.proj.weight, blk.mlp[0].weight, blk.mlp[2].weight):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return b


BACKEND = TorchBackend(_bundle())
SPF = CFG.samples_per_frame


def test_schedule_golden_values():
    # 64 tokens in 3 passes: floor(64 cos(pi/6)) = 55, floor(64 cos(pi/3)) = 32, then none
    assert [hidden_after(j, 3, 64) for j in (1, 2, 3)] == [55, 32, 0]
    assert [hidden_after(j, 2, 64) for j in (1, 2)] == [45, 0]
    assert hidden_after(1, 1, 64) == 0                      # one pass: nothing is left hidden
    with pytest.raises(ValueError, match="pass 4 of 3"):
        hidden_after(4, 3, 64)


def test_grow_known_keeps_the_known_and_adds_the_most_confident():
    known = np.array([False, True, False, False, False])
    conf = np.array([0.2, 0.0, 0.9, 0.5, 0.5])
    # two hidden left of four: 0.9 (index 2) and the first of the 0.5 tie (index 3) become known
    assert grow_known(known, conf, 2).tolist() == [False, True, True, True, False]
    assert grow_known(known, conf, 0).all()
    assert grow_known(known, conf, 4).tolist() == known.tolist()
    with pytest.raises(ValueError, match="4 tokens are hidden; cannot leave 5"):
        grow_known(known, conf, 5)


def test_confidence_is_the_top_softmax_probability():
    logits = np.random.default_rng(0).standard_normal((3, 4, 7)) * 5
    want = torch.softmax(torch.from_numpy(logits), -1).max(-1).values.numpy()
    np.testing.assert_allclose(confidence(logits), want, rtol=1e-12)


def _inputs(i, frames=6):
    rng = np.random.default_rng(10 + i)
    return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), (rng.standard_normal(SPF * frames) * 0.2).astype(np.float32)


def _run(eng, portrait, audio, refine):
    s = eng.open_session(portrait, refine=refine, idle_motion=False, guidance=1)   # as the loop below
    s.push_audio(audio)
    s.flush()
    return s, [f.image for f in s.frames()]


def _manual(portrait, audio, refine):
    """The same stream by hand: gpt.step per frame, then ``refine`` draft passes of it."""
    N = CFG.tokens_per_frame

    def frame(gpt, prev, a, c, m, pk, pv, pl):
        logits, nk, nv = gpt.step(prev, a, c, m, pk, pv, pl)
        t, picked_by = logits[0].argmax(-1), logits[0]
        known = torch.zeros(N, dtype=torch.bool)
        conf = torch.softmax(logits[0].double(), -1).max(-1).values
        for j in range(1, refine + 1):
            keep = N - int(math.floor(N * math.cos(math.pi / 2 * j / (refine + 1)) + 1e-9))
            order = torch.argsort(torch.where(known, math.inf, conf), descending=True, stable=True)
            known[order[:keep]] = True
            lg = gpt.step(prev, a, c, m, pk, pv, pl, draft=t[None], draft_known=known[None])[0][0]
            t = torch.where(known, t, lg.argmax(-1))
            picked_by = torch.where(known[:, None], picked_by, lg)
            conf = torch.softmax(lg.double(), -1).max(-1).values
        return t, nk, nv, picked_by
    return manual_stream(BACKEND, portrait, audio, frame)


@pytest.mark.parametrize("refine", [1, 3])
def test_engine_refinement_equals_a_hand_written_loop(refine):
    portrait, audio = _inputs(1)
    with Engine(BACKEND, max_sessions=1) as eng:
        _, got = _run(eng, portrait, audio, refine)
    with Engine(BACKEND, max_sessions=1) as eng:
        plain = _run(eng, portrait, audio, 0)[1]
    assert_engine_matches_loop(got, _manual(portrait, audio, refine), plain, frames=6)


def test_refinement_changes_frames_and_refine_0_is_the_one_pass_stream():
    portrait, audio = _inputs(1)
    with Engine(BACKEND, max_sessions=1) as eng:
        _, plain = _run(eng, portrait, audio, 0)
    np.testing.assert_array_equal(np.stack(plain), np.stack(_manual(portrait, audio, 0)))
    with Engine(BACKEND, max_sessions=1) as eng:
        _, refined = _run(eng, portrait, audio, 2)
    assert not np.array_equal(np.stack(plain), np.stack(refined))


def test_sessions_with_different_refine_counts_batch_like_alone():
    alone = []
    for i, r in enumerate((0, 2, 1)):
        with Engine(BACKEND, max_sessions=1) as eng:
            alone.append(_run(eng, *_inputs(i), r)[1])
    with Engine(BACKEND, max_sessions=3) as eng:
        states = []
        for i, r in enumerate((0, 2, 1)):
            s = eng.open_session(_inputs(i)[0], refine=r, idle_motion=False, guidance=1)
            s.push_audio(_inputs(i)[1])
            s.flush()
            states.append(s)
        eng.run_until_idle()
        for s, want in zip(states, alone):
            np.testing.assert_array_equal(np.stack([f.image for f in s.frames()]), np.stack(want))


def test_refinement_is_refused_where_it_cannot_run():
    portrait, _ = _inputs(0)
    plain = TorchBackend(new_bundle(preset("test"), seed=0))
    with Engine(plain, max_sessions=1) as eng:
        with pytest.raises(ValueError, match="not trained to refine"):
            eng.open_session(portrait, refine=2)
        assert eng.pool.num_used == 0                  # nothing held after the refusal
    with Engine(BACKEND, max_sessions=1) as eng:
        with pytest.raises(ValueError, match="refine must be an int >= 0"):
            eng.open_session(portrait, refine=-1)
    with pytest.raises(ValueError, match="not trained to refine"):    # the model itself refuses a draft
        plain.bundle.gpt._draft(torch.zeros(1, CFG.tokens_per_frame, dtype=torch.long),
                                torch.zeros(1, CFG.tokens_per_frame, dtype=torch.bool))


def test_a_backend_without_a_refine_graph_cannot_refine():
    class NoRefine(TorchBackend):          # a backend that runs the step but not the draft passes
        name = "no-refine"
        refine = Backend.refine
    be = NoRefine(BACKEND.bundle)
    assert BACKEND.can_refine and not be.can_refine
    with Engine(be, max_sessions=1) as eng:
        with pytest.raises(ValueError, match="the no-refine backend cannot run refinement passes"):
            eng.open_session(_inputs(0)[0], refine=1)
        assert eng.pool.num_used == 0
