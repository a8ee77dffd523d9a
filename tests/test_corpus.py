"""The clip format: round trips, byte-identical ground truth, completion marker, cleanup, splits."""
import json

import numpy as np
import pytest

from eartalk.data.corpus import (Clip, clip_done, clip_frames_at, cleanup_partial, list_clips, load_clip, read_gt_csv,
                                 write_clip, write_gt_csv, write_splits)


def _clip(n=10, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    audio = (0.3 * np.sin(np.arange(n * 640) * 0.05)).astype(np.float32)
    gt = {
        "frame": np.arange(n),
        "mouth_open": rng.random(n).astype(np.float32),
        "yaw": np.linspace(-30, 30, n),          # float64 in, float32 out
        "blink": np.arange(n) % 3 == 0,            # bool -> 0/1
        "viseme": np.array(["sil", "AA", "M, B"] * 4)[:n],  # strings, one with a comma
    }
    return frames, audio, gt


def test_gt_csv_round_trip_and_exact_bytes(tmp_path):
    _, _, gt = _clip()
    gt["whole"] = np.array([1.0, -2.0, 0.5, 1e-7, 3.0, 0, 0, 0, 0, 0], np.float32)
    write_gt_csv(tmp_path / "a.csv", gt)
    write_gt_csv(tmp_path / "b.csv", {k: np.array(v, copy=True) for k, v in gt.items()})
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    back = read_gt_csv(tmp_path / "a.csv")
    assert list(back) == list(gt)  # column order kept
    assert back["frame"].dtype == np.int64 and back["frame"].tolist() == list(range(10))
    np.testing.assert_array_equal(back["mouth_open"], gt["mouth_open"])  # float32 exact
    np.testing.assert_array_equal(back["yaw"], gt["yaw"].astype(np.float32))
    assert back["whole"].dtype == np.float32  # "1.0" is not mistaken for an int column
    np.testing.assert_array_equal(back["whole"], gt["whole"])
    assert back["blink"].tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert back["viseme"].tolist() == gt["viseme"].tolist()
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "frame,mouth_open,yaw,blink,viseme,whole"
    assert lines[1].startswith("0,") and lines[1].endswith(",sil,1.0")
    assert ',"M, B",' in lines[3]


def test_gt_csv_rejects_ragged_and_2d(tmp_path):
    with pytest.raises(ValueError, match="different lengths"):
        write_gt_csv(tmp_path / "x.csv", {"a": np.zeros(3), "b": np.zeros(4)})
    with pytest.raises(ValueError, match="must be 1-D"):
        write_gt_csv(tmp_path / "x.csv", {"a": np.zeros((3, 2))})
    assert not (tmp_path / "x.csv").exists()


def test_clip_round_trip(tmp_path):
    frames, audio, gt = _clip()
    meta = {"identity": {"skin": np.float32(0.25), "hue": np.array([1, 2])}, "voice": "af_1",
            "text": "hello", "split": "train"}
    write_clip(tmp_path, "c0001", frames, audio, gt, meta)
    assert clip_done(tmp_path, "c0001")
    clip = load_clip(tmp_path, "c0001")
    np.testing.assert_array_equal(clip.frames, frames)  # lossless frame cache
    assert np.max(np.abs(clip.audio - audio)) <= 1 / 32768 + 1e-7
    assert clip.gt["mouth_open"].tolist() == gt["mouth_open"].tolist()
    assert clip.meta["identity"] == {"skin": 0.25, "hue": [1, 2]}
    assert clip.identity == {"skin": 0.25, "hue": [1, 2]}
    assert clip.meta["n_frames"] == 10 and clip.meta["height"] == 32 and clip.meta["text"] == "hello"
    files = sorted(p.name for p in (tmp_path / "clips").iterdir())
    assert files == ["c0001.frames.npy", "c0001.gt.csv", "c0001.json", "c0001.mp4", "c0001.wav"]
    assert load_clip(tmp_path, "c0001", frames=False).frames is None


def test_clip_frames_at_reads_the_frames_load_clip_reads(tmp_path):
    frames, audio, gt = _clip()
    write_clip(tmp_path, "c0001", frames, audio, gt, {})
    at = np.array([7, 0, 7, 9])
    got = clip_frames_at(tmp_path, "c0001", at)
    assert got.flags.c_contiguous and not isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, load_clip(tmp_path, "c0001").frames[at])
    assert clip_frames_at(tmp_path, "c0001", np.zeros(0, int)).shape == (0, 32, 32, 3)
    with pytest.raises(IndexError, match="frames 0..10 asked; it has 10"):
        clip_frames_at(tmp_path, "c0001", [0, 10])
    with pytest.raises(FileNotFoundError, match="clip 'c0002'"):
        clip_frames_at(tmp_path, "c0002", [0])


