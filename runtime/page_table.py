"""Per-session page bookkeeping (sink pages + a window ring) and the batch page table in CSR form.

A session owns ``sink_frames`` pinned sink pages, allocated at open, and a ring of at most W
window pages, one per step. The metadata lives here; the K/V live in the pool tensor
(``runtime/kv_reference.py`` documents the layout and the ops that read this table).

Call order for one frame, for every session in the batch::

    table = build_page_table(sessions)      # lags as seen by this step: newest page = 1
    ... engine step reads the cache through `table` (gather or paged attention) ...
    pages = [s.begin_step() for s in sessions]
    append(pool, np.array(pages, np.int32), new_k, new_v)

``begin_step`` may free the oldest window page and hand the same id back as this step's page, so
a table built before ``begin_step`` is stale afterwards: build it anew every frame.

Timeline with W = 3 (pages named by the step that wrote them)::

    after step 1: window [1]        lags for step 2: [1]
    after step 3: window [1 2 3]    lags for step 4: [3 2 1]
    after step 4: window [2 3 4]    (step 4 freed page 1 before allocating its own)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .kv_reference import LAG_SINK
from .page_pool import PagePool

__all__ = ["SessionPages", "PageTable", "build_page_table"]


class SessionPages:
    """Pages of one stream: pinned sinks plus a ring of the last ``window`` steps' pages.

    ``cfg`` is a ``ModelConfig`` (only ``window``, ``sink_frames`` and ``page_tokens`` are
    read). ``sink_valid`` is the number of valid tokens in each sink page: one int for all sink
    pages or one per sink page, each in 1..P; default P (full pages). Opening allocates the
    sink pages all or nothing; on ``PoolFullError`` no page is held.
    """

    def __init__(self, pool: PagePool, cfg, sink_valid: int | Sequence[int] | None = None):
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool must be a PagePool, got {type(pool).__name__}")
        window, sinks, page_tokens = cfg.window, cfg.sink_frames, cfg.page_tokens
        if window < 1 or sinks < 0 or page_tokens < 1:
            raise ValueError(f"cfg needs window >= 1, sink_frames >= 0, page_tokens >= 1; got "
                             f"window={window}, sink_frames={sinks}, page_tokens={page_tokens}")
        if sink_valid is None:
            sink_valid = page_tokens
        valid = [sink_valid] * sinks if isinstance(sink_valid, (int, np.integer)) else list(sink_valid)
        if len(valid) != sinks or any(not 1 <= v <= page_tokens for v in valid):
            raise ValueError(f"sink_valid must be an int or {sinks} ints (one per sink page), each in "
                             f"1..page_tokens={page_tokens}; got {sink_valid!r}")
        self.pool = pool
        self.window = window
        self.page_tokens = page_tokens
        self.sink_valid: tuple[int, ...] = tuple(int(v) for v in valid)
        self.sink_pages: tuple[int, ...] = tuple(pool.alloc_many(sinks))  # may raise: nothing held
        self._ring: deque[int] = deque()  # window pages, oldest at the left
        self.step = 0                     # steps begun so far
        self.closed = False

    # ------------------------------------------------------------ stepping
    def begin_step(self) -> int:
        """Allocate the page for this step's new K/V and return its id. O(1).

        With W window pages held, the oldest is freed first (so step W+1 frees step 1's page)
        and may be the id returned. Raises ``PoolFullError`` only while the window is still
        filling, and then nothing changes.
        """
        self._check_open("begin_step")
        if len(self._ring) == self.window:
            # Free before alloc: a stream in steady state needs no spare page, so a pool sized
            # exactly for its sessions never refuses a running one.
            self.pool.free(self._ring.popleft())
        page = self.pool.alloc()
        self._ring.append(page)
        self.step += 1
        return page

    def close(self) -> None:
        """Free every page of the session. Idempotent."""
        if self.closed:
            return
        for page in (*self.sink_pages, *self._ring):
            self.pool.free(page)
        self._ring.clear()
        self.closed = True

    def __enter__(self) -> "SessionPages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ views (next step's viewpoint)
    @property
    def window_pages(self) -> tuple[int, ...]:
        """Window page ids, oldest -> newest."""
        return tuple(self._ring)

    def pages(self) -> list[int]:
        """All page ids in CSR order: sinks, then window oldest -> newest."""
        self._check_open("pages")
        return [*self.sink_pages, *self._ring]

    def page_lags(self) -> np.ndarray:
        """int32 lag per page (``pages()`` order) as seen by the next step: sinks -1, window
        pages oldest = len(window) .. newest = 1."""
        self._check_open("page_lags")
        n = len(self._ring)
        return np.array([LAG_SINK] * len(self.sink_pages) + list(range(n, 0, -1)), dtype=np.int32)

    def page_valid(self) -> np.ndarray:
        """int32 valid tokens per page (``pages()`` order): ``sink_valid`` for sinks, P otherwise."""
        self._check_open("page_valid")
        return np.array([*self.sink_valid, *[self.page_tokens] * len(self._ring)], dtype=np.int32)

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"SessionPages.{what}() on a closed session (its pages were freed)")

    def __repr__(self) -> str:
        return (f"SessionPages(step={self.step}, sinks={list(self.sink_pages)}, "
                f"window={list(self._ring)}, closed={self.closed})")


@dataclass(frozen=True)
class PageTable:
    """CSR page table of a batch (all int32); see ``runtime/kv_reference.py`` for semantics."""

    kv_indptr: np.ndarray   # [B+1]
    kv_indices: np.ndarray  # [nnz] per session: sinks, then window oldest -> newest
    page_lag: np.ndarray    # [nnz] -1 sink, 1..W window
    page_valid: np.ndarray  # [nnz] valid tokens per page

    @property
    def batch_size(self) -> int:
        return len(self.kv_indptr) - 1

    @property
    def max_pages(self) -> int:
        """Most pages held by one session (the ``n_slots`` a dense gather needs at least)."""
        return int(np.diff(self.kv_indptr).max(initial=0))

    def as_kwargs(self) -> dict[str, np.ndarray]:
        """The four arrays by name, for ``gather(pool, **t.as_kwargs(), n_slots=...)``."""
        return dict(kv_indptr=self.kv_indptr, kv_indices=self.kv_indices,
                    page_lag=self.page_lag, page_valid=self.page_valid)


def build_page_table(sessions: list[SessionPages]) -> PageTable:
    """CSR page table of ``sessions`` in order, as seen by their next step."""
    if not isinstance(sessions, (list, tuple)) or not sessions:
        raise ValueError(f"sessions must be a non-empty list of SessionPages, got {sessions!r}")
    for i, s in enumerate(sessions):
        if not isinstance(s, SessionPages):
            raise TypeError(f"sessions[{i}] must be a SessionPages, got {type(s).__name__}")
        if s.closed:
            raise ValueError(f"sessions[{i}] is closed: its pages were freed")
        if s.pool is not sessions[0].pool:
            # Page ids index one pool tensor; ids from two pools would silently alias.
            raise ValueError(f"sessions[{i}] uses a different PagePool than sessions[0]")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("sessions must not repeat a session (it would get two pages per step)")
    counts = [len(s.sink_pages) + len(s.window_pages) for s in sessions]
    indptr = np.zeros(len(sessions) + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    return PageTable(
        kv_indptr=indptr,
        kv_indices=np.array([p for s in sessions for p in s.pages()], dtype=np.int32),
        page_lag=np.concatenate([s.page_lags() for s in sessions]).astype(np.int32, copy=False),
        page_valid=np.concatenate([s.page_valid() for s in sessions]).astype(np.int32, copy=False))
