"""Phoneme -> viseme mapping and per-frame mouth tracks with coarticulation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eartalk.data import speech, texts
from eartalk.data.mouth import MOUTH_FIELDS
from eartalk.data.speech import SAMPLE_RATE, Utterance, synthesize
from eartalk.data.visemes import (PHONEME_VISEME, TARGETS, VISEME_INDEX, VISEMES, frame_track,
                                  target_array, viseme_of)

OPEN, PRESS, ROUND = (MOUTH_FIELDS.index(f) for f in ("open", "press", "round"))


@pytest.mark.parametrize("ph, vis", [
    ("p", "PP"), ("b", "PP"), ("m", "PP"), ("f", "FF"), ("v", "FF"),
    ("T", "TH"), ("D", "TH"), ("t[", "TH"),          # Caribbean dental t is a TH shape
    ("t", "DD"), ("t#", "DD"), ("n", "DD"), ("k", "DD"), ("s", "DD"),
    ("S", "CH"), ("tS", "CH"), ("dZ", "CH"), ("r-", "CH"),
    ("'aI", "AA"), ("aI@", "AA"), ("V", "AA"), ("VR", "AA"),
    ("@", "E"), ("@2", "E"), ("a#", "E"), (",eI", "E"),
    ("i:", "I"), ("I2", "I"), ("i@3", "I"), ("j", "I"),
    ("'oU", "O"), ("O:", "O"), ("0", "O"),
    ("u:", "U"), ("w", "U"), ("w#", "U"),
    ("_", "sil"), ("_:", "sil"), ("_!", "sil"),
])
def test_golden_mapping(ph, vis):
    assert viseme_of(ph) == vis


def test_unknown_phoneme_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown eSpeak phoneme 'Q'"):
        viseme_of("Q")


def test_every_phoneme_the_voices_emit_is_mapped():
    for i, voice in enumerate(speech.VOICES):
        for text in texts.SENTENCES[i * 7:i * 7 + 7] + ("Think of the lazy fox, Vivian!",):
            for _, _, p in synthesize(text, voice).phonemes:
                viseme_of(p)  # raises on an unmapped phoneme


def test_targets_are_distinct():
    t = target_array()
    assert t.shape == (len(VISEMES), len(MOUTH_FIELDS))
    d = np.sqrt(((t[:, None] - t[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    assert d.min() > 0.3
    assert set(PHONEME_VISEME.values()) == set(VISEMES) == set(TARGETS)
    assert TARGETS["sil"].open == 0 and TARGETS["PP"].open == 0 and TARGETS["PP"].press == 1


def _utt(segments, duration=None) -> Utterance:
    """An utterance with given (start, end, phoneme) segments and silent audio."""
    end = segments[-1][1] if duration is None else duration
    return Utterance(audio=np.zeros(round(end * SAMPLE_RATE), np.float32), phonemes=segments,
                     text="", voice="en-us", rate=175, pitch=50)


@pytest.fixture(scope="module")
def bob():
    return synthesize("Bob bought a big blue boat.", "en-us")


@pytest.mark.parametrize("fps", [25, 30])
def test_frame_count(bob, fps):
    ft = frame_track(bob, fps=fps)
    assert len(ft) == math.ceil(len(bob.audio) * fps / SAMPLE_RATE)
    assert ft.shape.shape == (len(ft), 7) and ft.shape.dtype == np.float32
    assert ft.viseme.shape == (len(ft),) and len(ft.phoneme) == len(ft)
    np.testing.assert_array_equal(ft.mouth_open, ft.shape[:, OPEN])
    np.testing.assert_array_equal(ft.mouth_width, ft.shape[:, MOUTH_FIELDS.index("width")])


def test_padding_is_silence_and_truncation_keeps_the_prefix(bob):
    full = frame_track(bob)
    padded = frame_track(bob, n_frames=len(full) + 20)
    assert len(padded) == len(full) + 20
    assert padded.phoneme[-20:] == ["_"] * 20
    assert (padded.viseme[-20:] == VISEME_INDEX["sil"]).all()
    assert (padded.mouth_open[-20:] == 0).all()
    short = frame_track(bob, n_frames=10)
    np.testing.assert_array_equal(short.shape, full.shape[:10])


def test_silent_frames_are_closed(bob):
    ft = frame_track(bob)
    sil = ft.viseme == VISEME_INDEX["sil"]
    assert sil.any()
    assert [p for p, s in zip(ft.phoneme, sil) if s] == ["_"] * int(sil.sum())
    assert (ft.mouth_open[sil] == 0).all()
    assert (ft.mouth_open[~sil].max()) > 0.5  # and speech does open the mouth


def test_bilabials_close_at_their_centre_frame(bob):
    ft = frame_track(bob)
    centres = (np.arange(len(ft)) + 0.5) / ft.fps
    bilabials = [(s, e) for s, e, p in bob.phonemes if p.lstrip("',") in ("b", "m", "p")]
    assert len(bilabials) >= 4
    for s, e in bilabials:
        f = int(np.argmin(np.abs(centres - (s + e) / 2)))  # the frame nearest its centre
        assert ft.viseme[f] == VISEME_INDEX["PP"]
        assert ft.shape[f, PRESS] > 0.99 and ft.shape[f, OPEN] < 0.01


def test_short_bilabial_between_frame_centres_gets_a_frame():
    # At 25 fps centres are 20, 60, 100 ms ...: the "b" at 65-95 ms contains none.
    utt = _utt([(0.0, 0.065, "a"), (0.065, 0.095, "b"), (0.095, 0.3, "a")])
    ft = frame_track(utt)
    assert ft.phoneme.count("b") == 1
    f = ft.phoneme.index("b")
    assert ft.shape[f, PRESS] == pytest.approx(1.0) and ft.shape[f, OPEN] == pytest.approx(0.0)


def test_coarticulation_blends_neighbours():
    # A weak consonant between rounded vowels takes on some rounding; its label stays DD.
    utt = _utt([(0.0, 0.2, "u:"), (0.2, 0.28, "t"), (0.28, 0.5, "u:")])
    ft = frame_track(utt)
    f = ft.phoneme.index("t")
    assert ft.viseme[f] == VISEME_INDEX["DD"]
    assert 0.1 < ft.shape[f, ROUND] < 0.5


segment_lists = st.lists(
    st.tuples(st.floats(0.01, 0.4), st.sampled_from(sorted(PHONEME_VISEME))), min_size=1,
    max_size=25)


@settings(max_examples=60, deadline=None)
@given(segment_lists, st.sampled_from([20, 25, 30, 60]))
def test_shapes_in_range_and_nearest_to_their_label(segs, fps):
    t, out = 0.0, []
    for dur, p in segs:
        out.append((t, t + dur, p))
        t += dur
    ft = frame_track(_utt(out), fps=fps)
    assert ((ft.shape >= 0) & (ft.shape <= 1)).all()
    tg = target_array()
    nearest = np.argmin(((ft.shape[:, None] - tg[None]) ** 2).sum(-1), axis=1)
    # The label's target keeps > 1/2 of the weight, so it is the nearest target (ties aside).
    assert (nearest == ft.viseme).mean() >= 0.95


@pytest.mark.parametrize("kwargs, match", [
    (dict(fps=0), "fps must be a positive integer"),
    (dict(fps=25.0), "fps"),
    (dict(n_frames=0), "n_frames must be a positive integer"),
])
def test_bad_arguments(bob, kwargs, match):
    with pytest.raises(ValueError, match=match):
        frame_track(bob, **kwargs)