def test_clip_identity_none_for_an_imported_video(tmp_path):
    frames, audio, _ = _clip()
    write_clip(tmp_path, "v0001", frames, audio, None, {"source": "me.mp4"})
    assert load_clip(tmp_path, "v0001").identity is None
    assert Clip("x", None, audio, None, meta=None).identity is None


def test_identical_clips_give_identical_files(tmp_path):
    frames, audio, gt = _clip()
    write_clip(tmp_path / "a", "c", frames, audio, gt, {"v": 1})
    write_clip(tmp_path / "b", "c", frames, audio, gt, {"v": 1})
    # The mp4 is left out: x264 encodes are not promised bit-exact across processes.
    for suffix in (".gt.csv", ".json", ".wav", ".frames.npy"):
        assert (tmp_path / "a/clips" / f"c{suffix}").read_bytes() == \
               (tmp_path / "b/clips" / f"c{suffix}").read_bytes(), suffix


def test_clip_without_gt_or_video(tmp_path):
    frames, audio, _ = _clip(4)
    write_clip(tmp_path, "u", frames, audio, None, {}, write_video=False)
    clip = load_clip(tmp_path, "u")
    assert clip.gt is None and clip.frames.shape == (4, 32, 32, 3)
    assert json.loads((tmp_path / "clips/u.json").read_text())["files"] == ["u.frames.npy", "u.wav"]


def test_rewrite_removes_files_the_new_version_lacks(tmp_path):
    frames, audio, gt = _clip(4)
    write_clip(tmp_path, "c", frames, audio, gt, {})
    write_clip(tmp_path, "c", frames, audio, None, {}, write_video=False)
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == ["c.frames.npy", "c.json", "c.wav"]
    assert load_clip(tmp_path, "c").gt is None


def test_write_clip_validates(tmp_path):
    frames, audio, gt = _clip(4)
    with pytest.raises(ValueError, match="clip_id 'a/b' is invalid"):
        write_clip(tmp_path, "a/b", frames, audio, gt, {})
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        write_clip(tmp_path, "c", frames.astype(np.float32), audio, gt, {})
    gt["yaw"] = gt["yaw"][:3]
    with pytest.raises(ValueError, match="expected length 4"):
        write_clip(tmp_path, "c", frames, audio, gt, {})
    with pytest.raises(ValueError, match="n_frames.*contradicts"):
        write_clip(tmp_path, "c", frames, audio, None, {"n_frames": 5})


def test_incomplete_clip_and_cleanup(tmp_path):
    frames, audio, gt = _clip(4)
    write_clip(tmp_path, "done", frames, audio, gt, {})
    clips = tmp_path / "clips"
    # A writer that died after two files and in the middle of a third:
    (clips / "dead.frames.npy").write_bytes(b"x")
    (clips / "dead.wav").write_bytes(b"x")
    (clips / "dead.mp4.partial").write_bytes(b"x")
    (clips / "dead.gt.csv.abc123.partial").write_bytes(b"x")
    assert not clip_done(tmp_path, "dead")
    assert list_clips(tmp_path) == ["done"]
    with pytest.raises(FileNotFoundError, match="clip 'dead' .* missing or incomplete"):
        load_clip(tmp_path, "dead")
    removed = sorted(p.name for p in cleanup_partial(tmp_path))
    assert removed == ["dead.frames.npy", "dead.gt.csv.abc123.partial", "dead.mp4.partial", "dead.wav"]
    assert sorted(p.name for p in clips.iterdir()) == [
        "done.frames.npy", "done.gt.csv", "done.json", "done.mp4", "done.wav"]
    # A json whose files were deleted afterwards does not count as done.
    (clips / "done.wav").unlink()
    assert not clip_done(tmp_path, "done") and list_clips(tmp_path) == []


def test_splits(tmp_path):
    frames, audio, _ = _clip(2)
    for cid, split in [("a", "train"), ("b", "val"), ("c", "train")]:
        write_clip(tmp_path, cid, frames, audio, None, {"split": split}, write_video=False)
    assert list_clips(tmp_path) == ["a", "b", "c"]
    assert list_clips(tmp_path, "train") == ["a", "c"]  # from the clips' json without splits.json
    write_splits(tmp_path, {"train": ["c"], "val": ["a"], "test": ["b"]})
    assert list_clips(tmp_path, "test") == ["b"] and list_clips(tmp_path, "train") == ["c"]
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*known splits: \['test', 'train', 'val'\]"):
        list_clips(tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_clips(tmp_path / "nowhere")
