"""The tensor side of the paged KV cache: the pool tensor and vectorised ``append`` / ``gather``.

``PagePool`` / ``SessionPages`` (metadata) decide which page ids are live; this module holds the
bytes: one torch tensor ``[num_pages, L, 2, H, P, D]`` allocated once (memory is fixed at start),
and the two ops of ``runtime/kv_reference.py`` written as a handful of indexed copies instead of
Python loops. Both are pure copies (no arithmetic), so they equal the numpy reference bit for
bit; ``tests/test_kv_cache.py`` checks that on random tables.
"""
from __future__ import annotations

import numpy as np
import torch

from .kv_reference import LAG_EMPTY
from .page_table import PageTable

__all__ = ["KVCache"]


class KVCache:
    """A pool tensor ``[num_pages, L, 2, H, P, D]`` with ``append`` and ``gather``.

    ``n_slots`` is the number of pages a session's dense view holds (sink pages + W): the step
    contract's ``S = n_slots * P``.
    """

    def __init__(self, num_pages: int, cfg, dtype=torch.float32, device="cpu"):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        self.cfg = cfg
        self.num_pages = num_pages
        self.page_tokens = cfg.page_tokens
        self.n_slots = cfg.sink_frames + cfg.window
        self.pool = torch.zeros((num_pages, cfg.n_layer, 2, cfg.n_head, cfg.page_tokens, cfg.head_dim),
                                dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    # ------------------------------------------------------------------ ops
    def append(self, pages, new_k, new_v) -> None:
        """``pool[pages[b], :, 0/1] = new_k/new_v[:, b]`` for every b; pages distinct."""
        pages = torch.as_tensor(np.asarray(pages, dtype=np.int64), device=self.pool.device)
        new_k = torch.as_tensor(new_k, device=self.pool.device)
        new_v = torch.as_tensor(new_v, device=self.pool.device)
        want = (self.cfg.n_layer, pages.numel(), self.cfg.n_head, self.page_tokens, self.cfg.head_dim)
        for name, t in (("new_k", new_k), ("new_v", new_v)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape [L, B, H, P, D] = {list(want)}, got {list(t.shape)}")
            if t.dtype != self.pool.dtype:
                raise TypeError(f"{name} dtype {t.dtype} does not match pool dtype {self.pool.dtype}")
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= self.num_pages):
            raise ValueError(f"pages must be page ids in [0, {self.num_pages}), got {pages.tolist()}")
        if torch.unique(pages).numel() != pages.numel():
            raise ValueError(f"pages must be distinct (two sessions writing one page), got {pages.tolist()}")
        # [L,B,H,P,D] x2 -> [B,L,2,H,P,D]: one indexed store for the whole batch
        self.pool[pages] = torch.stack([new_k, new_v], dim=2).permute(1, 0, 2, 3, 4, 5)

    def gather(self, table: PageTable, n_slots: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense ``past_k, past_v [L,B,H,S,D]`` and ``past_lag int32 [B,S]`` for ``table``'s rows.

        Slot layout and the exact-zero / lag -2 filling of empty slots follow ``kv_reference.gather``.
        """
        n_slots = self.n_slots if n_slots is None else n_slots
        indptr = table.kv_indptr.astype(np.int64)
        counts = np.diff(indptr)
        B, P = len(counts), self.page_tokens
        if B and counts.max() > n_slots:
            b = int(np.argmax(counts))
            raise ValueError(f"session {b} has {counts[b]} pages but n_slots={n_slots}")
        # [B, n_slots] page id per slot (0 where empty: masked below), lag and valid tokens per slot
        slot_of = np.arange(len(table.kv_indices)) - np.repeat(indptr[:-1], counts)
        row_of = np.repeat(np.arange(B), counts)
        page = np.zeros((B, n_slots), np.int64)
        lag = np.full((B, n_slots), LAG_EMPTY, np.int32)
        valid = np.zeros((B, n_slots), np.int64)
        page[row_of, slot_of] = table.kv_indices
        lag[row_of, slot_of] = table.page_lag
        valid[row_of, slot_of] = table.page_valid
        tok_ok = np.arange(P)[None, None, :] < valid[:, :, None]              # [B, n_slots, P]
        dev = self.pool.device
        kv = self.pool[torch.from_numpy(page).to(dev)]                         # [B,n,L,2,H,P,D]
        mask = torch.from_numpy(tok_ok).to(dev)[:, :, None, None, None, :, None]
        kv = kv.masked_fill(~mask, 0)
        L, H, D = self.cfg.n_layer, self.cfg.n_head, self.cfg.head_dim
        # [B,n,L,2,H,P,D] -> [2,L,B,H,n,P,D] -> [2,L,B,H,S,D]
        kv = kv.permute(3, 2, 0, 4, 1, 5, 6).reshape(2, L, B, H, n_slots * P, D)
        past_lag = np.where(tok_ok, lag[:, :, None], LAG_EMPTY).reshape(B, n_slots * P).astype(np.int32)
        return kv[0], kv[1], torch.from_numpy(past_lag).to(dev)
