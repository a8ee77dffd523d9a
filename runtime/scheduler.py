"""The Engine: one backend, one page pool + pool tensor, all live sessions, one batched step per tick.

``tick()`` takes every open session with a frame's audio ready and runs them as one batch:

    build_page_table -> gather (dense past) -> backend.step (ONE call; a guided session's row
    twice, the second on silence, runtime/guidance.py) -> per-session sampling
    [-> refinement passes: backend.refine, once per extra pass, for the sessions opened with
    refine > 0 (runtime/refine.py)] -> backend.decode_codes (each session's expected codes or its
    tokens' codes, runtime/soft_decode.py) -> begin_step -> append -> each session's frame queue

(the call order ``runtime/page_table.py`` documents). Sessions join (``open_session``) and leave
(``close_session``) between any two ticks; they need not be at the same frame.

Admission: a session needs ``sink_frames + W`` pages for its whole life, and the engine reserves
them at open, so a running session can never hit a full pool mid-stream; a new session that would
not fit gets ``PoolFullError`` naming the pool size.

Isolation: a session whose own input fails (bad PCM, a portrait that does not encode, an error
building its step inputs) is closed, its pages freed, and the other sessions run on. If the batched
step itself raises, each session is retried alone to find the failing one(s); with a
batch-invariant backend the survivors' outputs are unchanged by that retry.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from .kv_cache import KVCache
from .page_pool import PagePool, PoolFullError
from .page_table import SessionPages, build_page_table
from .guidance import guide, resolve_guidance, silence_audio
from .refine import confidence, grow_known, hidden_after
from .session import Session, StreamState
from .soft_decode import check_decode, expected_codes

__all__ = ["Engine", "PoolFullError"]

log = logging.getLogger(__name__)


class Engine:
    """Serves many sessions on one backend. ``max_sessions`` sizes the pool (default ``cfg.max_batch``)."""

    def __init__(self, backend, max_sessions: int | None = None, num_pages: int | None = None):
        self.backend = backend
        self.cfg = cfg = backend.cfg
        self.pages_per_session = cfg.sink_frames + cfg.window
        if num_pages is None:
            n = cfg.max_batch if max_sessions is None else max_sessions
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"max_sessions must be a positive int, got {max_sessions!r}")
            num_pages = n * self.pages_per_session
        self.pool = PagePool(num_pages)
        self.cache = KVCache(num_pages, cfg, device=getattr(backend, "device", "cpu"))
        self.sessions: list[StreamState] = []
        # The dense past of the last batch size, reused tick after tick on a CPU pool: gather
        # overwrites all of it, the step only reads it, and nothing keeps it past the tick, so a
        # fresh 5 MB (tiny, per session) allocation per frame buys nothing. Not on a GPU, where a
        # backend may still be reading it asynchronously when the next tick gathers.
        self._reuse_dense = self.cache.pool.device.type == "cpu"
        self._dense = None
        self._ids = itertools.count()
        self._silence = None            # silence's audio tokens [A, F] (guidance), made on first use
        self.ticks = 0
        self.closed = False

    @property
    def capacity(self) -> int:
        """Sessions the pool can hold at once."""
        return self.pool.num_pages // self.pages_per_session

    # ------------------------------------------------------------------ sessions
    def open_session(self, portrait, *, realtime: bool = False, temperature: float = 0.0,
                     top_k: int | None = None, seed: int = 0, idle_motion: bool = True,
                     controls: dict | None = None, refine: int = 0, guidance: float | None = None,
                     decode: str | None = None, _owns_engine: bool = False) -> Session:
        """Encode the portrait, reserve and prefill the sink page(s); -> :class:`Session`.

        ``refine``: extra passes per frame (``runtime/refine.py``; a model trained with
        ``cfg.refine`` on a backend that runs them, else ValueError); 0 = one pass.
        ``guidance``: audio guidance scale (``runtime/guidance.py``); None = ``DEFAULT_GUIDANCE``,
        1 = off. A guided session takes two rows of the batched step. ``decode``: the frame shown
        is decoded from each cell's ``"expected"`` code under the step's probabilities (None, the
        default) or from its ``"tokens"`` (``runtime/soft_decode.py``).

        ``portrait``: uint8 RGB array [H, W, 3] or an image path. Raises ``PoolFullError`` when the
        pool cannot hold one more session; nothing is held on any error.
        """
        if self.closed:
            raise RuntimeError("Engine is closed")
        if len(self.sessions) + 1 > self.capacity:
            raise PoolFullError(
                f"KV page pool full: {len(self.sessions)} sessions already hold the pool of "
                f"{self.pool.num_pages} pages ({self.pages_per_session} pages per session, room for "
                f"{self.capacity}); close a session or build the Engine with a larger max_sessions")
        guidance = resolve_guidance(guidance)
        decode = check_decode(decode)
        limit = getattr(self.backend, "max_batch", None)
        guided = sum(s.guidance != 1.0 for s in self.sessions) + (guidance != 1.0)
        rows = len(self.sessions) + 1 + guided
        if limit is not None and rows > limit:
            raise PoolFullError(
                f"the {self.backend.name} backend steps at most {limit} rows at once (its engines' max batch); with "
                f"this session ({guidance=:g}) the batch would make {rows} rows ({guided} guided sessions, two "
                f"rows each); open it with guidance=1, close a session, or build the engines with a larger --max-batch")
        image = _load_portrait(portrait)
        tokens, ref = self.backend.encode_portrait(image)           # may raise: nothing held yet
        pages = SessionPages(self.pool, self.cfg)
        try:
            k, v = self.backend.prefill(tokens[None])
            k, v = _expand_sinks(k, v, self.cfg.sink_frames)
            self.cache.append(np.asarray(pages.sink_pages, np.int32), k, v)
            state = StreamState(next(self._ids), self.cfg, self.backend, pages, tokens, ref,
                                temperature=temperature, top_k=top_k, seed=seed, idle_motion=idle_motion,
                                refine=refine, guidance=guidance, decode=decode)
            if controls:
                state.control(None, **controls)
        except BaseException:
            pages.close()
            raise
        self.sessions.append(state)
        return Session(self, state, realtime=realtime, owns_engine=_owns_engine)

    def close_session(self, state: StreamState, reason: str = "closed by the user",
                      error: BaseException | None = None) -> None:
        state.close(reason, error)
        if state in self.sessions:
            self.sessions.remove(state)

    def close(self) -> None:
        """Close every session and the backend. Idempotent."""
        for s in list(self.sessions):
            self.close_session(s, "engine closed")
        if not self.closed:
            self.cache.close()  # releases CUDA kernels the cache loaded itself
            self._dense = None
        self.closed = True

    def _guard(self, state: StreamState, what: str, fn, *args):
        """Run a session's own work; on failure close that session (pages freed) and re-raise."""
        try:
            return fn(*args)
        except Exception as e:
            self.close_session(state, what, e)
            raise

    # ------------------------------------------------------------------ stepping
    def tick(self) -> int:
        """Step every session with a frame ready, as one batch. Returns the number stepped."""
        batch, inputs = [], []
        for s in [s for s in self.sessions if s.ready]:
            try:
                inputs.append(s.step_inputs())
                batch.append(s)
            except Exception as e:          # this session's input only: the others run on
                log.warning("session %d closed: its step input failed: %s", s.sid, e)
                self.close_session(s, "its step input failed", e)
        if not batch:
            return 0
        try:
            self._step(batch, inputs)
        except Exception:
            for s, inp in zip(batch, inputs):     # find the culprit(s); the others still step
                try:
                    self._step([s], [inp])
                except Exception as e:
                    log.warning("session %d closed: its step failed: %s", s.sid, e)
                    self.close_session(s, "its step failed", e)
        self.ticks += 1
        return len(batch)

    def _step(self, batch: list[StreamState], inputs) -> None:
        table = build_page_table([s.pages for s in batch])
        out = None
        if self._reuse_dense:
            if self._dense is None or self._dense[2].shape[0] != len(batch):
                self._dense = self.cache.empty_dense(len(batch))
            out = self._dense
        past_k, past_v, past_lag = self.cache.gather(table, out=out)
        audio = np.stack([i[0] for i in inputs])
        cond = np.stack([i[1] for i in inputs])
        cond_mask = np.stack([i[2] for i in inputs])
        prev = np.stack([s.prev_tokens for s in batch])
        logits, new_k, new_v = self._guided(self._backend_step, (prev, audio, cond, cond_mask, past_k, past_v, past_lag),
                                            [s.guidance for s in batch])
        tokens = np.stack([s.pick_tokens(logits[b]) for b, s in enumerate(batch)])
        if any(s.refine for s in batch):
            tokens, logits = self._refine(batch, (prev, audio, cond, cond_mask, past_k, past_v, past_lag), logits,
                                          tokens)
        images = self.backend.decode_codes(self._codes(batch, tokens, logits), np.stack([s.ref for s in batch]))
        # Nothing above changed any session: a failure there can be retried per session.
        pages = [s.pages.begin_step() for s in batch]
        self.cache.append(pages, new_k, new_v)
        for b, s in enumerate(batch):
            s.emit(tokens[b], images[b])

    def _codes(self, batch: list[StreamState], tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """[B,N,d]: what each session's frame decodes, its expected codes under ``logits`` (the ones
        its tokens were picked from) or its tokens' codes (``runtime/soft_decode.py``)."""
        table = self.backend.code_table
        return np.stack([expected_codes(logits[b], table) if s.decode == "expected" else table[tokens[b]]
                         for b, s in enumerate(batch)])

    def _backend_step(self, prev, audio, cond, cond_mask, past_k, past_v, past_lag):
        """The backend's step -> (logits numpy [B,N,V], new_k, new_v torch [L,B,H,P,D])."""
        step_torch = getattr(self.backend, "step_torch", None)
        if step_torch is not None:     # keeps K/V as torch tensors: no copy through numpy
            logits, new_k, new_v = step_torch(prev, audio, cond, cond_mask, past_k, past_v, past_lag)
            return logits.detach().cpu().numpy(), new_k, new_v
        # .cpu().numpy() / from_numpy are views on a CPU pool: the K/V bytes are not copied
        logits, new_k, new_v = self.backend.step(prev, audio, cond, cond_mask, past_k.cpu().numpy(),
                                                 past_v.cpu().numpy(), past_lag.cpu().numpy())
        return np.asarray(logits), torch.from_numpy(np.asarray(new_k)), torch.from_numpy(np.asarray(new_v))

    def _guided(self, fn, args, scales: list[float]):
        """``fn(prev, audio, cond, cond_mask, past_k, past_v, past_lag, *extra)`` -> logits (or a
        tuple starting with them, then tensors [L,B,...]) for B = len(scales) rows, in ONE call: the
        rows whose scale is not 1 go in again after the B rows with silence for their audio, and
        their logits are guided (``runtime/guidance.py``); everything else is of the B rows."""
        g = [b for b, s in enumerate(scales) if s != 1.0]
        if not g:
            return fn(*args)
        if self._silence is None:
            self._silence = silence_audio(self.backend)
        prev, audio, cond, cond_mask, past_k, past_v, past_lag, *extra = args
        both = lambda a: np.concatenate([a, a[g]])   # noqa: E731
        again = _past_rows((past_k, past_v, past_lag), g)
        out = fn(both(prev), np.concatenate([audio, np.broadcast_to(self._silence, (len(g),) + audio.shape[1:])]),
                 both(cond), both(cond_mask), torch.cat([past_k, again[0]], 1), torch.cat([past_v, again[1]], 1),
                 torch.cat([past_lag, again[2]]), *map(both, extra))
        logits, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        B = len(scales)
        logits = np.asarray(logits)
        guided = logits[:B].copy()
        guided[g] = guide(logits[g], logits[B:], np.asarray([scales[b] for b in g])[:, None, None])
        return guided if rest is None else (guided, *(r[:, :B] for r in rest))

    def _refine(self, batch: list[StreamState], step_args, logits: np.ndarray,
                tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The refinement passes of this tick's frame (``runtime/refine.py``): session b takes
        ``batch[b].refine`` more passes; pass j runs the sessions that still have one, as one batch.
        -> (tokens, logits): each token's logits are those of the pass that picked it."""
        N = self.cfg.tokens_per_frame
        tokens, logits = tokens.copy(), np.array(logits, copy=True)
        known = np.zeros(tokens.shape, bool)
        conf = confidence(logits)
        for b, s in enumerate(batch):
            if s.refine:
                known[b] = grow_known(known[b], conf[b], hidden_after(1, s.refine + 1, N))
        prev, audio, cond, cond_mask, past_k, past_v, past_lag = step_args
        for j in range(1, max(s.refine for s in batch) + 1):
            rows = [b for b, s in enumerate(batch) if s.refine >= j]
            past = (past_k, past_v, past_lag)
            if len(rows) < len(batch):          # the dense past of those sessions only
                past = _past_rows(past, rows)
            out = self._guided(self.backend.refine, (prev[rows], audio[rows], cond[rows], cond_mask[rows], *past,
                                                     tokens[rows], known[rows]), [batch[b].guidance for b in rows])
            out = np.asarray(out)
            for i, b in enumerate(rows):
                s, hide = batch[b], ~known[b]
                tokens[b, hide] = s.pick_tokens(out[i])[hide]
                logits[b, hide] = out[i][hide]
                c = confidence(out[i])
                known[b] = grow_known(known[b], np.where(hide, c, np.inf), hidden_after(j + 1, s.refine + 1, N))
        return tokens, logits

    def run_until_idle(self) -> int:
        """Tick until no session has a frame ready; returns the number of ticks."""
        n = 0
        while self.tick():
            n += 1
        return n

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Engine(backend={self.backend.name}, sessions={len(self.sessions)}/{self.capacity}, "
                f"pages={self.pool.num_used}/{self.pool.num_pages})")


def _past_rows(past, rows: list[int]):
    """The dense past ``(past_k, past_v, past_lag)`` of batch rows ``rows`` only (a copy)."""
    past_k, past_v, past_lag = past
    sel = torch.as_tensor(rows, device=past_k.device)
    return past_k.index_select(1, sel), past_v.index_select(1, sel), past_lag.index_select(0, sel.to(past_lag.device))


def _expand_sinks(k, v, sink_frames: int):
    """Prefill gives one sink page [L,1,H,P,D]; with several sink frames each holds the portrait."""
    k, v = torch.as_tensor(np.asarray(k)), torch.as_tensor(np.asarray(v))
    if sink_frames == 1:
        return k, v
    return k.expand(-1, sink_frames, -1, -1, -1).contiguous(), v.expand(-1, sink_frames, -1, -1, -1).contiguous()


def _load_portrait(portrait) -> np.ndarray:
    """An image path or array -> uint8 RGB array (validated further by ``encode_portrait``)."""
    if isinstance(portrait, np.ndarray):
        return portrait
    from pathlib import Path
    if isinstance(portrait, (str, Path)):
        from eartalk.data.image_io import read_image
        return read_image(portrait, "portrait")
    raise ValueError(f"portrait must be an image path or a uint8 RGB array [H, W, 3], got {type(portrait).__name__}")
