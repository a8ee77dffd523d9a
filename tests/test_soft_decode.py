"""runtime/soft_decode.py and the engine's decode modes: the expected code (golden values), the
option's checks, and that the mode changes the picture but never the stream's tokens."""
import numpy as np
import pytest
import torch

from eartalk.model.bundle import new_bundle
from eartalk.model.config import preset
from eartalk.model.tokenizer import code_table
from eartalk.runtime import Engine
from eartalk.runtime.soft_decode import DEFAULT_DECODE, check_decode, expected_codes
from eartalk.runtime.torch_backend import TorchBackend

torch.set_num_threads(1)
CFG = preset("test")
BACKEND = TorchBackend(new_bundle(CFG, seed=0))
SPF = CFG.samples_per_frame


def test_expected_codes_golden_values():
    table = code_table(4).numpy()               # one FSQ digit of 4 levels: -1, -1/3, 1/3, 1
    np.testing.assert_allclose(table[:, 0], [-1, -1 / 3, 1 / 3, 1], rtol=1e-6)
    p = np.array([0.5, 0.25, 0.25, 0.0])
    logits = np.log(np.maximum(p, 1e-30))[None]                       # [N=1, V=4]
    np.testing.assert_allclose(expected_codes(logits, table), [[-0.5]], atol=1e-6)
    # a shift of every logit changes nothing (float32 logits of a few hundred: exp would overflow
    # unshifted); a sure row is its token's code exactly
    np.testing.assert_allclose(expected_codes(logits + 300.0, table), [[-0.5]], atol=1e-5)
    sure = np.full((2, 4), -200.0)
    sure[0, 2], sure[1, 0] = 200.0, 200.0
    np.testing.assert_array_equal(expected_codes(sure, table), table[[2, 0]])
    # uniform over a full FSQ codebook: the middle of every digit, 0, to the documented 1e-6 (a
    # float32 sum of 512 terms: its rounding follows the CPU's SIMD width, 2.7e-7 on an AVX2 EPYC)
    np.testing.assert_allclose(expected_codes(np.zeros((3, 512)), code_table(512).numpy()), 0.0, atol=1e-6)


def test_expected_codes_refuses_a_table_of_another_codebook():
    with pytest.raises(ValueError, match="logits have 16 codes .* the code table has 512"):
        expected_codes(np.zeros((4, 16)), code_table(512).numpy())


def test_check_decode_lists_the_modes():
    assert check_decode(None) == DEFAULT_DECODE == "expected" and check_decode("tokens") == "tokens"
    for bad in ("soft", "", 1):
        with pytest.raises(ValueError, match=r"decode must be one of \['expected', 'tokens'\]"):
            check_decode(bad)
    with pytest.raises(ValueError, match="decode must be one of"):
        Engine(BACKEND, max_sessions=1).open_session(np.zeros((32, 32, 3), np.uint8), decode="argmax")


def _stream(decode, portrait, audio):
    """Frames and each step's tokens (as the cache and the next step read them) of one session."""
    with Engine(BACKEND, max_sessions=1) as eng:
        s = eng.open_session(portrait, decode=decode, idle_motion=False)
        s.push_audio(audio)
        s.flush()
        toks, frames = [], []
        while eng.tick():
            toks.append(s._state.prev_tokens.copy())
            frames.extend(f.image for f in s.frames())
    return np.stack(toks), np.stack(frames)


def test_the_mode_changes_the_picture_not_the_stream():
    rng = np.random.default_rng(5)
    portrait = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    audio = (rng.standard_normal(SPF * 6) * 0.2).astype(np.float32)
    t_tok, f_tok = _stream("tokens", portrait, audio)
    t_exp, f_exp = _stream("expected", portrait, audio)
    np.testing.assert_array_equal(t_tok, t_exp)               # same tokens, same history
    _, ref = BACKEND.encode_portrait(portrait)
    for t, f in zip(t_tok, f_tok):                             # "tokens": the tokens' own frame
        np.testing.assert_array_equal(f, BACKEND.decode(t[None], ref[None])[0])
    assert not np.array_equal(f_tok, f_exp)
    _, f_default = _stream(None, portrait, audio)
    np.testing.assert_array_equal(f_default, f_exp)


def test_engine_codes_per_session_mode():
    """``Engine._codes``: each row by its own session's mode, in one batch."""
    class S:
        def __init__(self, decode):
            self.decode = decode
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, CFG.tokens_per_frame, CFG.codebook_size)).astype(np.float32) * 3
    tokens = logits.argmax(-1)
    codes = Engine(BACKEND, max_sessions=1)._codes([S("expected"), S("tokens")], tokens, logits)
    np.testing.assert_array_equal(codes[0], expected_codes(logits[0], BACKEND.code_table))
    np.testing.assert_array_equal(codes[1], BACKEND.code_table[tokens[1]])


def test_decode_codes_checks_its_input():
    _, ref = BACKEND.encode_portrait(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"decode codes must be float32 \[B, 4, 2\]"):
        BACKEND.decode_codes(np.zeros((1, 4, 3), np.float32), ref[None])
    with pytest.raises(ValueError, match=r"decode tokens must be integers in \[0, 16\)"):
        BACKEND.decode(np.full((1, 4), 16), ref[None])
