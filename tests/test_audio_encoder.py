"""Audio front end: causal log-mel, encoder alignment, chunk-invariant streaming, ONNX step."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eartalk.model.audio import (N_FFT, SILENCE_LOG_MEL, WIN_LENGTH, AudioEncoder,
                                 AudioEncoderStep, LogMel, StreamingAudioFrontend)
from eartalk.model.config import preset

SPF = 640


@pytest.fixture(scope="module")
def cfg():
    return preset("test")


@pytest.fixture(scope="module")
def enc(cfg):
    torch.manual_seed(0)
    return AudioEncoder(cfg).eval()


def speech_like(n, seed=0):
    """Noise bursts and a gliding tone with silent gaps: varied, deterministic test audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    env = (np.sin(2 * np.pi * 3 * t) > -0.3).astype(np.float32)
    tone = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    return (env * (tone + 0.05 * rng.standard_normal(n))).astype(np.float32)


AUDIO = speech_like(14000)  # 21.875 frames: exercises a partial last frame


def offline(cfg, enc, audio):
    """Reference path: pad with silence to the end of the last frame's lookahead, then run offline."""
    want = -(-audio.size // SPF)
    pad = (want + cfg.lookahead_frames) * SPF - audio.size
    x = torch.from_numpy(np.concatenate([audio, np.zeros(pad, np.float32)]))
    with torch.no_grad():
        return enc(LogMel(cfg)(x))[0].numpy()


# ------------------------------------------------------------------------------------ LogMel
def test_logmel_matches_numpy_stft_and_is_causal(cfg):
    lm = LogMel(cfg)
    a = speech_like(3210, seed=1)
    mel = lm(torch.from_numpy(a))[0].numpy()
    assert mel.shape == (3210 // 160, cfg.n_mels)
    # independent numpy reference: frame k = samples [160k - 240, 160k + 160), Hann, rfft 512
    padded = np.concatenate([np.zeros(WIN_LENGTH - 160), a]).astype(np.float64)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN_LENGTH) / WIN_LENGTH)
    frames = np.stack([padded[k * 160:k * 160 + WIN_LENGTH] * win for k in range(mel.shape[0])])
    power = np.abs(np.fft.rfft(frames, n=N_FFT)) ** 2
    ref = np.log(power @ lm.fb.numpy() + 1e-6)
    np.testing.assert_allclose(mel, ref, atol=1e-4)
    # causality: frame k only depends on samples < (k+1)*160
    k = 7
    b = a.copy()
    b[(k + 1) * 160:] = np.random.default_rng(2).standard_normal(b.size - (k + 1) * 160)
    mel_b = lm(torch.from_numpy(b))[0].numpy()
    assert np.array_equal(mel[:k + 1], mel_b[:k + 1])
    assert not np.allclose(mel[k + 1], mel_b[k + 1])


def test_logmel_tone_peaks_at_its_frequency_and_silence_constant(cfg):
    lm = LogMel(cfg)
    t = np.arange(4000) / 16000
    mel = lm(torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32)))[0]
    centres = (lm.fb.numpy() * np.arange(lm.fb.shape[0])[:, None]).sum(0) / lm.fb.numpy().sum(0)
    peak = int(mel[10].argmax())
    assert abs(centres[peak] * 16000 / N_FFT - 1000) < 60
    silence = lm(torch.zeros(1600))[0]
    assert torch.all(silence == SILENCE_LOG_MEL)
    assert all(lm.fb.numpy().sum(0) > 0)                 # no empty (constant) mel channel


