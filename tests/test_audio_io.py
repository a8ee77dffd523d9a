"""Audio decoding, resampling, live PCM validation and atomic wav writing."""
import os

import numpy as np
import pytest
import soundfile as sf

from eartalk.data.audio_io import as_pcm, load_audio, resample, write_wav


def _sine(freq, rate, seconds, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spec)]


def test_wav_round_trip_is_exact_to_pcm16(tmp_path):
    x = _sine(440, 16000, 0.25)
    p = tmp_path / "a.wav"
    write_wav(p, x)
    y = load_audio(p)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.max(np.abs(y - x)) <= 1 / 32768 + 1e-7
    assert sf.info(str(p)).subtype == "PCM_16"
    assert [f for f in os.listdir(tmp_path)] == ["a.wav"]  # no temp file left behind


def test_write_wav_clips_instead_of_wrapping(tmp_path):
    p = tmp_path / "loud.wav"
    write_wav(p, np.array([1.5, -1.5, 0.0], np.float32))
    y = load_audio(p)
    assert y[0] > 0.999 and y[1] < -0.999 and y[2] == 0.0


def test_resample_22050_to_16000_keeps_length_and_frequency(tmp_path):
    x = _sine(1000, 22050, 1.0)
    p = tmp_path / "b.wav"
    sf.write(str(p), x, 22050, subtype="FLOAT")
    y = load_audio(p, 16000)
    assert y.shape == (16000,)
    assert abs(_peak_hz(y, 16000) - 1000) <= 1.0


def test_stereo_is_averaged_to_mono(tmp_path):
    left = _sine(300, 16000, 0.1)
    p = tmp_path / "s.flac"
    sf.write(str(p), np.stack([left, np.zeros_like(left)], axis=1), 16000)
    y = load_audio(p)
    np.testing.assert_allclose(y, left / 2, atol=2 / 32768)


def test_resample_identity_and_bad_rate():
    x = _sine(100, 16000, 0.01)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    with pytest.raises(ValueError, match="cannot decode audio file .*bad.wav"):
        load_audio(bad)
    bad_mp3 = tmp_path / "bad.mp3"
    bad_mp3.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot decode audio file .*bad.mp3"):
        load_audio(bad_mp3)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="empty.wav contains no audio"):
        load_audio(empty)


def test_load_audio_from_mp4_track(tmp_path):
    from eartalk.data.video_io import write_mp4
    x = _sine(500, 16000, 0.4)
    p = tmp_path / "v.mp4"
    write_mp4(p, [np.zeros((16, 16, 3), np.uint8)] * 10, x)
    y = load_audio(p)
    assert y.shape == x.shape  # AAC padding trimmed to the recorded duration
    assert abs(_peak_hz(y, 16000) - 500) <= 2.5


def test_as_pcm_int16_scaling():
    x = np.array([0, 16384, -32768, 32767], np.int16)
    y = as_pcm(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [0.0, 0.5, -1.0, 32767 / 32768])


def test_as_pcm_accepts_float32_and_column_vector():
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    assert as_pcm(x) is x
    np.testing.assert_array_equal(as_pcm(x[:, None]), x)
    assert as_pcm(np.zeros(0, np.float32)).shape == (0,)


@pytest.mark.parametrize("x, kw, msg", [
    (np.zeros(10, np.float32), dict(sample_rate=44100), "44100 Hz; expected 16000 Hz"),
    (np.zeros(10, np.float64), {}, "dtype is float64; expected float32"),
    (np.zeros(10, np.int32), {}, "dtype is int32"),
    (np.zeros((10, 2), np.float32), {}, r"shape \(10, 2\)"),
    (np.zeros((2, 3, 4), np.float32), {}, r"shape \(2, 3, 4\)"),
    (np.zeros((), np.float32), {}, r"shape \(\)"),
    (np.array([0.0, np.nan], np.float32), {}, "1 NaN/inf samples"),
    (np.array([np.inf, -np.inf, 0], np.float32), {}, "2 NaN/inf samples"),
    (np.array([0.0, 1000.0], np.float32), {}, "peak is 1000"),
    ([0.0, 0.1], {}, "numpy array"),
])
def test_as_pcm_rejects(x, kw, msg):
    with pytest.raises(ValueError, match=msg):
        as_pcm(x, **kw)
