"""Tests of the page allocator (runtime/page_pool.py)."""
import pytest

from eartalk.runtime.page_pool import PagePool, PoolFullError


def test_fresh_pool_hands_out_pages_in_order_and_counts():
    pool = PagePool(4)
    assert (pool.num_free, pool.num_used) == (4, 0)
    assert [pool.alloc() for _ in range(3)] == [0, 1, 2]
    assert (pool.num_free, pool.num_used) == (1, 3)
    assert [pool.is_allocated(p) for p in range(4)] == [True, True, True, False]


def test_free_page_is_reused_first():
    pool = PagePool(4)
    pool.alloc_many(3)
    pool.free(1)
    assert not pool.is_allocated(1)
    assert pool.alloc() == 1  # LIFO: the page just freed
    assert pool.alloc() == 3


def test_full_pool_refuses_with_a_clear_error_and_never_reuses_a_live_page():
    pool = PagePool(2)
    live = {pool.alloc(), pool.alloc()}
    with pytest.raises(PoolFullError, match=r"2/2 pages in use, 1 requested.*close idle sessions or raise num_pages"):
        pool.alloc()
    assert isinstance(PoolFullError("x"), RuntimeError)
    assert live == {0, 1} and (pool.num_free, pool.num_used) == (0, 2)


def test_alloc_many_is_all_or_nothing():
    pool = PagePool(5)
    pool.alloc_many(2)
    with pytest.raises(PoolFullError, match=r"2/5 pages in use, 4 requested, 3 free"):
        pool.alloc_many(4)
    assert (pool.num_free, pool.num_used) == (3, 2)
    assert pool.alloc_many(3) == [2, 3, 4]
    assert pool.alloc_many(0) == []


def test_double_free_and_bad_ids_raise():
    pool = PagePool(3)
    p = pool.alloc()
    pool.free(p)
    with pytest.raises(ValueError, match="page 0 is not allocated"):
        pool.free(p)
    with pytest.raises(ValueError, match="page 2 is not allocated"):
        pool.free(2)
    with pytest.raises(ValueError, match=r"page must be an int in \[0, 3\), got 3"):
        pool.free(3)
    with pytest.raises(ValueError, match=r"page must be an int in \[0, 3\), got -1"):
        pool.is_allocated(-1)
    assert (pool.num_free, pool.num_used) == (3, 0)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_constructor_and_alloc_many_reject_bad_counts(bad):
    with pytest.raises(ValueError, match="num_pages must be a positive int"):
        PagePool(bad)
    if bad != 0:
        with pytest.raises(ValueError, match="n must be an int >= 0"):
            PagePool(2).alloc_many(bad)
