"""Numpy reference ops of the paged KV cache: the semantics every backend kernel must match.

This module is the specification a kernel author (``kernels_cu/``) codes against. It is written
for clarity, not speed: plain loops over sessions and pages, float32 math.

Layout
------
``pool``: ``[num_pages, L, 2, H, P, D]`` ("HND" inside a page), dtype float32 or float16.
    Index 2 selects K (0) or V (1). One page holds the K/V of one model step: ``P = page_tokens``
    tokens of every layer and head. Pages are addressed by their first index only; there is no
    null page (page 0 is an ordinary page).

Page table (CSR, all arrays int32, see ``runtime/page_table.py``)
    ``kv_indptr``  ``[B+1]``  session ``b`` owns entries ``kv_indptr[b]:kv_indptr[b+1]``;
                             ``kv_indptr[0] == 0``, non-decreasing, ``kv_indptr[B] == nnz``.
    ``kv_indices`` ``[nnz]``  page ids, per session: sink pages first, then window pages oldest
                             -> newest. The same page may appear in several rows (read-only ops).
    ``page_lag``   ``[nnz]``  frames between the page's step and the step being computed:
                             ``LAG_SINK = -1`` for sink pages, ``1..W`` for window pages.
    ``page_valid`` ``[nnz]``  valid tokens of the page, ``0..P``; tokens ``t < page_valid`` are
                             valid, tokens ``t >= page_valid`` are never read.

Ops
---
``append(pool, pages, new_k, new_v)``
    ``new_k``/``new_v`` ``[L, B, H, P, D]`` (the step's outputs), ``pages`` int32 ``[B]``:
    ``pool[pages[b], :, 0] = new_k[:, b]`` and ``pool[pages[b], :, 1] = new_v[:, b]``, an exact
    copy (same dtype required). Pages must be distinct.

``gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots)``
    -> ``past_k, past_v`` ``[L, B, H, S, D]`` (pool dtype), ``past_lag`` int32 ``[B, S]``,
    ``S = n_slots * P``. The j-th page (0-based) of session b's row fills token slots
    ``[j*P, (j+1)*P)``: slot ``j*P + t`` for ``t < page_valid`` holds token t of that page
    (exact copy) and lag ``page_lag``; every other slot (``t >= page_valid``, and all slots
    after the session's last page) is *empty*: K = V = 0 exactly, lag ``LAG_EMPTY = -2``.
    A row with more than ``n_slots`` pages is an error.

``paged_attention(q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid, lag_bias, scale)``
    ``q`` ``[B, H, Q, D]`` (float32 or float16), ``lag_bias`` float32 ``[H, W+2]``: column
    ``l`` (0..W) is the bias for lag l, column ``W+1`` the bias for sinks (lag -1). For session
    b, head h, query i and every valid cached token j of b's pages (in CSR order; the order does
    not change the result beyond rounding):

        s_j   = scale * dot(q[b,h,i], K_j) + lag_bias[h, col(lag_j)]      (float32)
        m     = max_j s_j
        lse   = m + log(sum_j exp(s_j - m))                               (natural log)
        out   = sum_j exp(s_j - m) * V_j / sum_j exp(s_j - m)             (float32)

    with K/V read from ``pool[page, layer, 0/1, h, t]`` and cast to float32. Empty tokens take
    no part. A session with no valid tokens gets ``out = 0`` and ``lse = -inf``. A valid token
    whose lag is not -1 and not in 0..W is an error. Outputs: ``out`` float32 ``[B, H, Q, D]``,
    ``lse`` float32 ``[B, H, Q]``. Kernels are compared with this at atol/rtol 1e-5; they may
    fold ``scale`` into q or use exp2 with log2(e) scaling internally, but ``lse`` is returned
    in natural log.

``merge_states(out_a, lse_a, out_b, lse_b)``
    Combines two attentions over disjoint token sets (e.g. the cached part from
    ``paged_attention`` and the in-step part) into the attention over their union:

        m   = max(lse_a, lse_b);  wa = exp(lse_a - m);  wb = exp(lse_b - m)
        out = (wa * out_a + wb * out_b) / (wa + wb);  lse = m + log(wa + wb)

    A side with ``lse = -inf`` (no tokens) has weight exactly 0; if both are ``-inf`` then
    ``out = 0`` and ``lse = -inf``. Shapes: ``out [..., D]``, ``lse [...]``; float32 math.

Bad input raises ``ValueError`` (or ``TypeError`` for dtypes) naming the argument and what was
expected; these checks are the reference's job, a kernel may trust its caller.
"""
from __future__ import annotations