# ------------------------------------------------------------------------------- AudioEncoder
def test_encoder_alignment_and_receptive_field(cfg, enc):
    L, mpf, R = cfg.lookahead_frames, cfg.mels_per_frame, enc.receptive_field
    M = 120
    mel = LogMel(cfg)(torch.from_numpy(speech_like(M * 160)))
    with torch.no_grad():
        out = enc(mel)
    assert out.shape == (1, M // mpf - L, cfg.audio_tokens, cfg.audio_dim)
    t = 20
    last = (t + 1 + L) * mpf - 1                          # last mel frame frame t may see
    first = last - R + 1                                  # first one
    for k, should_change in [(last + 1, False), (last, True), (first, True), (first - 1, False)]:
        m2 = mel.clone()
        m2[0, k] += 3.0
        with torch.no_grad():
            changed = not torch.allclose(enc(m2)[0, t], out[0, t], atol=1e-6)
        assert changed == should_change, (k, first, last)


def test_step_equals_forward_including_start_of_stream(cfg, enc):
    L, mpf, R = cfg.lookahead_frames, cfg.mels_per_frame, enc.receptive_field
    mel = LogMel(cfg)(torch.from_numpy(speech_like(100 * 160)))
    pad = torch.full((1, R, cfg.n_mels), SILENCE_LOG_MEL)
    padded = torch.cat([pad, mel], 1)                     # index i + R <-> mel frame i
    with torch.no_grad():
        full = enc(mel)[0]
        for t in (0, 1, 5, full.shape[0] - 1):            # t = 0, 1 windows start before sample 0
            end = (t + 1 + L) * mpf + R
            step = enc.step(padded[:, end - R:end])[0]
            torch.testing.assert_close(step, full[t], atol=1e-5, rtol=0)


def test_encoder_rejects_bad_shapes(cfg, enc):
    with pytest.raises(ValueError, match="mel window"):
        enc.step(torch.zeros(1, enc.receptive_field - 1, cfg.n_mels))
    with pytest.raises(ValueError, match="mel"):
        enc(torch.zeros(1, 40, cfg.n_mels + 1))
    assert enc(torch.zeros(2, 8, cfg.n_mels)).shape == (2, 0, cfg.audio_tokens, cfg.audio_dim)


# -------------------------------------------------------------------------------- streaming
def stream(front, audio, sizes):
    out, i, k = [], 0, 0
    while i < audio.size:
        n = sizes[k % len(sizes)]
        out.append(front.push(audio[i:i + n]))
        i, k = i + n, k + 1
    out.append(front.flush())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def whole(cfg, enc):
    return stream(StreamingAudioFrontend(cfg, enc), AUDIO, [AUDIO.size])


def test_streaming_whole_equals_offline_and_frame_count(cfg, enc, whole):
    assert whole.shape == (-(-AUDIO.size // SPF), cfg.audio_tokens, cfg.audio_dim)
    np.testing.assert_allclose(whole, offline(cfg, enc, AUDIO), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.one_of(st.sampled_from([1, 639, 640, 641]), st.integers(1, 3000)),
                      min_size=1, max_size=8))
def test_any_chunking_is_bit_identical(cfg, enc, whole, sizes):
    front = StreamingAudioFrontend(cfg, enc)
    assert np.array_equal(stream(front, AUDIO, sizes), whole)


def test_frames_emitted_as_soon_as_lookahead_allows(cfg, enc):
    front = StreamingAudioFrontend(cfg, enc)
    L = cfg.lookahead_frames
    assert front.push(AUDIO[:(L + 1) * SPF - 1]).shape[0] == 0
    assert front.push(AUDIO[(L + 1) * SPF - 1:(L + 1) * SPF]).shape[0] == 1   # the 1 sample
    assert front.frames_available == 1
    assert front.push(AUDIO[(L + 1) * SPF:(L + 3) * SPF + 5]).shape[0] == 2
    assert front.frames_available == 3 and front.total_samples == (L + 3) * SPF + 5


def test_flush_reset_int16_and_empty(cfg, enc, whole):
    front = StreamingAudioFrontend(cfg, enc)
    assert front.flush().shape == (0, cfg.audio_tokens, cfg.audio_dim)
    front.push(AUDIO[:1000])
    front.reset()                                          # forgets the first stream entirely
    assert np.array_equal(stream(front, AUDIO, [777]), whole)
    # flush resets: a second stream on the same object gives the same tokens
    assert np.array_equal(stream(front, AUDIO, [5000]), whole)
    pcm16 = (AUDIO * 32767).round().astype(np.int16)
    got = stream(front, pcm16, [1234])
    np.testing.assert_allclose(got, whole, atol=1e-2)      # only int16 rounding differs
    assert stream(front, np.zeros(1, np.float32), [1]).shape[0] == 1   # 1 sample -> 1 frame
    with pytest.raises(ValueError, match="1-D"):
        front.push(np.zeros((2, 10), np.float32))
    with pytest.raises(TypeError):
        front.push(np.zeros(10, np.int32))


# ---------------------------------------------------------------------------------- ONNX step
def test_onnx_step_round_trip_and_streams_through_ort(cfg, enc, whole, tmp_path):
    import onnxruntime as ort
    R = enc.receptive_field
    path = tmp_path / "audio_step.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(AudioEncoderStep(enc), (torch.randn(2, R, cfg.n_mels),), str(path),
                      dynamo=True, opset_version=18, input_names=["mel_window"],
                      output_names=["audio"], dynamic_shapes=({0: batch},), verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B in (1, 3):
        w = torch.randn(B, R, cfg.n_mels) * 3 - 2
        with torch.no_grad():
            ref = enc.step(w).numpy()
        got = sess.run(None, {"mel_window": w.numpy()})[0]
        assert got.shape == (B, cfg.audio_tokens, cfg.audio_dim)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    front = StreamingAudioFrontend(cfg, lambda w: sess.run(None, {"mel_window": w})[0],
                                   receptive_field=R)
    np.testing.assert_allclose(stream(front, AUDIO, [641]), whole, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="receptive_field"):
        StreamingAudioFrontend(cfg, lambda w: w)
