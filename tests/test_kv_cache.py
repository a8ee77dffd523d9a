"""runtime/kv_cache.py: the torch pool's append/gather equal the numpy reference bit for bit."""
import numpy as np
import pytest
import torch

from eartalk.model.config import preset
from eartalk.runtime import kv_reference as kr
from eartalk.runtime.kv_cache import KVCache
from eartalk.runtime.page_pool import PagePool
from eartalk.runtime.page_table import PageTable, SessionPages, build_page_table

CFG = preset("test", sink_frames=2)          # W = 3, P = 10, L = 2, H = 2, D = 8


def _random_pool(cache: KVCache, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    cache.pool.copy_(torch.randn(cache.pool.shape, generator=g))
    cache.pool[0, 0, 0, 0, 0, 0] = -0.0                   # signed zero must survive the copy
    return cache.pool.numpy().copy()


def test_append_equals_reference_bitwise():
    cache = KVCache(12, CFG)
    ref = _random_pool(cache, 0)
    g = torch.Generator().manual_seed(1)
    shape = (CFG.n_layer, 3, CFG.n_head, CFG.page_tokens, CFG.head_dim)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    pages = np.array([7, 2, 11], np.int32)
    cache.append(pages, k, v)
    kr.append(ref, pages, k.numpy(), v.numpy())
    assert np.array_equal(cache.pool.numpy(), ref)


@pytest.mark.parametrize("seed", range(5))
def test_gather_equals_reference_bitwise_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    cache = KVCache(40, CFG)
    pool = _random_pool(cache, seed)
    n_slots = CFG.sink_frames + CFG.window
    counts = rng.integers(0, n_slots + 1, size=rng.integers(1, 5))
    ids = rng.permutation(40)[: counts.sum()].astype(np.int32)
    table = PageTable(kv_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
                      kv_indices=ids,
                      page_lag=rng.integers(-1, CFG.window + 1, ids.size).astype(np.int32),
                      page_valid=rng.integers(0, CFG.page_tokens + 1, ids.size).astype(np.int32))
    k, v, lag = cache.gather(table)
    rk, rv, rlag = kr.gather(pool, **table.as_kwargs(), n_slots=n_slots)
    assert np.array_equal(k.numpy(), rk) and np.array_equal(v.numpy(), rv)
    assert np.array_equal(np.signbit(k.numpy()), np.signbit(rk))
    assert lag.dtype == torch.int32 and np.array_equal(lag.numpy(), rlag)


def test_stream_of_appends_and_gathers_matches_reference():
    """Sessions stepping through the real page table (window eviction, page reuse)."""
    pool_meta = PagePool(3 * (CFG.sink_frames + CFG.window))
    cache = KVCache(pool_meta.num_pages, CFG)
    ref = cache.pool.numpy().copy()
    sessions = [SessionPages(pool_meta, CFG) for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        live = sessions if step < 5 else sessions[1:]
        if step == 5:
            sessions[0].close()
        table = build_page_table(live)
        k, v, lag = cache.gather(table)
        rk, rv, rlag = kr.gather(ref, **table.as_kwargs(), n_slots=CFG.sink_frames + CFG.window)
        assert np.array_equal(k.numpy(), rk) and np.array_equal(v.numpy(), rv)
        assert np.array_equal(lag.numpy(), rlag)
        shape = (CFG.n_layer, len(live), CFG.n_head, CFG.page_tokens, CFG.head_dim)
        nk, nv = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        pages = np.array([s.begin_step() for s in live], np.int32)
        cache.append(pages, nk, nv)
        kr.append(ref, pages, nk.numpy(), nv.numpy())
    assert np.array_equal(cache.pool.numpy(), ref)


def test_bad_inputs_name_the_argument():
    cache = KVCache(4, CFG)
    shape = (CFG.n_layer, 2, CFG.n_head, CFG.page_tokens, CFG.head_dim)
    with pytest.raises(ValueError, match="new_k must have shape"):
        cache.append([0], torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match="distinct"):
        cache.append([1, 1], torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match="page ids in"):
        cache.append([0, 9], torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(TypeError, match="dtype"):
        cache.append([0, 1], torch.zeros(shape, dtype=torch.float64), torch.zeros(shape))
    with pytest.raises(ValueError, match="num_pages"):
        KVCache(0, CFG)