import numpy as np

LAG_SINK = -1   # lag of every token of a pinned sink page
LAG_EMPTY = -2  # lag of a slot of the dense past_lag that holds no token

POOL_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

__all__ = [
    "LAG_SINK", "LAG_EMPTY", "POOL_DTYPES", "make_pool", "append", "gather", "paged_attention",
    "merge_states",
]


# ---------------------------------------------------------------- validation helpers

def _check_pool(pool: np.ndarray) -> tuple[int, int, int, int, int]:
    """Return (num_pages, L, H, P, D) of a valid pool, else raise."""
    if not isinstance(pool, np.ndarray):
        raise TypeError(f"pool must be a numpy array, got {type(pool).__name__}")
    if pool.ndim != 6 or pool.shape[2] != 2:
        raise ValueError(f"pool must have shape [num_pages, L, 2, H, P, D], got {pool.shape}")
    if pool.dtype not in POOL_DTYPES:
        raise TypeError(f"pool dtype must be float32 or float16, got {pool.dtype}")
    num_pages, n_layer, _, n_head, page_tokens, head_dim = pool.shape
    return num_pages, n_layer, n_head, page_tokens, head_dim


def _check_int_array(name: str, a, ndim: int = 1) -> np.ndarray:
    """Page-table arrays are int32 by contract: refuse int64 rather than silently narrowing."""
    if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.ndim != ndim:
        got = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name} must be an int32 numpy array with {ndim} dim(s), got {got}")
    return a


def _check_table(num_pages: int, page_tokens: int, kv_indptr, kv_indices, page_lag, page_valid,
                 ) -> int:
    """Validate the CSR page table against a pool; return the batch size B."""
    _check_int_array("kv_indptr", kv_indptr)
    _check_int_array("kv_indices", kv_indices)
    _check_int_array("page_lag", page_lag)
    _check_int_array("page_valid", page_valid)
    if kv_indptr.shape[0] < 1:
        raise ValueError("kv_indptr must have B+1 >= 1 entries, got an empty array")
    nnz = kv_indices.shape[0]
    if kv_indptr[0] != 0 or kv_indptr[-1] != nnz or np.any(np.diff(kv_indptr) < 0):
        raise ValueError(
            f"kv_indptr must start at 0, be non-decreasing and end at len(kv_indices)={nnz}; "
            f"got {kv_indptr.tolist()}")
    for name, a in (("page_lag", page_lag), ("page_valid", page_valid)):
        if a.shape[0] != nnz:
            raise ValueError(f"{name} must have one entry per kv_indices entry ({nnz}), got {a.shape[0]}")
    if nnz and (kv_indices.min() < 0 or kv_indices.max() >= num_pages):
        raise ValueError(f"kv_indices must be page ids in [0, {num_pages}), got min "
                         f"{kv_indices.min()} max {kv_indices.max()}")
    if nnz and (page_valid.min() < 0 or page_valid.max() > page_tokens):
        raise ValueError(f"page_valid must be in [0, P={page_tokens}], got min {page_valid.min()} "
                         f"max {page_valid.max()}")
    # lag 0 is allowed by the layout (a page of the current step), -2 is reserved for empty slots.
    if nnz and page_lag.min() < LAG_SINK:
        raise ValueError(f"page_lag must be {LAG_SINK} (sink) or >= 0, got {page_lag.min()}")
    return kv_indptr.shape[0] - 1


