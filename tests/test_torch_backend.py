"""runtime/torch_backend.py: the Backend contract, batch invariance, portrait handling."""
import numpy as np
import pytest
import torch

from eartalk.model.bundle import new_bundle
from eartalk.model.config import preset
from eartalk.runtime.backend import prepare_portrait, to_uint8_frames
from eartalk.runtime.torch_backend import TorchBackend, batch_invariant_step

torch.set_num_threads(1)
CFG = preset("test")
BUNDLE = new_bundle(CFG, seed=0)


def step_inputs(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = CFG
    kv = (c.n_layer, B, c.n_head, c.cache_tokens, c.head_dim)
    return (torch.randint(0, c.codebook_size, (B, c.tokens_per_frame), generator=g),
            torch.randn(B, c.audio_tokens, c.audio_dim, generator=g),
            torch.randn(B, c.cond_tokens, c.cond_dim, generator=g),
            torch.rand(B, c.cond_tokens, generator=g) > 0.5,
            torch.randn(kv, generator=g), torch.randn(kv, generator=g),
            torch.randint(-2, c.window + 1, (B, c.cache_tokens), generator=g).int())


def test_batch_invariant_step_matches_gpt_step():
    args = step_inputs(5)
    with torch.inference_mode():
        a = batch_invariant_step(BUNDLE.gpt, *args)
        b = BUNDLE.gpt.step(*args)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_step_is_bitwise_batch_invariant():
    be = TorchBackend(BUNDLE)
    args = [a.numpy() for a in step_inputs(6, seed=1)]
    logits, k, v = be.step(*args)
    for i in (0, 3, 5):
        row = [a[i:i + 1] for a in args[:4]] + [args[4][:, i:i + 1], args[5][:, i:i + 1], args[6][i:i + 1]]
        l1, k1, v1 = be.step(*row)
        assert np.array_equal(l1[0], logits[i]) and np.array_equal(k1[:, 0], k[:, i]) and np.array_equal(v1[:, 0], v[:, i])


def test_decode_is_bitwise_batch_invariant_and_uint8():
    be = TorchBackend(BUNDLE)
    rng = np.random.default_rng(0)
    refs = np.stack([be.encode_portrait(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))[1] for _ in range(3)])
    tokens = rng.integers(0, CFG.codebook_size, (3, CFG.tokens_per_frame))
    frames = be.decode(tokens, refs)
    assert frames.dtype == np.uint8 and frames.shape == (3, 32, 32, 3)
    assert np.array_equal(be.decode(tokens[2:], refs[2:])[0], frames[2])


def test_non_invariant_mode_is_plain_gpt_step():
    be = TorchBackend(BUNDLE, batch_invariant=False)
    args = step_inputs(3, seed=2)
    logits, k, v = be.step(*[a.numpy() for a in args])
    with torch.inference_mode():
        rl, rk, rv = BUNDLE.gpt.step(*args)
    assert np.array_equal(logits, rl.numpy()) and np.array_equal(k, rk.numpy()) and np.array_equal(v, rv.numpy())


def test_graph_shapes():
    be = TorchBackend(BUNDLE)
    c = CFG
    tok, ref = be.encode_portrait(np.full((32, 32, 3), 128, np.uint8))
    assert tok.dtype == np.int64 and tok.shape == (c.tokens_per_frame,)
    k, v = be.prefill(tok[None])
    assert k.shape == v.shape == (c.n_layer, 1, c.n_head, c.page_tokens, c.head_dim)
    a = be.encode_audio(np.zeros((2, be.receptive_field, c.n_mels), np.float32))
    assert a.shape == (2, c.audio_tokens, c.audio_dim)


def test_portrait_resize_warns_and_bad_portraits_raise():
    with pytest.warns(UserWarning, match="portrait is 40x60"):
        out = prepare_portrait(np.zeros((40, 60, 3), np.uint8), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert prepare_portrait(np.zeros((32, 32, 4), np.uint8), 32).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="uint8 numpy array"):
        prepare_portrait("not an image", 32)
    with pytest.raises(ValueError, match=r"got shape \(32, 32\)"):
        prepare_portrait(np.zeros((32, 32), np.uint8), 32)
    with pytest.raises(ValueError, match="float32"):
        prepare_portrait(np.zeros((32, 32, 3), np.float32), 32)


def test_uint8_conversion_rounds_half_up_and_clips():
    x = np.array([0.0, 0.5 / 255, 1.5 / 255, 1.0, 1.2, -0.1], np.float32).reshape(1, 1, 1, 6)
    x = np.repeat(x, 3, axis=1)
    assert to_uint8_frames(x)[0, 0, :, 0].tolist() == [0, 1, 2, 255, 255, 0]


def test_cuda_request_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        TorchBackend(BUNDLE, device="cuda")
