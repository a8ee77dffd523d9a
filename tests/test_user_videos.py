"""Users' own videos: loading (fps/size normalisation, errors) and import into the corpus."""
import json
import logging

import numpy as np
import pytest

from eartalk.data.corpus import list_clips, load_clip, write_clip
from eartalk.data.user_videos import import_user_videos, load_user_video, load_user_videos
from eartalk.data.video_io import Mp4Writer, write_mp4


def _frames(n, side):
    y, x = np.mgrid[0:side, 0:side]
    return [np.stack([x * 128 // side + 3 * i, y * 128 // side, np.full_like(x, 90)], -1).astype(np.uint8)
            for i in range(n)]


def _audio(n_frames, rate=16000, fps=25):
    t = np.arange(n_frames * rate // fps) / rate
    return (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def _write_at_fps(path, n, side, fps, audio_rate):
    with Mp4Writer(path, fps=fps, size=side, audio_rate=audio_rate) as w:
        for f in _frames(n, side):
            w.write(f)
        w.write_audio(_audio(n, audio_rate, fps))


def test_load_normalises_fps_rate_and_size(tmp_path, caplog):
    folder = tmp_path / "mine"
    folder.mkdir()
    write_mp4(folder / "a.mp4", _frames(10, 32), _audio(10))
    _write_at_fps(folder / "b.mp4", 15, 64, fps=30, audio_rate=22050)  # 0.5 s at 30 fps, 22.05 kHz
    (folder / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING):
        clips = load_user_videos(folder, size=32)
    assert [c.clip_id for c in clips] == ["user_a", "user_b"]
    a, b = clips
    assert a.frames.shape == (10, 32, 32, 3) and a.gt is None
    assert abs(len(a.audio) - 6400) <= 640
    assert b.frames.shape == (13, 32, 32, 3)  # round(0.5 s * 25)
    assert abs(len(b.audio) - 8000) <= 640  # 0.5 s at 16 kHz
    assert b.meta["source_size"] == [64, 64]
    assert "b.mp4 is 64x64; rescaling" in caplog.text


def test_non_square_names_the_file(tmp_path):
    write_mp4(tmp_path / "wide.mp4", [np.zeros((32, 48, 3), np.uint8)] * 3, _audio(3))
    with pytest.raises(ValueError, match=r"wide.mp4 has frames of height x width 32x48; expected square"):
        load_user_video(tmp_path / "wide.mp4", size=32)


def test_missing_audio_and_empty_folder(tmp_path):
    write_mp4(tmp_path / "mute.mp4", _frames(3, 32))
    with pytest.raises(ValueError, match="mute.mp4 has no audio track"):
        load_user_videos(tmp_path, size=32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no video files in .*empty"):
        load_user_videos(empty)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_user_videos(tmp_path / "nothere")


def test_import_round_trip(tmp_path):
    folder, corpus = tmp_path / "mine", tmp_path / "corpus"
    folder.mkdir()
    for i in range(5):
        write_mp4(folder / f"take {i}.mp4", _frames(6 + i, 32), _audio(6 + i))
    # A synthetic clip already in the corpus keeps its split.
    write_clip(corpus, "syn0", np.zeros((2, 32, 32, 3), np.uint8), np.zeros(1280, np.float32),
               {"x": np.zeros(2)}, {"split": "test"}, write_video=False)

    splits = import_user_videos(folder, corpus, size=32, val_fraction=0.2)
    ids = [f"user_take_{i}" for i in range(5)]
    assert sorted(splits["train"] + splits["val"]) == ids and len(splits["val"]) == 1
    assert list_clips(corpus) == sorted(ids + ["syn0"])
    assert list_clips(corpus, "test") == ["syn0"]
    assert list_clips(corpus, "val") == splits["val"]

    direct = load_user_video(folder / "take 3.mp4", size=32)
    clip = load_clip(corpus, "user_take_3")
    np.testing.assert_array_equal(clip.frames, direct.frames)
    assert np.max(np.abs(clip.audio - direct.audio)) <= 1 / 32768 + 1e-6
    assert clip.gt is None and clip.meta["source"] == "take 3.mp4" and clip.meta["n_frames"] == 9
    assert clip.meta["split"] in ("train", "val")

    # Re-importing is a no-op for unchanged clips and gives the same splits.
    before = (corpus / "clips/user_take_0.json").stat().st_mtime_ns
    assert import_user_videos(folder, corpus, size=32, val_fraction=0.2) == splits
    assert (corpus / "clips/user_take_0.json").stat().st_mtime_ns == before
    assert json.loads((corpus / "splits.json").read_text())["test"] == ["syn0"]


def test_import_refuses_clashing_names(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    write_mp4(folder / "a b.mp4", _frames(2, 32), _audio(2))
    write_mp4(folder / "a_b.mp4", _frames(2, 32), _audio(2))
    with pytest.raises(ValueError, match=r"same clip ids \['user_a_b'\]"):
        import_user_videos(folder, tmp_path / "corpus", size=32)


def test_import_command_and_training_on_user_clips(tmp_path, capsys):
    """`eartalk import` writes the corpus; the transformer's batches of clips without ground
    truth have every control free."""
    from eartalk.cli import main
    from eartalk.model.bundle import new_bundle
    from eartalk.model.config import preset
    from eartalk.model.train_gpt import make_batch, tokenize_corpus
    folder, corpus = tmp_path / "mine", tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        write_mp4(folder / f"t{i}.mp4", _frames(20, 32), _audio(20))
    assert main(["import", "--videos", str(folder), "--out", str(corpus), "--size", "32"]) == 0
    n_train, n_val = len(list_clips(corpus, "train")), len(list_clips(corpus, "val"))
    assert n_train + n_val == 3 and n_train >= 1
    printed = capsys.readouterr().out
    assert f"{n_train} train clips, {n_val} val clips" in printed
    assert f"next: eartalk train --from tiny --data {corpus} --mix CORPUS" in printed
    assert main(["import", "--videos", str(tmp_path / "nope"), "--out", str(corpus)]) == 2
    assert "not a folder of videos" in capsys.readouterr().err
    bundle = new_bundle(preset("test"))
    clips = tokenize_corpus(bundle, corpus, "train", progress=False)
    assert clips and all(c.gt is None for c in clips)
    b = make_batch(bundle, clips, 2, 4, 0.5, np.random.default_rng(0))
    assert b.tokens.shape == (2, 4, bundle.cfg.tokens_per_frame) and not b.mask.any()   # all free