def make_pool(num_pages: int, n_layer: int, n_head: int, page_tokens: int, head_dim: int,
              dtype=np.float32) -> np.ndarray:
    """A zeroed pool ``[num_pages, L, 2, H, P, D]``; ``dtype`` float32 or float16."""
    dtype = np.dtype(dtype)
    if dtype not in POOL_DTYPES:
        raise TypeError(f"pool dtype must be float32 or float16, got {dtype}")
    for name, v in (("num_pages", num_pages), ("n_layer", n_layer), ("n_head", n_head),
                    ("page_tokens", page_tokens), ("head_dim", head_dim)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return np.zeros((num_pages, n_layer, 2, n_head, page_tokens, head_dim), dtype=dtype)


# ---------------------------------------------------------------- ops

def append(pool: np.ndarray, pages: np.ndarray, new_k: np.ndarray, new_v: np.ndarray) -> None:
    """Write one step's K/V of B sessions into their pages, in place (see module docstring)."""
    num_pages, n_layer, n_head, page_tokens, head_dim = _check_pool(pool)
    _check_int_array("pages", pages)
    batch = pages.shape[0]
    want = (n_layer, batch, n_head, page_tokens, head_dim)
    for name, a in (("new_k", new_k), ("new_v", new_v)):
        if not isinstance(a, np.ndarray) or a.shape != want:
            got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name} must have shape [L, B, H, P, D] = {list(want)}, got {got}")
        if a.dtype != pool.dtype:
            # An implicit cast would hide a precision mismatch between engine and pool.
            raise TypeError(f"{name} dtype {a.dtype} does not match pool dtype {pool.dtype}")
    if batch and (pages.min() < 0 or pages.max() >= num_pages):
        raise ValueError(f"pages must be page ids in [0, {num_pages}), got {pages.tolist()}")
    if len(np.unique(pages)) != batch:
        raise ValueError(f"pages must be distinct (two sessions writing one page), got {pages.tolist()}")
    for b in range(batch):
        pool[pages[b], :, 0] = new_k[:, b]
        pool[pages[b], :, 1] = new_v[:, b]


