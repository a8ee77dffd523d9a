"""One stream by hand, for the tests that check the engine against ``gpt.step`` (refinement,
guidance): the session's own audio front end and controls, a dense cache laid out as
``gpt.empty_cache`` documents (sink page, then the window's pages oldest first), and per frame
whatever the caller makes of the step. The frame shown is decoded from the expected codes under
the logits that picked each token, as the engine's default (``runtime/soft_decode.py``)."""
import numpy as np
import torch

from eartalk.runtime import Engine
from eartalk.runtime.soft_decode import expected_codes


def manual_stream(backend, portrait, audio, frame):
    """Frames of ``audio`` on ``portrait``: per frame ``frame(gpt, prev, audio, cond, cond_mask,
    past_k, past_v, past_lag)`` -> (tokens int64 [N], new_k, new_v, logits [N, V]: for each token
    those of the pass that picked it) under ``inference_mode``."""
    gpt, cfg = backend.bundle.gpt, backend.cfg
    P, W = cfg.page_tokens, cfg.window
    eng = Engine(backend, max_sessions=1)       # only for its audio front end and controls
    handle = eng.open_session(portrait, idle_motion=False, guidance=1)   # kept: a dropped handle closes it
    st = handle._state
    st.push_audio(audio)
    st.flush()
    tok, ref = backend.encode_portrait(portrait)
    with torch.inference_mode():
        sk, sv = gpt.prefill(torch.from_numpy(tok[None]))
    pages, prev, images = [], torch.from_numpy(tok[None]), []
    while st.ready:
        a, c, m = (torch.from_numpy(np.asarray(x)[None]) for x in st.step_inputs())
        st.frame_index += 1
        pk, pv, pl = gpt.empty_cache(1)
        pk[:, :, :, :P], pv[:, :, :, :P], pl[:, :P] = sk, sv, -1
        for i, (k, v) in enumerate(pages):
            lo = P + (W - len(pages) + i) * P
            pk[:, :, :, lo:lo + P], pv[:, :, :, lo:lo + P], pl[:, lo:lo + P] = k, v, len(pages) - i
        with torch.inference_mode():
            t, nk, nv, lg = frame(gpt, prev, a, c, m, pk, pv, pl)
        pages = (pages + [(nk, nv)])[-W:]
        prev = t[None]
        images.append(backend.decode_codes(expected_codes(np.asarray(lg), backend.code_table)[None], ref[None])[0])
    eng.close()
    return images


def assert_engine_matches_loop(got, want, plain, frames: int) -> None:
    """The engine's frames ``got`` equal the hand-written loop's ``want`` bit for bit, and differ
    from the ``plain`` one-pass unguided stream (the feature under test did change tokens)."""
    assert len(got) == len(want) == frames
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert not np.array_equal(np.stack(got), np.stack(plain))
