"""Golden tests of the numpy reference ops of the paged KV cache (runtime/kv_reference.py)."""
import numpy as np
import pytest
import torch

from eartalk.runtime import kv_reference as kr

i32 = lambda *xs: np.array(xs, dtype=np.int32)  # noqa: E731


def coded_pool(num_pages=5, L=1, H=1, P=2, D=1, dtype=np.float32, codes=(1000, 100, 10)):
    """Each element encodes its own address: codes[0]*page + codes[1]*layer + codes[2]*head +
    token (+0.5 for V) (+ d/4 for the channel), so a wrong copy shows up as a wrong number."""
    pg, l, kv, h, t, d = np.meshgrid(*[np.arange(n) for n in (num_pages, L, 2, H, P, D)], indexing="ij")
    value = codes[0] * pg + codes[1] * l + codes[2] * h + t + 0.5 * kv + 0.25 * d
    assert np.array_equal(value.astype(dtype), value), "codes not exact in this dtype"
    return value.astype(dtype)


# ---------------------------------------------------------------- append

def test_append_writes_exactly_the_given_pages():
    pool = kr.make_pool(4, 2, 3, 2, 5)
    rng = np.random.default_rng(0)
    new_k = rng.standard_normal((2, 2, 3, 2, 5)).astype(np.float32)
    new_v = rng.standard_normal((2, 2, 3, 2, 5)).astype(np.float32)
    kr.append(pool, i32(3, 0), new_k, new_v)
    np.testing.assert_array_equal(pool[3, :, 0], new_k[:, 0])
    np.testing.assert_array_equal(pool[3, :, 1], new_v[:, 0])
    np.testing.assert_array_equal(pool[0, :, 0], new_k[:, 1])
    np.testing.assert_array_equal(pool[0, :, 1], new_v[:, 1])
    assert not pool[1].any() and not pool[2].any()  # untouched pages stay zero


def test_append_float16_is_an_exact_copy():
    pool = kr.make_pool(2, 1, 1, 3, 2, dtype=np.float16)
    new_k = np.array([[[[[1.5, -2.0], [65504, 1e-4], [0.1, 3]]]]], dtype=np.float16)
    kr.append(pool, i32(1), new_k, -new_k)
    assert pool[1, 0, 0].tobytes() == new_k[0, 0].tobytes()
    assert pool[1, 0, 1].tobytes() == (-new_k)[0, 0].tobytes()


@pytest.mark.parametrize("pages, k_dtype, k_shape, match", [
    (i32(4), np.float32, (1, 1, 1, 2, 1), r"pages must be page ids in \[0, 4\)"),
    (i32(-1), np.float32, (1, 1, 1, 2, 1), "pages must be page ids"),
    (i32(1, 1), np.float32, (1, 2, 1, 2, 1), "pages must be distinct"),
    (i32(1), np.float16, (1, 1, 1, 2, 1), "new_k dtype float16 does not match pool dtype float32"),
    (i32(1), np.float32, (1, 1, 1, 3, 1), r"new_k must have shape \[L, B, H, P, D\]"),
    (np.array([1], dtype=np.int64), np.float32, (1, 1, 1, 2, 1), "pages must be an int32"),
])
def test_append_rejects_bad_input(pages, k_dtype, k_shape, match):
    pool = kr.make_pool(4, 1, 1, 2, 1)
    with pytest.raises((ValueError, TypeError), match=match):
        kr.append(pool, pages, np.zeros(k_shape, k_dtype), np.zeros((1, len(pages), 1, 2, 1), np.float32))
    assert not pool.any()


# ---------------------------------------------------------------- gather

