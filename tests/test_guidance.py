"""runtime/guidance.py and the engine's guided rows: the arithmetic (golden values), the silence
tokens, a guided stream against a hand-written loop over ``gpt.step``, batching with unguided
sessions, refinement passes under guidance, and the refusals."""
import numpy as np
import pytest
import torch

from eartalk.model.audio import StreamingAudioFrontend
from eartalk.model.bundle import new_bundle
from eartalk.model.config import preset
from eartalk.runtime import Engine, PoolFullError
from eartalk.runtime.guidance import DEFAULT_GUIDANCE, check_guidance, guide, silence_audio
from eartalk.runtime.torch_backend import TorchBackend
from manual_stream import assert_engine_matches_loop, manual_stream

torch.set_num_threads(1)
CFG = preset("test", refine=True)


def _bundle():
    """A random model whose audio matters: at init the audio moves the logits too little to flip
    an argmax, so guidance would change no token. With these weights it does (asserted below)."""
    b = new_bundle(CFG, seed=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (b.gpt.audio_proj.weight, b.gpt.head.weight, b.gpt.draft_known, b.gpt.digit_emb.weight):
            p.copy_(torch.randn(p.shape, generator=g))
        for blk in b.gpt.blocks:
            for p in (blk.attn.qkv.weight, blk.attn.proj.weight, blk.mlp[0].weight, blk.mlp[2].weight):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return b


BACKEND = TorchBackend(_bundle())
SPF = CFG.samples_per_frame


def _inputs(i, frames=6):
    rng = np.random.default_rng(20 + i)
    return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), (rng.standard_normal(SPF * frames) * 0.3).astype(np.float32)


def _run(eng, portrait, audio, guidance, refine=0):
    s = eng.open_session(portrait, guidance=guidance, refine=refine, idle_motion=False)
    s.push_audio(audio)
    s.flush()
    return s, [f.image for f in s.frames()]


def test_guide_golden_values():
    speech = np.array([[1.0, 3.0, -2.0]], np.float32)
    silent = np.array([[0.5, 3.0, 0.0]], np.float32)
    # silent + s (speech - silent): s = 2 -> [1.5, 3, -4]; s = 1 -> speech; s = 0 -> silent
    np.testing.assert_array_equal(guide(speech, silent, 2.0), [[1.5, 3.0, -4.0]])
    np.testing.assert_array_equal(guide(speech, silent, 1.0), speech)
    np.testing.assert_array_equal(guide(speech, silent, 0.0), silent)
    rows = guide(np.stack([speech, speech]), np.stack([silent, silent]), np.array([1.0, 3.0])[:, None, None])
    np.testing.assert_array_equal(rows[1], [[2.0, 3.0, -6.0]])
    with pytest.raises(ValueError, match=r"speech logits \(1, 3\) and silent logits \(1, 2\)"):
        guide(speech, silent[:, :2], 2.0)


@pytest.mark.parametrize("bad", [-0.5, 8.5, float("nan"), float("inf"), "2", True, None])
def test_check_guidance_names_the_accepted_range(bad):
    with pytest.raises(ValueError, match=r"guidance must be a number in \[0, 8\] \(1 = off, 1.5 = the default\)"):
        check_guidance(bad)
    assert check_guidance(1) == 1.0 and check_guidance(np.float32(2.5)) == 2.5


def test_silence_tokens_are_what_a_stream_reads_in_silence():
    front = StreamingAudioFrontend(CFG, BACKEND.encode_audio, receptive_field=BACKEND.receptive_field)
    feats = front.push(np.zeros(SPF * 40, np.float32))
    np.testing.assert_array_equal(feats[-1], silence_audio(BACKEND))


def _manual(portrait, audio, guidance):
    """The same stream by hand: per frame gpt.step on the speech and again on silence (same
    history), logits guided, argmax; the cache page is the speech step's."""
    sil = torch.from_numpy(silence_audio(BACKEND)[None])

    def frame(gpt, prev, a, c, m, pk, pv, pl):
        speech, nk, nv = gpt.step(prev, a, c, m, pk, pv, pl)
        silent = gpt.step(prev, sil, c, m, pk, pv, pl)[0]
        guided = guide(speech.numpy(), silent.numpy(), guidance)[0]
        return torch.from_numpy(guided.argmax(-1)), nk, nv, guided
    return manual_stream(BACKEND, portrait, audio, frame)