def gather(pool: np.ndarray, kv_indptr: np.ndarray, kv_indices: np.ndarray, page_lag: np.ndarray,
           page_valid: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy each session's pages into dense ``past_k, past_v [L,B,H,S,D]`` and ``past_lag [B,S]``."""
    num_pages, n_layer, n_head, page_tokens, head_dim = _check_pool(pool)
    batch = _check_table(num_pages, page_tokens, kv_indptr, kv_indices, page_lag, page_valid)
    if not isinstance(n_slots, (int, np.integer)) or n_slots < 0:
        raise ValueError(f"n_slots must be an int >= 0 (pages per session), got {n_slots!r}")
    counts = np.diff(kv_indptr)
    if batch and counts.max() > n_slots:
        b = int(np.argmax(counts))
        raise ValueError(f"session {b} has {counts[b]} pages but n_slots={n_slots}: the dense "
                         f"past_k has room for n_slots pages per session")
    n_tok = n_slots * page_tokens
    # Empty slots are exact zeros (not garbage) so a dense engine with masked attention sees
    # the same bits whatever the pool held before.
    past_k = np.zeros((n_layer, batch, n_head, n_tok, head_dim), dtype=pool.dtype)
    past_v = np.zeros_like(past_k)
    past_lag = np.full((batch, n_tok), LAG_EMPTY, dtype=np.int32)
    for b in range(batch):
        for j, e in enumerate(range(kv_indptr[b], kv_indptr[b + 1])):
            page, valid = kv_indices[e], page_valid[e]
            lo = j * page_tokens
            past_k[:, b, :, lo:lo + valid] = pool[page, :, 0, :, :valid]
            past_v[:, b, :, lo:lo + valid] = pool[page, :, 1, :, :valid]
            past_lag[b, lo:lo + valid] = page_lag[e]
    return past_k, past_v, past_lag


def paged_attention(q: np.ndarray, pool: np.ndarray, layer: int, kv_indptr: np.ndarray,
                    kv_indices: np.ndarray, page_lag: np.ndarray, page_valid: np.ndarray,
                    lag_bias: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Attention of ``q [B,H,Q,D]`` over each session's cached pages; returns ``(out, lse)``."""
    num_pages, n_layer, n_head, page_tokens, head_dim = _check_pool(pool)
    batch = _check_table(num_pages, page_tokens, kv_indptr, kv_indices, page_lag, page_valid)
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layer:
        raise ValueError(f"layer must be an int in [0, L={n_layer}), got {layer!r}")
    if not isinstance(q, np.ndarray) or q.ndim != 4 or q.shape[0] != batch or q.shape[1] != n_head \
            or q.shape[3] != head_dim:
        got = q.shape if isinstance(q, np.ndarray) else type(q).__name__
        raise ValueError(f"q must have shape [B={batch}, H={n_head}, Q, D={head_dim}], got {got}")
    if q.dtype not in POOL_DTYPES:
        raise TypeError(f"q dtype must be float32 or float16, got {q.dtype}")
    if not isinstance(lag_bias, np.ndarray) or lag_bias.dtype != np.float32 or lag_bias.ndim != 2 \
            or lag_bias.shape[0] != n_head or lag_bias.shape[1] < 2:
        got = f"{lag_bias.dtype} {lag_bias.shape}" if isinstance(lag_bias, np.ndarray) else type(lag_bias).__name__
        raise ValueError(f"lag_bias must be float32 [H={n_head}, W+2], got {got}")
    window = lag_bias.shape[1] - 2
    scale = np.float32(scale)
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    n_q = q.shape[2]
    out = np.zeros((batch, n_head, n_q, head_dim), dtype=np.float32)
    lse = np.full((batch, n_head, n_q), -np.inf, dtype=np.float32)
    qf = q.astype(np.float32)
    for b in range(batch):
        ks, vs, cols = [], [], []
        for e in range(kv_indptr[b], kv_indptr[b + 1]):
            valid = int(page_valid[e])
            if valid == 0:
                continue
            lag = int(page_lag[e])
            if lag != LAG_SINK and not 0 <= lag <= window:
                raise ValueError(f"page_lag[{e}]={lag} has no lag_bias column: expected -1 (sink) "
                                 f"or 0..W={window}")
            ks.append(pool[kv_indices[e], layer, 0, :, :valid].astype(np.float32))  # [H, v, D]
            vs.append(pool[kv_indices[e], layer, 1, :, :valid].astype(np.float32))
            cols.append(np.full(valid, window + 1 if lag == LAG_SINK else lag, dtype=np.int64))
        if not ks:
            continue  # no valid token: out 0, lse -inf (already set)
        k = np.concatenate(ks, axis=1)                           # [H, T, D]
        v = np.concatenate(vs, axis=1)
        bias = lag_bias[:, np.concatenate(cols)]                 # [H, T]
        s = scale * np.matmul(qf[b], k.transpose(0, 2, 1)) + bias[:, None, :]   # [H, Q, T]
        m = s.max(axis=-1, keepdims=True)
        p = np.exp(s - m)
        denom = p.sum(axis=-1, keepdims=True)
        out[b] = np.matmul(p, v) / denom
        lse[b] = (m + np.log(denom))[..., 0]
    return out, lse


def merge_states(out_a: np.ndarray, lse_a: np.ndarray, out_b: np.ndarray, lse_b: np.ndarray,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Merge two partial attentions over disjoint token sets (see module docstring)."""
    for name, a in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(a, np.ndarray) or a.dtype not in POOL_DTYPES:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise TypeError(f"{name} must be a float32/float16 numpy array, got {got}")
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"expected out_a, out_b of one shape [..., D] and lse_a, lse_b of shape "
                         f"[...]; got out {out_a.shape}/{out_b.shape}, lse {lse_a.shape}/{lse_b.shape}")
    la, lb = lse_a.astype(np.float32), lse_b.astype(np.float32)
    for name, l in (("lse_a", la), ("lse_b", lb)):
        if np.any(np.isnan(l) | (l == np.inf)):
            raise ValueError(f"{name} must be finite or -inf (empty), got NaN or +inf")
    m = np.maximum(la, lb)
    # Both sides empty -> m = -inf; shift by 0 instead so exp() gives exact zeros, not NaN.
    m = np.where(np.isneginf(m), np.float32(0), m)
    wa = np.exp(la - m)
    wb = np.exp(lb - m)
    denom = wa + wb
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (wa[..., None] * out_a.astype(np.float32) + wb[..., None] * out_b.astype(np.float32)) \
            / denom[..., None]
        lse = m + np.log(denom)
    empty = denom == 0
    out = np.where(empty[..., None], np.float32(0), out).astype(np.float32)
    lse = np.where(empty, np.float32(-np.inf), lse).astype(np.float32)
    return out, lse
