"""The tensor side of the paged KV cache: the pool tensor and vectorised ``append`` / ``gather``.

``PagePool`` / ``SessionPages`` (metadata) decide which page ids are live; this module holds the
bytes: one torch tensor ``[num_pages, L, 2, H, P, D]`` allocated once (memory is fixed at start),
and the two ops of ``runtime/kv_reference.py``, run one of two ways:

- the kernel path: the hand-written kernels of ``kernels_cu/`` through
  :class:`~eartalk.runtime.cuda_kernels.CudaKernels`, launched on the pool tensor itself (zero
  copy, torch's current stream). Chosen by default when the pool is on a CUDA device and
  ``cuda_kernels.is_available()``;
- the host path: for a CPU pool of a numpy dtype (float32, float16), plain numpy block copies
  on a numpy view of the pool tensor: one strided copy per (session, page) straight into the
  dense output, which ``gather(out=...)`` can reuse from frame to frame (the engine does). The
  torch path below makes three full passes over the dense past (index, mask, permute) plus
  fresh allocations; on a small CPU that was ~3 ms of a ~25 ms tiny frame;
- the torch path: a handful of indexed torch copies (any device), otherwise.

All are pure copies (no arithmetic), so all equal the numpy reference bit for bit;
``tests/test_kv_cache.py`` checks the host and torch paths and ``tests/test_kv_cache_kernels.py`` the
kernel path, on a CPU, through the host build of the same kernel source.

The page table is built on the host (``build_page_table``) and checked there before any launch;
its device copy, uploaded in one piece per call, is what the kernels read
(:class:`~eartalk.runtime.cuda_kernels.Mirrored`).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .kv_reference import LAG_EMPTY
from .page_table import PageTable

__all__ = ["KVCache", "select_kernels"]

log = logging.getLogger(__name__)


def select_kernels(device, kernels="auto"):
    """The kernels a pool on ``device`` should use: ``(kernels or None, why)``.

    ``kernels``: ``"auto"`` -> a new ``CudaKernels`` for a CUDA pool when ``is_available()``
    and it loads, else None (torch path); ``None`` -> torch path; any other object (with
    ``append``/``gather`` of ``CudaKernels``' signatures) is used as given, e.g. a
    ``CudaKernels`` sharing a pycuda context, or a test double.
    """
    device = torch.device(device)
    if kernels is None:
        return None, "kernels=None: torch path"
    if not isinstance(kernels, str):
        return kernels, f"injected {type(kernels).__name__}"
    if kernels != "auto":
        raise ValueError(f"kernels must be 'auto', None or a kernels object, got {kernels!r}")
    if device.type != "cuda":
        return None, f"pool on {device}: torch path"
    from . import cuda_kernels
    ok, why = cuda_kernels.is_available()
    if not ok:
        return None, f"CUDA kernels unavailable ({why}): torch path"
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return cuda_kernels.CudaKernels(index), f"CudaKernels on cuda:{index}"
    except Exception as e:   # e.g. no fatbin and NVRTC cannot compile: torch path still correct
        log.warning("KV cache: CUDA kernels did not load, using torch copies: %s", e)
        return None, f"CudaKernels failed to load ({type(e).__name__}: {e}): torch path"


class KVCache:
    """A pool tensor ``[num_pages, L, 2, H, P, D]`` with ``append`` and ``gather``.

    ``n_slots`` is the number of pages a session's dense view holds (sink pages + W): the step
    contract's ``S = n_slots * P``. ``kernels``: see :func:`select_kernels`; ``kernel_path``
    says which path was chosen and why.
    """

    def __init__(self, num_pages: int, cfg, dtype=torch.float32, device="cpu", kernels="auto"):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        self.cfg = cfg
        self.num_pages = num_pages
        self.page_tokens = cfg.page_tokens
        self.n_slots = cfg.sink_frames + cfg.window
        self.pool = torch.zeros((num_pages, cfg.n_layer, 2, cfg.n_head, cfg.page_tokens, cfg.head_dim),
                                dtype=dtype, device=device)
        self._own_kernels = isinstance(kernels, str)      # made here, so closed here
        self.kernels, self.kernel_path = select_kernels(self.pool.device, kernels)
        # host path: a numpy view sharing the pool tensor's memory (no copy; writes go through)
        self._pool_np = None
        if self.kernels is None and self.pool.device.type == "cpu" and dtype in (torch.float32, torch.float16):
            self._pool_np = self.pool.numpy()
            self.kernel_path += "; host path: numpy block copies on the CPU pool"

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def close(self) -> None:
        """Release kernels this cache loaded itself (not injected ones). Idempotent."""
        if self._own_kernels and self.kernels is not None:
            self.kernels.close()
        self.kernels = None

    def _mirror(self, **arrays: np.ndarray):
        """Mirrored (host, device) int32 index arrays: one upload for all of them."""
        from .cuda_kernels import Mirrored
        host = [np.ascontiguousarray(a) for a in arrays.values()]
        for name, h in zip(arrays, host):
            if h.dtype != np.int32 or h.ndim != 1:   # never narrow silently (the CSR contract)
                raise ValueError(f"{name} must be 1-D int32, got {h.dtype} {list(h.shape)}")
        packed = torch.from_numpy(np.concatenate(host)).to(self.pool.device, non_blocking=True)
        out, o = [], 0
        for h in host:
            out.append(Mirrored(h, packed[o:o + h.size]))
            o += h.size
        return out

    def empty_dense(self, batch: int, n_slots: int | None = None):
        """Uninitialised ``(past_k, past_v, past_lag)`` on the pool's device for ``gather(out=...)``."""
        n_slots = self.n_slots if n_slots is None else n_slots
        L, H, D, S = self.cfg.n_layer, self.cfg.n_head, self.cfg.head_dim, n_slots * self.page_tokens
        dev = self.pool.device
        return (torch.empty((L, batch, H, S, D), dtype=self.pool.dtype, device=dev),
                torch.empty((L, batch, H, S, D), dtype=self.pool.dtype, device=dev),
                torch.empty((batch, S), dtype=torch.int32, device=dev))

    # ------------------------------------------------------------------ ops
    def append(self, pages, new_k, new_v) -> None:
        """``pool[pages[b], :, 0/1] = new_k/new_v[:, b]`` for every b; pages distinct."""
        pages_h = np.asarray(pages, dtype=np.int64).reshape(-1)   # checked on the host: no device sync
        new_k = torch.as_tensor(new_k, device=self.pool.device)
        new_v = torch.as_tensor(new_v, device=self.pool.device)
        want = (self.cfg.n_layer, pages_h.size, self.cfg.n_head, self.page_tokens, self.cfg.head_dim)
        for name, t in (("new_k", new_k), ("new_v", new_v)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape [L, B, H, P, D] = {list(want)}, got {list(t.shape)}")
            if t.dtype != self.pool.dtype:
                raise TypeError(f"{name} dtype {t.dtype} does not match pool dtype {self.pool.dtype}")
        if pages_h.size and (int(pages_h.min()) < 0 or int(pages_h.max()) >= self.num_pages):
            raise ValueError(f"pages must be page ids in [0, {self.num_pages}), got {pages_h.tolist()}")
        if np.unique(pages_h).size != pages_h.size:
            raise ValueError(f"pages must be distinct (two sessions writing one page), got {pages_h.tolist()}")
        if self.kernels is not None:
            # in range, so int32 is exact (the kernels' CSR contract is int32)
            (pages_m,) = self._mirror(pages=pages_h.astype(np.int32))
            self.kernels.append(self.pool, pages_m, new_k.contiguous(), new_v.contiguous())
            return
        if self._pool_np is not None:
            # host path: one strided copy per page and K/V, no stacked temporary
            k_np, v_np = new_k.detach().numpy(), new_v.detach().numpy()
            for b, page in enumerate(pages_h.tolist()):
                self._pool_np[page, :, 0] = k_np[:, b]
                self._pool_np[page, :, 1] = v_np[:, b]
            return
        pages_t = torch.from_numpy(pages_h).to(self.pool.device)
        # [L,B,H,P,D] x2 -> [B,L,2,H,P,D]: one indexed store for the whole batch
        self.pool[pages_t] = torch.stack([new_k, new_v], dim=2).permute(1, 0, 2, 3, 4, 5)

    def gather(self, table: PageTable, n_slots: int | None = None, out=None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense ``past_k, past_v [L,B,H,S,D]`` and ``past_lag int32 [B,S]`` for ``table``'s rows.

        Slot layout and the exact-zero / lag -2 filling of empty slots follow ``kv_reference.gather``.
        ``out``: ``(past_k, past_v, past_lag)`` tensors of exactly those shapes and dtypes on the
        pool's device (e.g. :meth:`empty_dense`), overwritten entirely and returned; default: new ones.
        """
        n_slots = self.n_slots if n_slots is None else n_slots
        indptr = table.kv_indptr.astype(np.int64)
        counts = np.diff(indptr)
        B, P = len(counts), self.page_tokens
        if B and counts.max() > n_slots:
            b = int(np.argmax(counts))
            raise ValueError(f"session {b} has {counts[b]} pages but n_slots={n_slots}")
        if out is not None:
            self._check_out(out, B, n_slots)
        if self.kernels is not None:
            return self._gather_kernels(table, n_slots, out)
        if self._pool_np is not None:
            return self._gather_host(table, n_slots, out)
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
        res = kv[0], kv[1], torch.from_numpy(past_lag).to(dev)
        if out is None:
            return res
        for o, r in zip(out, res):
            o.copy_(r)
        return tuple(out)

    def _check_out(self, out, B: int, n_slots: int) -> None:
        L, H, D, S = self.cfg.n_layer, self.cfg.n_head, self.cfg.head_dim, n_slots * self.page_tokens
        want = (((L, B, H, S, D), self.pool.dtype), ((L, B, H, S, D), self.pool.dtype), ((B, S), torch.int32))
        if len(out) != 3:
            raise ValueError(f"out must be (past_k, past_v, past_lag), got {len(out)} tensors")
        for name, o, (shape, dtype) in zip(("past_k", "past_v", "past_lag"), out, want):
            if (not isinstance(o, torch.Tensor) or tuple(o.shape) != shape or o.dtype != dtype
                    or o.device != self.pool.device or not o.is_contiguous()):
                raise ValueError(f"out {name} must be a contiguous {dtype} tensor {list(shape)} on "
                                 f"{self.pool.device}, got {o.dtype if isinstance(o, torch.Tensor) else type(o).__name__} "
                                 f"{list(getattr(o, 'shape', []))}")

    def _gather_host(self, table: PageTable, n_slots: int, out):
        """The CPU path of :meth:`gather`: each page of a row is copied once, straight from the pool
        into its slot of the dense output (strided numpy copies, no temporaries)."""
        B, P = table.batch_size, self.page_tokens
        if out is None:
            out = self.empty_dense(B, n_slots)
        k_t, v_t, lag_t = out
        L, H, D = self.cfg.n_layer, self.cfg.n_head, self.cfg.head_dim
        # [L,B,H,n,P,D] views of the outputs: slot j of row b is [:, b, :, j]
        ko = k_t.numpy().reshape(L, B, H, n_slots, P, D)
        vo = v_t.numpy().reshape(L, B, H, n_slots, P, D)
        lag = lag_t.numpy().reshape(B, n_slots, P)
        pool = self._pool_np
        indptr = table.kv_indptr.tolist()
        ids, lags, valid = table.kv_indices.tolist(), table.page_lag.tolist(), table.page_valid.tolist()
        if ids and (min(ids) < 0 or max(ids) >= self.num_pages):   # numpy would wrap a negative id
            raise ValueError(f"page ids must be in [0, {self.num_pages}), got {sorted(set(ids))}")
        for b in range(B):
            lo, hi = indptr[b], indptr[b + 1]
            for j in range(hi - lo):
                page, n = ids[lo + j], max(0, min(P, valid[lo + j]))
                ko[:, b, :, j, :n] = pool[page, :, 0, :, :n]
                vo[:, b, :, j, :n] = pool[page, :, 1, :, :n]
                lag[b, j, :n] = lags[lo + j]
                if n < P:                       # tokens past page_valid: empty (+0.0, lag -2)
                    ko[:, b, :, j, n:] = 0
                    vo[:, b, :, j, n:] = 0
                    lag[b, j, n:] = LAG_EMPTY
            if hi - lo < n_slots:               # slots after the row's last page: empty
                ko[:, b, :, hi - lo:] = 0
                vo[:, b, :, hi - lo:] = 0
                lag[b, hi - lo:] = LAG_EMPTY
        return k_t, v_t, lag_t

    def _gather_kernels(self, table: PageTable, n_slots: int, out=None):
        # The kernels validate the host halves (int32 only: a PageTable is int32 by construction)
        # before the launch and write straight into tensors on the pool's device.
        if out is None:
            out = self.empty_dense(table.batch_size, n_slots)
        index = self._mirror(**table.as_kwargs())
        return tuple(self.kernels.gather(self.pool, *index, n_slots, out=out))