@pytest.mark.parametrize("guidance", [0.0, 2.0, 3.5])
def test_engine_guidance_equals_a_hand_written_loop(guidance):
    portrait, audio = _inputs(1)
    with Engine(BACKEND, max_sessions=1) as eng:
        _, got = _run(eng, portrait, audio, guidance)
    with Engine(BACKEND, max_sessions=1) as eng:
        plain = _run(eng, portrait, audio, 1)[1]
    assert_engine_matches_loop(got, _manual(portrait, audio, guidance), plain, frames=6)


def test_guidance_1_is_the_unguided_stream_and_the_default_is_documented():
    portrait, audio = _inputs(2)
    with Engine(BACKEND, max_sessions=1) as eng:
        _, plain = _run(eng, portrait, audio, 1)
    np.testing.assert_array_equal(np.stack(plain), np.stack(_manual(portrait, audio, 1.0)))
    with Engine(BACKEND, max_sessions=1) as eng:
        s, default = _run(eng, portrait, audio, None)
        assert s._state.guidance == DEFAULT_GUIDANCE == 1.5
    with Engine(BACKEND, max_sessions=1) as eng:
        np.testing.assert_array_equal(np.stack(default), np.stack(_run(eng, portrait, audio, 1.5)[1]))


def test_guided_and_unguided_sessions_batch_like_alone():
    scales, refines = (1.0, 2.0, 0.5, 2.0), (0, 0, 0, 2)
    alone = []
    for i, (g, r) in enumerate(zip(scales, refines)):
        with Engine(BACKEND, max_sessions=1) as eng:
            alone.append(_run(eng, *_inputs(i), g, r)[1])
    with Engine(BACKEND, max_sessions=4) as eng:
        states = []
        for i, (g, r) in enumerate(zip(scales, refines)):
            s = eng.open_session(_inputs(i)[0], guidance=g, refine=r, idle_motion=False)
            s.push_audio(_inputs(i)[1])
            s.flush()
            states.append(s)
        eng.run_until_idle()
        for s, want in zip(states, alone):
            np.testing.assert_array_equal(np.stack([f.image for f in s.frames()]), np.stack(want))


def test_refinement_passes_are_guided_too():
    portrait, audio = _inputs(3)
    with Engine(BACKEND, max_sessions=1) as eng:
        unguided = _run(eng, portrait, audio, 1.0, refine=2)[1]
    with Engine(BACKEND, max_sessions=1) as eng:
        guided_first = _run(eng, portrait, audio, 2.0, refine=0)[1]
    with Engine(BACKEND, max_sessions=1) as eng:
        both = _run(eng, portrait, audio, 2.0, refine=2)[1]
    assert not np.array_equal(np.stack(both), np.stack(unguided))
    assert not np.array_equal(np.stack(both), np.stack(guided_first))


def test_a_backend_row_limit_refuses_a_guided_session_and_holds_nothing():
    class TwoRows(TorchBackend):           # as a TensorRT engine built with --max-batch 2
        name = "two-rows"
        max_batch = 2
    be = TwoRows(BACKEND.bundle)
    with Engine(be, max_sessions=3) as eng:
        kept = [eng.open_session(_inputs(0)[0], guidance=2.0)]          # two rows
        used = eng.pool.num_used
        with pytest.raises(PoolFullError, match=r"at most 2 rows .*guidance=1\) the batch would make 3 rows "
                                                r"\(1 guided sessions"):
            eng.open_session(_inputs(1)[0], guidance=1.0)
        assert eng.pool.num_used == used
    with Engine(be, max_sessions=3) as eng:
        kept = [eng.open_session(_inputs(i)[0], guidance=1.0) for i in range(2)]   # two rows: fits
        with pytest.raises(PoolFullError, match="would make 3 rows"):
            eng.open_session(_inputs(2)[0], guidance=1.0)
    assert len(kept) == 2


def test_bad_guidance_is_refused_before_any_page_is_held():
    with Engine(BACKEND, max_sessions=1) as eng:
        with pytest.raises(ValueError, match="guidance must be a number"):
            eng.open_session(_inputs(0)[0], guidance=-1)
        assert eng.pool.num_used == 0


def test_the_command_line_states_the_runtime_default():
    import argparse

    from eartalk.commands.model_options import add_model_options
    p = argparse.ArgumentParser()
    add_model_options(p)
    text = " ".join(p.format_help().split())
    assert f"default {DEFAULT_GUIDANCE:g}, measured best for tiny" in text
    assert p.parse_args([]).guidance is None and p.parse_args(["--guidance", "1"]).guidance == 1.0
