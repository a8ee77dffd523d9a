"""eSpeak NG synthesis: voices, determinism, phoneme timing from the library's events, errors."""
from __future__ import annotations

import multiprocessing as mp
import random
import time

import numpy as np
import pytest

from eartalk.data import speech, texts
from eartalk.data.speech import SAMPLE_RATE, VOICES, synthesize

TEXT = "Bob thought the blue boat was far away."


def _f0(audio: np.ndarray) -> float:
    """Median pitch (Hz) over loud 40 ms windows, by autocorrelation."""
    est = []
    for i in range(0, len(audio) - 640, 320):
        x = audio[i:i + 640] - audio[i:i + 640].mean()
        if np.sqrt((x ** 2).mean()) < 0.03:
            continue
        c = np.correlate(x, x, "full")[639:]
        lo, hi = SAMPLE_RATE // 400, SAMPLE_RATE // 60
        est.append(SAMPLE_RATE / (lo + int(np.argmax(c[lo:hi]))))
    return float(np.median(est))


def test_voices_all_synthesise_and_differ():
    assert len(set(VOICES)) == len(VOICES) >= 12
    audios = {v: synthesize("Hello there, my friend.", v).audio for v in VOICES}
    for v, a in audios.items():
        assert a.dtype == np.float32 and a.ndim == 1 and len(a) > SAMPLE_RATE // 2, v
        assert np.sqrt(np.mean(a ** 2)) > 0.02, f"{v} is (nearly) silent"
    # eSpeak silently ignores an unknown variant; distinct audio proves each id took effect.
    keys = {(len(a), a[::97].tobytes()) for a in audios.values()}
    assert len(keys) == len(VOICES)


def test_female_variants_are_higher_pitched():
    assert _f0(synthesize(TEXT, "en-us+f3").audio) > 1.4 * _f0(synthesize(TEXT, "en-us").audio)


def test_deterministic_across_calls_and_interleaving():
    a = synthesize(TEXT, "en-gb-scotland+f4", rate=190, pitch=40)
    synthesize("Something else entirely, said by someone else.", "en-029+m5", rate=300)
    b = synthesize(TEXT, "en-gb-scotland+f4", rate=190, pitch=40)
    assert np.array_equal(a.audio, b.audio)
    assert a.phonemes == b.phonemes


def _worker(args):
    u = synthesize(*args)
    return u.audio, u.phonemes


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_processes_match_parent(method):
    # f-variants are breathy: their noise would follow eSpeak's clock-based seed if it leaked.
    jobs = [(TEXT, "en+m3"), ("Five fat frogs.", "en-us+f3"), (TEXT, "en-gb-x-gbcwmd+f5")]
    parent = [_worker(j) for j in jobs]  # initialises the library here before any fork
    time.sleep(1.1)  # the child then initialises eSpeak in a later second of the clock
    with mp.get_context(method).Pool(1) as pool:
        child = pool.map(_worker, jobs)
    for (pa, pp), (ca, cp) in zip(parent, child):
        assert np.array_equal(pa, ca) and pp == cp


def test_phoneme_segments_tile_the_audio():
    u = synthesize("Hello there, my friend. How are you today?", "en-us")
    starts = [s for s, _, _ in u.phonemes]
    ends = [e for _, e, _ in u.phonemes]
    assert starts[0] == 0.0
    assert ends[-1] == pytest.approx(u.duration, abs=1e-9)
    assert all(e > s for s, e in zip(starts, ends))
    assert all(b == a for a, b in zip(ends[:-1], starts[1:]))  # contiguous, monotone
    names = [p.lstrip("',") for _, _, p in u.phonemes]
    # "hello" starts h @ l oU in General American
    i = names.index("h")
    assert names[i:i + 4] == ["h", "@", "l", "oU"]


def test_phoneme_times_match_the_audio():
    """Pauses from the events are quiet in the audio, vowels are loud: the timing is real."""
    u = synthesize("Yes, please. I am ready, thank you.", "en-gb-x-rp+m7")

    def rms(s, e):
        x = u.audio[int(s * SAMPLE_RATE):int(e * SAMPLE_RATE)]
        return float(np.sqrt(np.mean(x ** 2)))

    pauses = [rms(s, e) for s, e, p in u.phonemes if p.startswith("_") and e - s > 0.05]
    vowels = [rms(s, e) for s, e, p in u.phonemes
              if p.lstrip("',") in ("E", "i:", "aI", "a", "eI", "u:") and e - s > 0.04]
    assert pauses and vowels
    assert max(pauses) < 0.1 * float(np.median(vowels))


@pytest.mark.parametrize("rate", [80, 449])
def test_extreme_rates_keep_exact_timing(rate):
    u = synthesize(TEXT, "en+f4", rate=rate, pitch=99)
    starts = [s for s, _, _ in u.phonemes]
    assert starts == sorted(starts) and u.phonemes[-1][1] == pytest.approx(u.duration)


def test_rate_changes_duration():
    slow = synthesize(TEXT, "en-us", rate=120)
    fast = synthesize(TEXT, "en-us", rate=320)
    assert fast.duration < 0.6 * slow.duration
    assert [p for *_, p in slow.phonemes if not p.startswith("_")] == \
           [p for *_, p in fast.phonemes if not p.startswith("_")]


@pytest.mark.parametrize("kwargs, match", [
    (dict(voice="klingon"), "unknown voice 'klingon'.*en-us"),
    (dict(voice="en-us", rate=79), "rate must be an integer in \\[80, 449\\]"),
    (dict(voice="en-us", rate=450), "rate"),  # eSpeak's libsonic range: events would be wrong
    (dict(voice="en-us", rate=175.0), "rate"),
    (dict(voice="en-us", pitch=100), "pitch must be an integer in \\[0, 99\\]"),
    (dict(voice="en-us", pitch=-1), "pitch"),
    (dict(voice="en-us", pitch=True), "pitch"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthesize(TEXT, **kwargs)


@pytest.mark.parametrize("text", ["", "   ", None])
def test_bad_text(text):
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        synthesize(text, "en-us")


def test_texts_corpus():
    assert len(set(texts.SENTENCES)) == len(texts.SENTENCES) >= 400
    lengths = [len(s.split()) for s in texts.SENTENCES]
    assert min(lengths) <= 3 and max(lengths) >= 14
    assert texts.sentence(random.Random(3)) == texts.sentence(random.Random(3))
    assert texts.sentence(np.random.default_rng(3)) in texts.SENTENCES
    assert texts.passage(random.Random(1), 3).count(" ") >= 5
    with pytest.raises(ValueError, match="rng must be"):
        texts.sentence(3)
    with pytest.raises(ValueError, match="n_sentences"):
        texts.passage(random.Random(1), 0)
