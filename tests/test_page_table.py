"""Golden index-map tests of the sink + window page table (runtime/page_table.py).

The lesson of TensorRT-LLM's StreamingLLM path (a sink parameter silently ignored): the exact
page ids, lags and valid counts are pinned down here, after 1, W, W+1 and 1,000,000 steps.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from eartalk.model.config import preset
from eartalk.runtime import kv_reference as kr
from eartalk.runtime.page_pool import PagePool, PoolFullError
from eartalk.runtime.page_table import PageTable, SessionPages, build_page_table

CFG = preset("test", sink_frames=2)  # W = 3, P = 10
W, P = CFG.window, CFG.page_tokens
assert (W, P) == (3, 10)


def table_lists(t: PageTable):
    for a in (t.kv_indptr, t.kv_indices, t.page_lag, t.page_valid):
        assert a.dtype == np.int32
    return t.kv_indptr.tolist(), t.kv_indices.tolist(), t.page_lag.tolist(), t.page_valid.tolist()


# ---------------------------------------------------------------- golden, one session

def test_golden_after_open_1_W_and_W_plus_1_steps():
    pool = PagePool(8)
    s = SessionPages(pool, CFG, sink_valid=7)
    assert s.sink_pages == (0, 1) and s.step == 0
    assert table_lists(build_page_table([s])) == ([0, 2], [0, 1], [-1, -1], [7, 7])

    assert s.begin_step() == 2                                   # step 1
    assert table_lists(build_page_table([s])) == ([0, 3], [0, 1, 2], [-1, -1, 1], [7, 7, 10])

    assert [s.begin_step(), s.begin_step()] == [3, 4]            # steps 2, 3 = W
    assert table_lists(build_page_table([s])) == (
        [0, 5], [0, 1, 2, 3, 4], [-1, -1, 3, 2, 1], [7, 7, 10, 10, 10])
    assert pool.is_allocated(2) and pool.num_used == 5

    # Step W+1 frees step 1's page (2) first; LIFO hands that same id back for step W+1.
    assert s.begin_step() == 2
    assert s.step == W + 1 and s.window_pages == (3, 4, 2)
    assert table_lists(build_page_table([s])) == (
        [0, 5], [0, 1, 3, 4, 2], [-1, -1, 3, 2, 1], [7, 7, 10, 10, 10])
    assert pool.num_used == 5 and pool.num_free == 3


def test_step_W_plus_1_frees_the_oldest_page_to_the_pool():
    # Another allocator takes the freed page between steps: proves it really went back to the pool.
    pool = PagePool(6)
    s = SessionPages(pool, preset("test", sink_frames=1))   # sink [0]
    assert [s.begin_step() for _ in range(W)] == [1, 2, 3]
    assert s.begin_step() == 1                 # step 4: frees 1, reuses it
    other = pool.alloc()                       # 4
    assert s.begin_step() == 2                 # step 5: frees 2 (step 2's), reuses it
    assert (other, s.window_pages) == (4, (3, 1, 2))
    assert not pool.is_allocated(5)


def test_golden_after_one_million_steps():
    pool = PagePool(8)
    s = SessionPages(pool, CFG)                      # sinks (0, 1); window ids cycle 2, 3, 4
    for _ in range(1_000_000):                       # O(1) per step: ~1 s
        s.begin_step()
    # step k wrote page 2 + (k - 1) % 3: steps 999998, 999999, 1000000 -> 3, 4, 2
    assert s.step == 1_000_000 and s.sink_pages == (0, 1) and s.window_pages == (3, 4, 2)
    assert table_lists(build_page_table([s])) == (
        [0, 5], [0, 1, 3, 4, 2], [-1, -1, 3, 2, 1], [10, 10, 10, 10, 10])
    assert (pool.num_used, pool.num_free) == (5, 3)
    s.close()
    assert (pool.num_used, pool.num_free) == (0, 8)


def test_golden_batch_of_interleaved_sessions():
    pool = PagePool(12)
    a = SessionPages(pool, preset("test", sink_frames=1))                     # sink [0]
    assert a.begin_step() == 1
    b = SessionPages(pool, preset("test", sink_frames=2), sink_valid=[4, 6])  # sinks [2, 3]
    assert [a.begin_step(), a.begin_step(), b.begin_step(), a.begin_step()] == [4, 5, 6, 1]
    c = SessionPages(pool, preset("test", sink_frames=0))                     # no sinks
    assert table_lists(build_page_table([a, b, c])) == (
        [0, 4, 7, 7],
        [0, 4, 5, 1, 2, 3, 6],
        [-1, 3, 2, 1, -1, -1, 1],
        [10, 10, 10, 10, 4, 6, 10])
    b.close()                                  # frees 2, 3, 6 -> LIFO hands out 6, 3, 2
    assert [c.begin_step(), a.begin_step()] == [6, 4]   # a step 5 frees its oldest (4), reuses it
    t = build_page_table([c, a])
    assert table_lists(t) == ([0, 1, 5], [6, 0, 5, 1, 4], [1, -1, 3, 2, 1], [10, 10, 10, 10, 10])
    assert (t.batch_size, t.max_pages) == (2, 4)
    assert pool.num_used == 5


# ---------------------------------------------------------------- end to end with the reference ops

def test_gathered_cache_holds_sinks_then_last_W_steps_in_order():
    """Write each step's K as the step number via append; after many steps the dense gather must
    show the sink, then steps s-2, s-1, s, with lags 3, 2, 1."""
    cfg = preset("test", sink_frames=1)
    L, H, D = cfg.n_layer, cfg.n_head, cfg.head_dim
    pool_meta = PagePool(2 * (1 + W))
    pool = kr.make_pool(pool_meta.num_pages, L, H, P, D)
    sessions = [SessionPages(pool_meta, cfg, sink_valid=5), SessionPages(pool_meta, cfg, sink_valid=5)]
    for b, s in enumerate(sessions):  # sink K/V = -(b+1), written as if by prefill
        kr.append(pool, np.array(s.sink_pages, np.int32), *[np.full((L, 1, H, P, D), -(b + 1.0), np.float32)] * 2)
    for step in range(1, 11):
        t = build_page_table(sessions)
        assert table_lists(t)[2] == [-1, *range(min(step - 1, W), 0, -1)] * 2
        pages = np.array([s.begin_step() for s in sessions], np.int32)
        new = np.stack([np.full((L, H, P, D), 100 * b + step, np.float32) for b in range(2)], axis=1)
        kr.append(pool, pages, new, new + 0.5)
    t = build_page_table(sessions)
    past_k, past_v, past_lag = kr.gather(pool, **t.as_kwargs(), n_slots=1 + W)
    assert past_lag.tolist() == [[-1] * 5 + [-2] * 5 + [3] * P + [2] * P + [1] * P] * 2
    for b in range(2):
        expect = [-(b + 1.0)] * 5 + [0.0] * 5 + [100 * b + s for s in (8, 9, 10) for _ in range(P)]
        assert np.array_equal(past_k[:, b], np.broadcast_to(np.array(expect, np.float32)[None, None, :, None], (L, H, 40, D)))
        expect_v = np.array(expect, np.float32) + np.where(np.array(expect) > 0, 0.5, 0.0)
        assert np.array_equal(past_v[1, b, 0, :, 0], expect_v.astype(np.float32))


# ---------------------------------------------------------------- errors

def test_full_pool_refuses_open_and_step_without_changing_state():
    pool = PagePool(4)
    s = SessionPages(pool, CFG)                # 2 sinks
    with pytest.raises(PoolFullError, match=r"2/4 pages in use, 3 requested"):
        SessionPages(pool, preset("test", sink_frames=3))
    assert pool.num_used == 2                  # the failed open holds nothing
    s.begin_step(), s.begin_step()
    with pytest.raises(PoolFullError, match=r"4/4 pages in use, 1 requested.*close idle sessions"):
        s.begin_step()                         # window still filling: no page to recycle
    assert s.step == 2 and s.window_pages == (2, 3) and pool.num_used == 4


def test_steady_state_never_needs_a_spare_page():
    pool = PagePool(2 + W)                     # exactly sinks + window
    s = SessionPages(pool, CFG)
    for _ in range(3 * W):
        s.begin_step()
    assert pool.num_free == 0 and s.window_pages == (2, 3, 4)


def test_close_is_idempotent_and_closed_session_refuses_use():
    pool = PagePool(6)
    with SessionPages(pool, CFG) as s:
        s.begin_step()
        assert pool.num_used == 3
    assert s.closed and pool.num_used == 0
    s.close()
    assert pool.num_used == 0
    with pytest.raises(RuntimeError, match=r"SessionPages.begin_step\(\) on a closed session"):
        s.begin_step()
    with pytest.raises(ValueError, match=r"sessions\[0\] is closed"):
        build_page_table([s])


@pytest.mark.parametrize("sink_valid", [0, 11, [5], [5, 5, 5], [0, 10]])
def test_bad_sink_valid_is_refused(sink_valid):
    pool = PagePool(4)
    with pytest.raises(ValueError, match=r"sink_valid must be an int or 2 ints .* in 1..page_tokens=10"):
        SessionPages(pool, CFG, sink_valid=sink_valid)
    assert pool.num_used == 0


def test_build_page_table_rejects_bad_batches():
    pool, other = PagePool(6), PagePool(6)
    a, b = SessionPages(pool, CFG), SessionPages(other, CFG)
    with pytest.raises(ValueError, match="sessions must be a non-empty list"):
        build_page_table([])
    with pytest.raises(ValueError, match=r"sessions\[1\] uses a different PagePool"):
        build_page_table([a, b])
    with pytest.raises(ValueError, match="must not repeat a session"):
        build_page_table([a, a])
    with pytest.raises(TypeError, match=r"sessions\[0\] must be a SessionPages"):
        build_page_table([3])


# ---------------------------------------------------------------- property: no leaks, no sharing

class SessionsMachine(RuleBasedStateMachine):
    """Random open/step/close over one small pool; the pool and the sessions must always agree."""

    def __init__(self):
        super().__init__()
        self.pool = PagePool(9)
        self.live: list[SessionPages] = []
        self.closed: list[SessionPages] = []

    @rule(sinks=st.integers(0, 3))
    def open(self, sinks):
        before = self.pool.num_used
        try:
            self.live.append(SessionPages(self.pool, preset("test", sink_frames=sinks)))
        except PoolFullError:
            assert self.pool.num_free < sinks and self.pool.num_used == before

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def step(self, i):
        s = self.live[i % len(self.live)]
        before = (s.step, s.window_pages, self.pool.num_used)
        try:
            page = s.begin_step()
        except PoolFullError:
            assert len(before[1]) < W and (s.step, s.window_pages, self.pool.num_used) == before
            return
        assert s.window_pages[-1] == page and s.step == before[0] + 1
        expected = (*before[1][len(before[1]) == W:], page)  # oldest dropped only when full
        assert s.window_pages == expected

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), twice=st.booleans())
    def close(self, i, twice):
        s = self.live.pop(i % len(self.live))
        s.close()
        if twice:
            s.close()
        self.closed.append(s)

    @invariant()
    def pages_are_owned_once_and_never_leak(self):
        owned = [p for s in self.live for p in s.pages()]
        assert len(owned) == len(set(owned)), "a page is owned by two sessions"
        assert self.pool.num_free + self.pool.num_used == self.pool.num_pages
        assert self.pool.num_used == len(owned)
        assert all(self.pool.is_allocated(p) for p in owned)
        assert all(s.closed and not s.window_pages for s in self.closed)

    @invariant()
    def table_matches_sessions(self):
        if not self.live:
            return
        t = build_page_table(self.live)
        assert t.kv_indptr[-1] == len(t.kv_indices) == len(t.page_lag) == len(t.page_valid)
        for b, s in enumerate(self.live):
            row = slice(t.kv_indptr[b], t.kv_indptr[b + 1])
            n = len(s.window_pages)
            assert t.page_lag[row].tolist() == [-1] * len(s.sink_pages) + list(range(n, 0, -1))
            assert n == min(s.step, W)


TestSessionsMachine = SessionsMachine.TestCase
TestSessionsMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
