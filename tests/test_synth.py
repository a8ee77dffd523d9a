"""The synthetic corpus: determinism, resumability, held-out splits, bad arguments."""
import json
import subprocess
import sys

import numpy as np
import pytest

from eartalk.data import corpus, synth


@pytest.fixture(scope="module")
def twin_corpora(tmp_path_factory):
    """`eartalk synth --clips 4 --seed 7` run twice into two folders (as the issue checks it)."""
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    for out, workers in ((a, 2), (b, 1)):
        synth.synthesize_corpus(out, clips=4, seed=7, size=64, workers=workers, progress=False)
    return a, b


def test_same_seed_gives_byte_identical_ground_truth_and_frames(twin_corpora):
    a, b = twin_corpora
    ids = sorted(p.name for p in (a / "clips").glob("*.gt.csv"))
    assert len(ids) == 4
    for name in ids:
        assert (a / "clips" / name).read_bytes() == (b / "clips" / name).read_bytes()
    for cid in corpus.list_clips(a):
        fa, fb = corpus.load_clip(a, cid).frames, corpus.load_clip(b, cid).frames
        assert np.array_equal(np.asarray(fa), np.asarray(fb))


def test_clip_contents_agree(twin_corpora):
    a, _ = twin_corpora
    for cid in corpus.list_clips(a):
        clip = corpus.load_clip(a, cid)
        n = clip.meta["n_frames"]
        assert np.asarray(clip.frames).shape == (n, 64, 64, 3)
        assert len(clip.gt["frame"]) == n
        # ceil(duration * 25) frames for the audio's duration
        assert n == int(np.ceil(len(clip.audio) / 640))
        assert (a / "clips" / f"{cid}.mp4").stat().st_size > 0
        assert set(clip.gt) >= {"phoneme", "viseme", "mouth_open", "mouth_width", "yaw", "pitch", "roll",
                                "gaze_x", "gaze_y", "blink", "emotion", "identity"}


def test_splits_hold_out_identities_and_voices():
    voices = tuple(f"v{i}" for i in range(12))
    asg = synth.split_assignment(3, 200, voices)
    for kind in ("identities", "voices"):
        parts = asg[kind]
        for s1 in synth.SPLITS:
            for s2 in synth.SPLITS:
                if s1 < s2:
                    assert not set(parts[s1]) & set(parts[s2])
        assert all(parts[s] for s in synth.SPLITS)
    plans = [synth.plan_clip(i, 3, asg) for i in range(300)]
    for p in plans:
        assert p.identity_id in asg["identities"][p.split]
        assert p.voice in asg["voices"][p.split]


def test_data_card_counts(twin_corpora):
    a, _ = twin_corpora
    card = json.loads((a / "data_card.json").read_text())
    assert card["clips"] == 4
    assert sum(s["clips"] for s in card["splits"].values()) == 4
    assert card["frames"] == sum(corpus.load_clip(a, c, frames=False).meta["n_frames"] for c in corpus.list_clips(a))
    assert abs(sum(card["viseme_distribution"].values()) - 1) < 1e-3
    assert (a / "data_card.md").read_text().startswith("# Data card")


def test_resume_skips_finished_clips(tmp_path):
    synth.synthesize_corpus(tmp_path, clips=2, seed=1, size=32, workers=1, progress=False)
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "clips").glob("*.json")}
    # a half-written clip left behind by an interruption
    (tmp_path / "clips" / "clip000002.gt.csv").write_text("partial")
    synth.synthesize_corpus(tmp_path, clips=3, seed=1, size=32, workers=1, progress=False)
    for p, m in done.items():
        assert p.stat().st_mtime_ns == m, f"{p.name} was redone"
    assert corpus.clip_done(tmp_path, "clip000002")
    clip = corpus.load_clip(tmp_path, "clip000002", frames=False)
    assert len(clip.gt["frame"]) == clip.meta["n_frames"]
    assert not list((tmp_path / "clips").glob("*.partial"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(clips=0), "--clips"),
    (dict(clips=-3), "--clips"),
    (dict(clips=2, size=100), "--size"),
    (dict(clips=2, voices=("en-us", "klingon")), "klingon"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    kwargs.setdefault("size", 32)
    with pytest.raises(ValueError, match=match):
        synth.synthesize_corpus(tmp_path, seed=0, progress=False, **kwargs)


def test_unwritable_output_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="--out"):
        synth.synthesize_corpus(blocker / "sub", clips=1, seed=0, size=32, progress=False)


def test_cli_help_and_error_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "eartalk.cli", "synth", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--clips" in r.stdout and "--seed" in r.stdout
    r = subprocess.run([sys.executable, "-m", "eartalk.cli", "synth", "--out", str(tmp_path), "--clips", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--clips must be a positive integer" in r.stderr


def test_rerender_gives_a_clips_frames_back_bit_for_bit_and_renders_a_changed_blink(twin_corpora):
    a, _ = twin_corpora
    clip = corpus.load_clip(a, corpus.list_clips(a)[0])
    frames = np.asarray(clip.frames)
    assert np.array_equal(synth.rerender(clip.meta["identity"], clip.gt, 64), frames)
    blink = np.zeros(len(frames))
    blink[3] = 1.0
    shut = synth.rerender(clip.meta["identity"], {**clip.gt, "blink": blink}, 64)
    changed = set(np.flatnonzero((shut != frames).any(axis=(1, 2, 3))))
    diff = np.abs(blink - np.asarray(clip.gt["blink"]))
    assert changed <= set(np.flatnonzero(diff > 0))                  # nothing else moved
    assert set(np.flatnonzero(diff >= 0.2)) <= changed and 3 in changed   # its own blinks opened, frame 3 shut
