"""Page allocator of the paged KV cache: metadata only, no tensors.

The pool tensor ``[num_pages, L, 2, H, P, D]`` (see ``runtime/kv_reference.py``) is owned by the
backend; this class only decides which page ids are live. All pages exist up front (memory is
fixed at start, as on an edge device), and allocation is O(1): a stack of free ids plus one
"allocated" flag per page, kept apart so that ``free`` can catch double frees in O(1).

There is no reserved null page: page 0 is an ordinary page. The CSR page table simply lists a
session's live pages, so nothing ever needs to point at a placeholder.

The free list is LIFO: the page freed by a session's window eviction is the next one handed out,
which keeps the working set of a steady stream small (the same W+sink pages, warm in cache) and
makes page ids deterministic for golden tests.
"""
from __future__ import annotations

__all__ = ["PagePool", "PoolFullError"]


class PoolFullError(RuntimeError):
    """Raised when a page is requested from a pool with too few free pages; the pool is unchanged."""


class PagePool:
    """Fixed set of ``num_pages`` page ids, each either free or allocated.

    Invariant: ``num_free + num_used == num_pages`` and a page id is in the free stack iff its
    allocated flag is False.
    """

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or isinstance(num_pages, bool) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        self.num_pages = num_pages
        # Reversed so that pop() hands out 0, 1, 2, ... on a fresh pool.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._allocated = bytearray(num_pages)  # 1 = live page

    # ------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def is_allocated(self, page: int) -> bool:
        self._check_id(page)
        return bool(self._allocated[page])

    # ------------------------------------------------------------ alloc / free
    def alloc(self) -> int:
        """Return a free page id, now allocated. Raises ``PoolFullError`` if none is free."""
        if not self._free:
            raise self._full_error(1)
        page = self._free.pop()
        assert not self._allocated[page], f"free list held live page {page}"
        self._allocated[page] = 1
        return page

    def alloc_many(self, n: int) -> list[int]:
        """Allocate ``n`` pages, all or nothing: on ``PoolFullError`` nothing was allocated."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an int >= 0 (pages to allocate), got {n!r}")
        if n > len(self._free):
            raise self._full_error(n)
        return [self.alloc() for _ in range(n)]

    def free(self, page: int) -> None:
        """Return an allocated page to the pool. Freeing a free page (double free) raises."""
        self._check_id(page)
        if not self._allocated[page]:
            raise ValueError(f"page {page} is not allocated (double free or never allocated)")
        self._allocated[page] = 0
        self._free.append(page)

    # ------------------------------------------------------------ helpers
    def _check_id(self, page: int) -> None:
        if not isinstance(page, int) or isinstance(page, bool) or not 0 <= page < self.num_pages:
            raise ValueError(f"page must be an int in [0, {self.num_pages}), got {page!r}")

    def _full_error(self, requested: int) -> PoolFullError:
        return PoolFullError(
            f"KV page pool full: {self.num_used}/{self.num_pages} pages in use, {requested} "
            f"requested, {self.num_free} free; close idle sessions or raise num_pages")

    def __repr__(self) -> str:
        return f"PagePool(num_pages={self.num_pages}, used={self.num_used})"
