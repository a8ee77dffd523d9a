"""runtime/kv_cache.py host path (numpy block copies on a CPU pool): equal to the torch path and
the numpy reference bit for bit, also when one ``out=`` buffer is reused across calls (stale
contents must be fully overwritten, empty slots exact +0.0 and lag -2)."""
import numpy as np
import pytest
import torch

from eartalk.model.config import preset
from eartalk.runtime import kv_reference as kr
from eartalk.runtime.kv_cache import KVCache
from eartalk.runtime.page_table import PageTable

CFG = preset("test", sink_frames=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_host_gather_reused_out_equals_torch_path_and_reference(dtype):
    rng = np.random.default_rng(0)
    host = KVCache(40, CFG, dtype=dtype)
    assert host._pool_np is not None and "host path" in host.kernel_path
    slow = KVCache(40, CFG, dtype=dtype)
    slow._pool_np = None                                   # force the torch path
    host.pool.copy_(torch.randn(host.pool.shape, generator=torch.Generator().manual_seed(0)).to(dtype))
    slow.pool.copy_(host.pool)
    n_slots = CFG.sink_frames + CFG.window
    out = None
    for _ in range(6):
        B = 3
        counts = rng.integers(0, n_slots + 1, size=B)
        ids = rng.permutation(40)[: counts.sum()].astype(np.int32)
        table = PageTable(kv_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), kv_indices=ids,
                          page_lag=rng.integers(-1, CFG.window + 1, ids.size).astype(np.int32),
                          page_valid=rng.integers(0, CFG.page_tokens + 1, ids.size).astype(np.int32))
        if out is None:
            out = host.empty_dense(B)
            for t in out:
                t.fill_(7)                                  # garbage that must not survive
        got = host.gather(table, out=out)
        assert all(g is o for g, o in zip(got, out))
        want = slow.gather(table)
        ref = kr.gather(host.pool.numpy(), **table.as_kwargs(), n_slots=n_slots)
        for g, w, r in zip(got, want, ref):
            assert np.array_equal(g.numpy(), w.numpy()) and np.array_equal(g.numpy(), r)
            assert np.array_equal(np.signbit(g.numpy()), np.signbit(r))


def test_host_gather_refuses_bad_out_and_page_ids():
    cache = KVCache(4, CFG)
    table = PageTable(kv_indptr=np.array([0, 1], np.int32), kv_indices=np.array([9], np.int32),
                      page_lag=np.array([-1], np.int32), page_valid=np.array([CFG.page_tokens], np.int32))
    with pytest.raises(ValueError, match="page ids must be in"):
        cache.gather(table)
    with pytest.raises(ValueError, match="out past_k must be"):
        cache.gather(table, out=cache.empty_dense(2))