def test_gather_golden_small():
    # session 0: sink page 4 with 1 valid token, window pages 2 (lag 2) and 0 (lag 1)
    # session 1: one window page 3 (lag 1); session 2: no pages at all.
    pool = coded_pool(num_pages=5, P=2)
    past_k, past_v, past_lag = kr.gather(
        pool, i32(0, 3, 4, 4), i32(4, 2, 0, 3), i32(-1, 2, 1, 1), i32(1, 2, 2, 2), n_slots=4)
    assert past_k.shape == past_v.shape == (1, 3, 1, 8, 1) and past_lag.shape == (3, 8)
    assert past_k.dtype == np.float32 and past_lag.dtype == np.int32
    np.testing.assert_array_equal(past_lag, [
        [-1, -2, 2, 2, 1, 1, -2, -2],
        [1, 1, -2, -2, -2, -2, -2, -2],
        [-2, -2, -2, -2, -2, -2, -2, -2]])
    np.testing.assert_array_equal(past_k[0, :, 0, :, 0], [
        [4000, 0, 2000, 2001, 0, 1, 0, 0],
        [3000, 3001, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(past_v[0, :, 0, :, 0], [
        [4000.5, 0, 2000.5, 2001.5, 0.5, 1.5, 0, 0],
        [3000.5, 3001.5, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gather_golden_multi_layer_head_channel(dtype):
    # small codes (max 227.75) so float16 holds every one exactly
    pool = coded_pool(num_pages=3, L=2, H=2, P=3, D=2, dtype=dtype, codes=(100, 20, 5))
    # single session: sink page 1 (3 valid), window page 2 (lag 1); 3 slots -> S = 9
    past_k, past_v, past_lag = kr.gather(pool, i32(0, 2), i32(1, 2), i32(-1, 1), i32(3, 3), n_slots=3)
    assert past_k.dtype == dtype
    np.testing.assert_array_equal(past_lag, [[-1, -1, -1, 1, 1, 1, -2, -2, -2]])
    for l in range(2):
        for h in range(2):
            for d in range(2):
                base = 20 * l + 5 * h + 0.25 * d
                np.testing.assert_array_equal(
                    past_k[l, 0, h, :, d],
                    np.array([100, 101, 102, 200, 201, 202, -base, -base, -base]) + base)
                np.testing.assert_array_equal(
                    past_v[l, 0, h, :, d],
                    np.array([100.5, 101.5, 102.5, 200.5, 201.5, 202.5] + [-base] * 3) + base)


def test_gather_zero_valid_page_leaves_its_slots_empty():
    pool = coded_pool(num_pages=2, P=2)
    past_k, _, past_lag = kr.gather(pool, i32(0, 2), i32(0, 1), i32(-1, 1), i32(0, 2), n_slots=2)
    np.testing.assert_array_equal(past_lag, [[-2, -2, 1, 1]])
    np.testing.assert_array_equal(past_k[0, 0, 0, :, 0], [0, 0, 1000, 1001])


@pytest.mark.parametrize("args, match", [
    ((i32(0, 3), i32(0, 1, 2), i32(-1, 1, 1), i32(2, 2, 2), 2), "session 0 has 3 pages but n_slots=2"),
    ((i32(0, 2, 1), i32(0, 1), i32(-1, 1), i32(2, 2), 4), "kv_indptr must start at 0, be non-decreasing"),
    ((i32(1, 2), i32(0, 1), i32(-1, 1), i32(2, 2), 4), "kv_indptr must start at 0"),
    ((i32(0, 2), i32(0, 5), i32(-1, 1), i32(2, 2), 4), r"kv_indices must be page ids in \[0, 5\)"),
    ((i32(0, 2), i32(0, 1), i32(-1, 1), i32(2, 3), 4), r"page_valid must be in \[0, P=2\]"),
    ((i32(0, 2), i32(0, 1), i32(-2, 1), i32(2, 2), 4), "page_lag must be -1"),
    ((i32(0, 2), i32(0, 1), i32(-1), i32(2, 2), 4), "page_lag must have one entry per kv_indices"),
    ((i32(0, 2), np.array([0, 1]), i32(-1, 1), i32(2, 2), 4), "kv_indices must be an int32"),
    ((i32(0, 2), i32(0, 1), i32(-1, 1), i32(2, 2), -1), "n_slots must be an int >= 0"),
])
def test_gather_rejects_bad_tables(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kr.gather(coded_pool(num_pages=5, P=2), *args)


def test_pool_must_have_the_contract_layout():
    with pytest.raises(ValueError, match=r"pool must have shape \[num_pages, L, 2, H, P, D\]"):
        kr.gather(np.zeros((2, 1, 3, 1, 2, 1), np.float32), i32(0), i32(), i32(), i32(), 1)
    with pytest.raises(TypeError, match="pool dtype must be float32 or float16, got float64"):
        kr.gather(np.zeros((2, 1, 2, 1, 2, 1)), i32(0), i32(), i32(), i32(), 1)


# ---------------------------------------------------------------- paged attention

def dense_reference(q, past_k, past_v, past_lag, layer, lag_bias, scale):
    """Independent path: torch float64 softmax over the gathered dense cache, empties masked."""
    window = lag_bias.shape[1] - 2
    qt = torch.from_numpy(q.astype(np.float64))
    k = torch.from_numpy(past_k[layer].astype(np.float64))                # [B, H, S, D]
    v = torch.from_numpy(past_v[layer].astype(np.float64))
    lag = torch.from_numpy(past_lag.astype(np.int64))                     # [B, S]
    col = torch.where(lag == -1, torch.full_like(lag, window + 1), lag.clamp(min=0))
    bias = torch.from_numpy(lag_bias.astype(np.float64))[:, col].permute(1, 0, 2)  # [B, H, S]
    bias = bias.masked_fill((lag == -2)[:, None, :], float("-inf"))
    s = scale * qt @ k.transpose(-1, -2) + bias[:, :, None, :]
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                          # all-masked row -> 0
    return (p @ v).numpy(), lse.numpy()


def random_case(seed, dtype=np.float32, L=2, H=3, P=4, D=8, W=3):
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((10, L, 2, H, P, D)).astype(dtype)
    # session 0: 2 sinks (3 and 4 valid) + full window; session 1: sink + 1 page;
    # session 2: nothing; session 3: one sink with 0 valid tokens (no valid token at all).
    table = dict(
        kv_indptr=i32(0, 5, 7, 7, 8), kv_indices=i32(9, 0, 5, 2, 7, 1, 3, 4),
        page_lag=i32(-1, -1, 3, 2, 1, -1, 1, -1), page_valid=i32(3, 4, 4, 4, 4, 2, 4, 0))
    q = rng.standard_normal((4, H, 5, D)).astype(dtype)
    lag_bias = rng.standard_normal((H, W + 2)).astype(np.float32)
    return pool, table, q, lag_bias


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layer", [0, 1])
def test_paged_attention_equals_dense_softmax_over_gathered_cache(dtype, layer):
    pool, t, q, lag_bias = random_case(seed=layer, dtype=dtype)
    scale = 8 ** -0.5
    out, lse = kr.paged_attention(q, pool, layer, **t, lag_bias=lag_bias, scale=scale)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    assert out.shape == (4, 3, 5, 8) and lse.shape == (4, 3, 5)
    past_k, past_v, past_lag = kr.gather(pool, **t, n_slots=5)
    ref_out, ref_lse = dense_reference(q, past_k, past_v, past_lag, layer, lag_bias, scale)
    np.testing.assert_allclose(out, ref_out, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(lse[:2], ref_lse[:2], atol=1e-6, rtol=1e-6)
    # sessions 2 and 3 have no valid token: exactly zero output, lse -inf
    assert np.all(out[2:] == 0) and np.all(lse[2:] == -np.inf)


def test_paged_attention_bias_columns_are_lag_then_sink():
    # One key per page, q = 0: scores are the bias alone, so softmax weights reveal the columns.
    pool = np.zeros((3, 1, 2, 1, 1, 1), np.float32)
    pool[:, 0, 1, 0, 0, 0] = [10.0, 20.0, 30.0]              # V of pages 0, 1, 2
    lag_bias = np.array([[0.0, np.log(2.0), 0.0, np.log(5.0)]], np.float32)  # W = 2; sink col 3
    out, lse = kr.paged_attention(np.zeros((1, 1, 1, 1), np.float32), pool, 0, i32(0, 3),
                                  i32(0, 1, 2), i32(-1, 2, 1), i32(1, 1, 1), lag_bias, 1.0)
    # weights: sink 5, lag 2 -> 1, lag 1 -> 2  (sum 8)
    np.testing.assert_allclose(out[0, 0, 0, 0], (5 * 10 + 1 * 20 + 2 * 30) / 8, rtol=1e-6)
    np.testing.assert_allclose(lse[0, 0, 0], np.log(8.0), rtol=1e-6)


def test_paged_attention_rejects_lag_without_bias_column():
    pool, t, q, lag_bias = random_case(0)
    t["page_lag"] = i32(-1, -1, 4, 2, 1, -1, 1, -1)  # W = 3, lag 4 has no column
    with pytest.raises(ValueError, match=r"page_lag\[2\]=4 has no lag_bias column: expected -1 \(sink\) or 0..W=3"):
        kr.paged_attention(q, pool, 0, **t, lag_bias=lag_bias, scale=1.0)


@pytest.mark.parametrize("change, match", [
    (dict(layer=2), r"layer must be an int in \[0, L=2\)"),
    (dict(q=np.zeros((4, 2, 5, 8), np.float32)), r"q must have shape \[B=4, H=3, Q, D=8\]"),
    (dict(lag_bias=np.zeros((3, 5))), r"lag_bias must be float32 \[H=3, W\+2\]"),
    (dict(scale=float("nan")), "scale must be finite"),
])
def test_paged_attention_rejects_bad_input(change, match):
    pool, t, q, lag_bias = random_case(0)
    args = dict(q=q, pool=pool, layer=0, lag_bias=lag_bias, scale=1.0, **t) | change
    with pytest.raises(ValueError, match=match):
        kr.paged_attention(**args)


# ---------------------------------------------------------------- merge states

def test_merge_of_two_halves_equals_attention_over_the_union():
    pool, t, q, lag_bias = random_case(3)
    q, scale = q[:1], 0.3
    full = kr.paged_attention(q, pool, 1, i32(0, 5), t["kv_indices"][:5], t["page_lag"][:5],
                              t["page_valid"][:5], lag_bias, scale)
    sinks = kr.paged_attention(q, pool, 1, i32(0, 2), t["kv_indices"][:2], t["page_lag"][:2],
                               t["page_valid"][:2], lag_bias, scale)
    window = kr.paged_attention(q, pool, 1, i32(0, 3), t["kv_indices"][2:5], t["page_lag"][2:5],
                                t["page_valid"][2:5], lag_bias, scale)
    out, lse = kr.merge_states(*sinks, *window)
    np.testing.assert_allclose(out, full[0], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(lse, full[1], atol=1e-6, rtol=1e-6)
    # merging is symmetric
    out2, lse2 = kr.merge_states(*window, *sinks)
    np.testing.assert_allclose(out2, out, atol=1e-7)
    np.testing.assert_allclose(lse2, lse, atol=1e-7)


def test_merge_with_an_empty_side_is_exactly_the_other_side():
    rng = np.random.default_rng(1)
    out_a = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    lse_a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    empty_out, empty_lse = np.zeros_like(out_a), np.full_like(lse_a, -np.inf)
    out, lse = kr.merge_states(out_a, lse_a, empty_out, empty_lse)
    assert np.array_equal(out, out_a) and np.array_equal(lse, lse_a)
    out, lse = kr.merge_states(empty_out, empty_lse, out_a, lse_a)
    assert np.array_equal(out, out_a) and np.array_equal(lse, lse_a)
    with np.errstate(all="raise"):  # both empty: zeros and -inf, no NaN, no warning
        out, lse = kr.merge_states(empty_out, empty_lse, empty_out, empty_lse)
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_merge_rejects_bad_input():
    o, l = np.zeros((2, 3), np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="lse_b must be finite or -inf"):
        kr.merge_states(o, l, o, np.array([0, np.nan], np.float32))
    with pytest.raises(ValueError, match=r"expected out_a, out_b of one shape \[..., D\]"):
        kr.merge_states(o, l, np.zeros((2, 4), np.float32), l)
    with pytest.raises(TypeError, match="lse_a must be a float32/float16"):
        kr.merge_states(o, l.astype(np.float64), o, l)
