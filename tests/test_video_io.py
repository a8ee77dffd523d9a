"""mp4 writing (streamed, atomic, deterministic) and decoding with fps resampling."""
import os

import numpy as np
import pytest

from eartalk.data.video_io import Mp4Writer, read_video, video_size, write_mp4


def _frames(n=10, h=32, w=32):
    """Smooth, slowly moving gradients: realistic for H.264, so the round-trip error is small."""
    y, x = np.mgrid[0:h, 0:w]
    return [np.stack([x * 128 // w + 3 * i, y * 128 // h, np.full_like(x, 100)], -1).astype(np.uint8)
            for i in range(n)]


def _sine(seconds, freq=440.0):
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_round_trip(tmp_path):
    fr, au = _frames(), _sine(0.4)
    p = tmp_path / "a.mp4"
    write_mp4(p, iter(fr), au)  # a generator: frames are consumed lazily
    frames, audio = read_video(p, size=32)
    assert frames.shape == (10, 32, 32, 3) and frames.dtype == np.uint8
    assert abs(len(audio) - len(au)) <= 640  # within one video frame of audio
    assert np.mean(np.abs(frames.astype(int) - np.stack(fr))) < 3.0
    assert np.corrcoef(audio[: len(au)], au[: len(audio)])[0, 1] > 0.99
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.mp4"]  # no .partial left


def test_fps_resampling_by_timestamp(tmp_path):
    # Each frame's red channel encodes its index, so we can see which source frame was picked.
    fr = [np.full((16, 16, 3), 20 * i, np.uint8) for i in range(10)]
    p = tmp_path / "a.mp4"
    write_mp4(p, fr, _sine(0.4), crf=0)
    up, _ = read_video(p, fps=50)
    assert len(up) == 20
    idx = np.round(up[:, 8, 8, 0] / 20).astype(int)
    assert idx.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    down, _ = read_video(p, fps=10)
    idx = np.round(down[:, 8, 8, 0] / 20).astype(int)
    assert idx.tolist() == [0, 2, 5, 7]  # t = 0, .1, .2, .3 s -> nearest of frames at k * 0.04 s


def test_streaming_writer(tmp_path):
    p = tmp_path / "s.mp4"
    fr = _frames(12)
    with Mp4Writer(p, fps=25, size=32, audio_rate=16000) as w:
        for f in fr:
            w.write(f)
            w.write_audio((_sine(0.04) * 32767).astype(np.int16))  # int16 chunks accepted
        assert not p.exists() and (tmp_path / f"s.mp4.{os.getpid()}.partial").exists()
    frames, audio = read_video(p)
    assert frames.shape == (12, 32, 32, 3)
    assert abs(len(audio) - 12 * 640) <= 640


def test_interrupted_write_leaves_nothing(tmp_path):
    p = tmp_path / "x.mp4"

    def gen():
        yield from _frames(3)
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_mp4(p, gen(), _sine(0.2))
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(tmp_path / "o.mp4", size=(31, 32))
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(tmp_path / "o.mp4", [])
    with Mp4Writer(tmp_path / "o.mp4", size=(16, 32), audio_rate=None) as w:
        with pytest.raises(ValueError, match=r"expected uint8 \(16, 32, 3\)"):
            w.write(np.zeros((32, 16, 3), np.uint8))
        with pytest.raises(ValueError, match="audio_rate=None"):
            w.write_audio(np.zeros(10, np.float32))
        w.write(np.zeros((16, 32, 3), np.uint8))
    assert video_size(tmp_path / "o.mp4") == (16, 32)


def test_video_without_audio_names_the_file(tmp_path):
    p = tmp_path / "silent.mp4"
    write_mp4(p, _frames(3))
    with pytest.raises(ValueError, match="silent.mp4 has no audio track"):
        read_video(p)


def test_truncated_and_garbage_files_name_the_file(tmp_path):
    p = tmp_path / "a.mp4"
    write_mp4(p, _frames(), _sine(0.4))
    data = p.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot decode video file .*cut.mp4"):
        read_video(tmp_path / "cut.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 64)
    with pytest.raises(ValueError, match="cannot decode video file .*junk.mp4"):
        read_video(tmp_path / "junk.mp4")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")


def test_wrong_size(tmp_path):
    p = tmp_path / "big.mp4"
    write_mp4(p, _frames(4, 32, 48), _sine(0.16))
    with pytest.raises(ValueError, match="big.mp4 has frames of height x width 32x48; expected 32x32"):
        read_video(p, size=32)
    frames, _ = read_video(p, size=(16, 24), resize=True)
    assert frames.shape == (4, 16, 24, 3)
