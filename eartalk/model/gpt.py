"""The frame transformer: GPT-style, one forward per video frame, Sink Frame Window Attention (SFA)
and Frame Condition In-Context (FCIC).

Step t sees the sequence ``[cond_t (C) | audio_t (A) | tokens_{t-1} (N) | N query slots]``. The
first P = C+A+N positions are the frame's *context*: their K/V become one cache page. The N query
slots predict the N tokens of frame t in parallel and are never cached, so a frame costs one call.

Attention sees: the sink page(s) (the portrait, prefilled once), the last W pages, and the current
frame. Context tokens do not see query slots (so a page's K/V does not depend on the queries and is
the same in training and streaming); query slots see everything of their frame. Temporal position is
a learned bias per (layer, head, frame lag) -- no absolute positions, so cached keys never change and
an hours-long stream never leaves the trained range. ``forward_train`` runs T frames at once under the
equivalent block mask (``sfa_mask``); the tests assert it matches ``prefill`` + ``step`` exactly.

Lag convention (shared with the runtime's ``past_lag``): -1 sink, -2 empty/invisible, 0 same frame,
1..W window. Bias table column: lag l -> l (clamped to [0, W]), sink -> W+1, -2 -> masked.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from eartalk.model.config import ModelConfig
from eartalk.model.tokenizer import fsq_digits, fsq_levels

SINK, EMPTY = -1, -2


def lag_bias(table: Tensor, lag: Tensor, window: int) -> Tensor:
    """Additive attention bias for frame lags: ``table`` [*T, W+2], ``lag`` int [*X] -> [*X, *T].

    A gather with clamping, no data-dependent control flow (ONNX/TensorRT friendly). Lags > W are
    clamped to W rather than rejected: the graph cannot raise, and the runtime never produces them.
    ``table`` may hold every layer's heads ([L, H, W+2]) so one gather serves the whole step.
    """
    lag = lag.long()
    col = torch.where(lag == SINK, torch.full_like(lag, window + 1), lag.clamp(0, window))
    lead = table.shape[:-1]
    bias = F.embedding(col, table.reshape(-1, window + 2).t())    # [*X, prod(T)]
    bias = bias.masked_fill((lag < SINK).unsqueeze(-1), float("-inf"))
    return bias.view(*lag.shape, *lead)


def sfa_mask(T: int, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """Visibility [L, L] bool and lag [L, L] int32 for the training sequence of T frames.

    Layout (L = P + T*(P+N)): sink context (P) then, per frame t, context_t (P) and queries_t (N).
    Row = query position, column = key position. ``lag`` holds -1 (sink), 0..W, or -2 where the
    key is invisible, i.e. exactly what ``step`` would see through ``past_lag`` and its own frame.
    """
    lag = _sfa_lag(T, cfg.page_tokens, cfg.tokens_per_frame, cfg.window).clone()
    return lag != EMPTY, lag


@functools.lru_cache(maxsize=8)   # training calls this with the same T every step
def _window_lags(T: int, P: int, N: int, W: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """For ``forward_train``'s per-frame keys [sink (P) | W window pages (W*P) | own rows (P+N)]:
    lag [T, K] int32 (-1 sink, W..1 window, -2 before frame 0, 0 own), the own-frame mask
    [P+N, K] (0 or -inf: context rows do not see their frame's query slots), and rows [T*K] int64:
    each key's row in [sink page (P) | a zero page (P) | the T frames' rows (T*(P+N))], so one
    ``index_select`` gathers every frame's keys (its backward is one index_add; an unfold of the
    window pages plus two cats was ~2x slower to train)."""
    t = torch.arange(T)[:, None]
    page_lag = (W - torch.arange(W))[None, :].expand(T, W)                    # oldest page first
    page = t - page_lag                                                        # [T, W] frame of each page
    page_lag = torch.where(page >= 0, page_lag, torch.full_like(page_lag, EMPTY))
    lag = torch.cat([torch.full((T, P), SINK), page_lag.repeat_interleave(P, dim=1),
                     torch.zeros(T, P + N, dtype=torch.long)], dim=1).to(torch.int32)
    mask = torch.zeros(P + N, lag.shape[1])
    mask[:P, lag.shape[1] - N:] = float("-inf")
    ctx = torch.where(page[..., None] >= 0, 2 * P + page[..., None] * (P + N) + torch.arange(P),
                      P + torch.arange(P))                                      # missing page: zeros
    rows = torch.cat([torch.arange(P).expand(T, P), ctx.reshape(T, W * P),
                      2 * P + t * (P + N) + torch.arange(P + N)], dim=1)
    return lag.to(device), mask.to(device), rows.reshape(-1).to(device)


@functools.lru_cache(maxsize=8)
def _sfa_lag(T: int, P: int, N: int, W: int) -> Tensor:
    if T < 1:
        raise ValueError(f"need at least one frame, got T={T}")
    frame = torch.cat([torch.full((P,), -1), torch.arange(T).repeat_interleave(P + N)])
    is_query = torch.cat([torch.zeros(P, dtype=torch.bool), torch.tensor([False] * P + [True] * N).repeat(T)])
    is_sink = frame == -1
    fr, fc = frame[:, None], frame[None, :]
    d = fr - fc                                                   # frame lag of column vs row
    lag = torch.full((len(frame), len(frame)), EMPTY, dtype=torch.int32)
    # The sink page was prefilled alone: it sees only itself, as its own frame (lag 0).
    lag[is_sink[:, None] & is_sink[None, :]] = 0
    rows = ~is_sink[:, None]
    lag[rows & is_sink[None, :]] = SINK
    ctx_cols = rows & ~is_sink[None, :] & ~is_query[None, :] & (d >= 0) & (d <= W)
    lag[ctx_cols] = d[ctx_cols].to(torch.int32)
    # Query slots are seen only by the query slots of their own frame.
    lag[is_query[:, None] & is_query[None, :] & (d == 0)] = 0
    return lag


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cur_bias: Tensor, past_k: Tensor | None = None,
                past_v: Tensor | None = None, past_bias: Tensor | None = None, keep: int | None = None):
        """x [B,T,d]; cur_bias [1|B,H,T,T]; past_k/v [B,H,S,D]; past_bias [B,H,1,S].

        ``keep``: only the last ``keep`` rows' outputs are wanted (K/V are still of all T rows).

        Plain matmul + softmax (not SDPA): exports to the same few ONNX ops on every backend and
        lets the past and current scores carry differently shaped biases without materialising a
        [B,H,T,S+T] bias tensor. Returns (out [B,T,d], k, v [B,H,T,D]) so the caller can cache K/V.
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if keep is not None:
            q, cur_bias = q[:, :, T - keep:], cur_bias[..., T - keep:, :]
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = (q @ k.transpose(-2, -1)) * scale + cur_bias
        vals = v
        if past_k is not None:
            past_scores = (q @ past_k.transpose(-2, -1)) * scale + past_bias
            scores = torch.cat([past_scores, scores], dim=-1)
            vals = torch.cat([past_v, v], dim=2)
        y = torch.softmax(scores, dim=-1) @ vals                  # [B,H,T,D]
        return self.proj(y.transpose(1, 2).reshape(B, q.shape[2], -1)), k, v


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)   # LayerNormalization is a single op in opset 17+
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x, cur_bias, past_k=None, past_v=None, past_bias=None, keep=None):
        a, k, v = self.attn(self.ln1(x), cur_bias, past_k, past_v, past_bias, keep)
        x = (x if keep is None else x[:, x.shape[1] - keep:]) + a
        return x + self.mlp(self.ln2(x)), k, v


class EARTalkGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, query_hidden: int = 256):
        super().__init__()
        self.cfg = cfg
        C, A, N, P, d = cfg.cond_tokens, cfg.audio_tokens, cfg.tokens_per_frame, cfg.page_tokens, cfg.d_model
        self.cond_proj = nn.Linear(cfg.cond_dim, d)
        self.cond_kind = nn.Parameter(torch.zeros(C, d))
        # "free" (not pinned) must differ from "pinned at 0": it gets its own learned vector per kind.
        self.cond_free = nn.Parameter(torch.zeros(C, d))
        self.audio_proj = nn.Linear(cfg.audio_dim, d)
        # The sink page has no audio at all, which is not the same thing as silence.
        self.audio_null = nn.Parameter(torch.zeros(A, d))
        # Codes are FSQ digit tuples (8x8x8 for V=512): neighbouring digits are neighbouring images.
        # Tokens are embedded per code plus per digit, and predicted per digit (V logits = the sum
        # of the code's digit logits, so CE over V is the sum of per-digit CEs): "this digit moves
        # up one level" is learnt once for all codes instead of once per code pair.
        levels = fsq_levels(cfg.codebook_size)
        self.digit_levels = tuple(levels)
        offset = torch.tensor([sum(levels[:i]) for i in range(len(levels))])
        self.register_buffer("code_digits", (fsq_digits(torch.arange(cfg.codebook_size), levels) + offset).t(),
                             persistent=False)   # [digits, V]: row i = digit i's index into digit_emb/head
        self.tok_emb = nn.Embedding(cfg.codebook_size, d)
        self.digit_emb = nn.Embedding(sum(levels), d)
        # Spatial position in the frame layout: one vector per context slot (C + A + N). Query slot i
        # shares token position i's vector (plus one "query" vector), so "the token at my position"
        # is the same key from the first step on instead of a pairing to learn for each of N slots.
        self.slot_emb = nn.Parameter(torch.zeros(P, d))
        self.query_emb = nn.Parameter(torch.zeros(1, d))
        # The frame's own condition and audio tokens also reach its query slots directly: one
        # two-layer map of the C + A context embeddings to a vector per slot (N x d). Through
        # attention alone they are 6 keys among ~700 (sink, window pages, previous tokens) and the
        # model learnt to copy the previous frame long before it learnt to look at them: at step
        # 400 of the recipe its frames did not move at all, even with every control pinned. Until
        # 2026-12-04 the map was one vector added to every slot and slot i started from the
        # previous frame's token i, the copy path (step 1,000 of that run: 0.2% of tokens changed
        # per frame free-running against 5.8% in the ground truth); codes tied to the face state
        # (tokenizer state_head) are a function of the controls and the mouth instead.
        self.query_cond = nn.Sequential(nn.Linear((C + A) * d, query_hidden), nn.GELU(),
                                        nn.Linear(query_hidden, N * d))
        # Refinement (cfg.refine): a known draft token enters its query slot as its code's embedding
        # plus this marker; unknown slots get nothing, so a pass without a draft is the plain step.
        self.draft_known = nn.Parameter(torch.zeros(1, d)) if cfg.refine else None
        self.lag_bias = nn.Parameter(torch.zeros(cfg.n_layer, cfg.n_head, cfg.window + 2))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, sum(levels), bias=False)    # per-digit logits
        # Within one step: context rows see the context; query rows see context and queries.
        frame_lag = torch.zeros(P + N, P + N, dtype=torch.int32)
        frame_lag[:P, P:] = EMPTY
        self.register_buffer("frame_lag", frame_lag, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = 0.02
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():   # a code's embedding starts as the sum of its digits' (ordinal structure)
            self.tok_emb.weight.zero_()
        for p in (self.cond_kind, self.cond_free, self.audio_null, self.query_emb, self.slot_emb, self.draft_known):
            if p is not None:
                nn.init.normal_(p, 0.0, std)
        # GPT-2: residual branches scaled so the residual stream's variance does not grow with depth.
        for blk in self.blocks:
            nn.init.normal_(blk.attn.proj.weight, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            nn.init.normal_(blk.mlp[2].weight, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
        # ALiBi-like prior: head h decays with lag at its own slope (some heads local, some long),
        # sinks start at 0 so identity is visible from the first step.
        H, W = self.cfg.n_head, self.cfg.window
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
        with torch.no_grad():
            self.lag_bias.zero_()
            self.lag_bias[:, :, : W + 1] = -slopes[:, None] * torch.arange(W + 1)
        self._init_sink_lookup()

    def _init_sink_lookup(self, match: float = 10.0, sink: float = 5.0):
        """Layer 0, head 0 starts as "read the portrait's token at my position".

        Query slot i and the sink's token i share slot_emb[C+A+i]. Token positions get orthogonal
        slot vectors (larger than the token embeddings, so they dominate ``ln1``) and head 0's
        W_q = W_k project onto them: q_i . k_j / sqrt(D) ~ ``match`` for i == j, ~0 otherwise; the
        sink column of its lag bias is raised by ``sink``. Why: the 2026-12-02 run copied the
        previous frame and, with every input token replaced by noise, got 9.7% of tokens right; the
        portrait-to-frame map needs the sink token at one's own position, one key among ~700.
        Measured since (2026-12-03 run, docs/model-card.md): the run still copied; the limit found
        there is the tokenizer's flickering codes, not this lookup.
        """
        c = self.cfg
        ca, N, D, d = c.cond_tokens + c.audio_tokens, c.tokens_per_frame, c.head_dim, c.d_model
        n = min(N, D)
        g = torch.Generator().manual_seed(0)
        basis = torch.linalg.qr(torch.randn(d, n, generator=g))[0].t()          # [n, d] orthonormal rows
        pos = torch.arange(N) % n      # more positions than head dims (tiny test presets): shared
        with torch.no_grad():
            # |slot| = 1 against |token| ~ 0.02 * sqrt(3 d): after ln1 (norm sqrt(d)) slot ~ 0.9 sqrt(d)
            self.slot_emb[ca:] = basis[pos]
            scale = math.sqrt(match * math.sqrt(D) / (0.8 * d))   # q.k = scale^2 * 0.8 d for i == j
            qkv = self.blocks[0].attn.qkv.weight             # rows [q heads | k heads | v heads]
            qkv[:n] = scale * basis
            qkv[d:d + n] = scale * basis
            if n < D:
                qkv[n:D].zero_()
                qkv[d + n:d + D].zero_()
            self.lag_bias[0, 0, : c.window + 1] = 0.0
            self.lag_bias[0, 0, c.window + 1] = sink

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- embeddings
    def _context(self, prev_emb: Tensor, audio_emb: Tensor, cond: Tensor | None,
                 cond_mask: Tensor | None) -> Tensor:
        """[B,P,d] context embeddings from ``embed_tokens(prev_tokens)``; cond None = all kinds free."""
        B = prev_emb.shape[0]
        if cond is None:
            c = self.cond_free.expand(B, -1, -1)
        else:
            c = torch.where(cond_mask.unsqueeze(-1), self.cond_proj(cond), self.cond_free)
        c = c + self.cond_kind
        return torch.cat([c, audio_emb, prev_emb], dim=1) + self.slot_emb

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """[..., d] embeddings of codes: the code's own vector plus its FSQ digits' vectors."""
        table = self.tok_emb.weight + sum(self.digit_emb(d) for d in self.code_digits)   # [V, d]
        return F.embedding(tokens, table)

    def code_logits(self, digit_logits: Tensor) -> Tensor:
        """[..., sum(levels)] per-digit logits -> [..., V]: each code's digits' logits added in a
        fixed order (exact, batch-invariant, plain Gather/Add in ONNX)."""
        out = digit_logits[..., self.code_digits[0]]
        for d in self.code_digits[1:]:
            out = out + digit_logits[..., d]
        return out

    def _draft(self, draft: Tensor | None, known: Tensor | None) -> Tensor | float:
        """What a draft adds to the query slots: [B,N,d] (``draft`` int64 [B,N] codes, ``known``
        bool [B,N]: which of them to trust), or 0 without a draft."""
        if draft is None and known is None:
            return 0.0
        if not self.cfg.refine:
            raise ValueError("this model was not trained to refine (its config has refine=False): "
                             "it takes no draft tokens; use a model trained with refinement or refine=0")
        if draft is None or known is None or tuple(draft.shape) != tuple(known.shape) or draft.shape[-1] != self.cfg.tokens_per_frame:
            raise ValueError(f"draft and draft_known must both be given, of shape [B, {self.cfg.tokens_per_frame}]; got "
                             f"{None if draft is None else tuple(draft.shape)} and {None if known is None else tuple(known.shape)}")
        emb = self.embed_tokens(draft) + self.draft_known
        return torch.where(known.unsqueeze(-1), emb, torch.zeros_like(emb))

    def _queries(self, ctx: Tensor, draft: Tensor | None = None, known: Tensor | None = None) -> Tensor:
        """[B,N,d] query slots from the frame's context embeddings ``ctx`` [B,P,d]: query slot i is
        token position i's slot vector plus the query vector plus its own vector of ``query_cond``,
        a map of the frame's C condition and A audio embeddings. The previous frame's tokens are
        reached through attention only (they are context rows of the frame).

        History of this choice (recipe runs, validation windows): slots with position only and no
        direct condition path got 33% of tokens right at step 400 and never moved; slots that
        started from the previous frame's token i copied it (every run to 2026-12-04). Since the
        tokenizer's codes are tied to the face state, the controls and the audio predict a slot's
        code, so each slot gets its own map of them and no copy of its previous token."""
        c = self.cfg
        ca, N = c.cond_tokens + c.audio_tokens, c.tokens_per_frame
        frame = self.query_cond(ctx[:, :ca].flatten(1)).view(ctx.shape[0], N, -1)   # [B,N,d]
        return self.query_emb + self.slot_emb[ca:] + frame + self._draft(draft, known)

    def _digit_logits(self, x: Tensor) -> Tensor:
        return F.linear(self.ln_f(x), self._centered_head())

    def _logits(self, x: Tensor) -> Tensor:
        return self.code_logits(self._digit_logits(x))

    def code_nll(self, digit_logits: Tensor, tokens: Tensor) -> Tensor:
        """Per-token cross-entropy over the V codes, float32 [...], from digit logits [..., sum(levels)]
        and codes [...]. Every digit tuple is a code (V = prod(levels)) and a code's logit is the sum
        of its digits', so the code softmax factorises into one softmax per digit and the CE is the
        sum of the digits' CEs: the same value as over :meth:`code_logits` without the [..., V]
        logits (whose gather backward was ~7% of a training step)."""
        assert math.prod(self.digit_levels) == self.cfg.codebook_size, "a digit tuple that is not a code"
        want = fsq_digits(tokens, self.digit_levels)                              # [..., digits]
        parts = digit_logits.float().split(self.digit_levels, dim=-1)
        return sum(-torch.log_softmax(part, dim=-1).gather(-1, want[..., i:i + 1]).squeeze(-1)
                   for i, part in enumerate(parts))

    def _centered_head(self) -> Tensor:
        """The head's weight with each digit's rows centred. A constant added to all of one digit's
        logits changes no softmax, CE or argmax, so training lets those offsets drift: the
        2026-12-04 recipe run's code logits sat near 170, where float32's spacing (1.5e-5) makes
        two correct implementations differ by ~1e-4. Centring removes that null direction: same
        probabilities, logits near 0. Slices, not ``split``: the ONNX exporter folds slices of a
        weight into one initializer (so the quantizer sees a weighted MatMul) but not a Split."""
        w, parts, start = self.head.weight, [], 0
        for n in self.digit_levels:
            g = w[start:start + n]
            parts.append(g - g.mean(0, keepdim=True))
            start += n
        return torch.cat(parts)

    # ---- streaming
    def prefill(self, portrait_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Sink page from the portrait's N tokens: (sink_k, sink_v) [L,B,H,P,D].

        The context part of a step with all conditions free, no audio and prev tokens = portrait.
        """
        self._check_tokens(portrait_tokens, "portrait_tokens")
        B, P = portrait_tokens.shape[0], self.cfg.page_tokens
        x = self._context(self.embed_tokens(portrait_tokens), self.audio_null.expand(B, -1, -1), None, None)
        cur = lag_bias(self.lag_bias, self.frame_lag[:P, :P], self.cfg.window).permute(2, 3, 0, 1)
        ks, vs = [], []
        for l, blk in enumerate(self.blocks):
            x, k, v = blk(x, cur[l].unsqueeze(0))
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs)

    def step(self, prev_tokens: Tensor, audio: Tensor, cond: Tensor, cond_mask: Tensor,
             past_k: Tensor, past_v: Tensor, past_lag: Tensor, draft: Tensor | None = None,
             draft_known: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One frame (see ``shared/design.md``, the step contract).

        prev_tokens int64 [B,N], audio [B,A,F], cond [B,C,Dc], cond_mask bool [B,C],
        past_k/past_v [L,B,H,S,D], past_lag int32 [B,S] -> logits [B,N,V], new_k/new_v [L,B,H,P,D].

        ``draft`` int64 [B,N] / ``draft_known`` bool [B,N] (models with ``cfg.refine``): a refinement
        pass of the same frame, its known draft tokens in their query slots. Context rows never see
        query slots, so new_k/new_v are those of the pass without a draft.
        """
        self._check_step(prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag)
        P, W = self.cfg.page_tokens, self.cfg.window
        prev_emb = self.embed_tokens(prev_tokens)
        ctx = self._context(prev_emb, self.audio_proj(audio), cond, cond_mask)
        x = torch.cat([ctx, self._queries(ctx, draft, draft_known)], dim=1)
        past = lag_bias(self.lag_bias, past_lag, W).permute(2, 0, 3, 1).unsqueeze(3)  # [L,B,H,1,S]
        cur = lag_bias(self.lag_bias, self.frame_lag, W).permute(2, 3, 0, 1)          # [L,H,P+N,P+N]
        ks, vs = [], []
        for l, blk in enumerate(self.blocks):
            # The last layer's context rows only matter through their K/V: skip their attention
            # output and MLP (~(P/(P+N)) of that layer's work).
            keep = self.cfg.tokens_per_frame if l == len(self.blocks) - 1 else None
            x, k, v = blk(x, cur[l].unsqueeze(0), past_k[l], past_v[l], past[l], keep)
            ks.append(k[:, :, :P])
            vs.append(v[:, :, :P])
        return self._logits(x[:, -self.cfg.tokens_per_frame:]), torch.stack(ks), torch.stack(vs)

    def empty_cache(self, batch: int, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """(past_k, past_v, past_lag) with every slot empty: zeros and lag -2."""
        c = self.cfg
        shape = (c.n_layer, batch, c.n_head, c.cache_tokens, c.head_dim)
        return (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype),
                torch.full((batch, c.cache_tokens), EMPTY, dtype=torch.int32))

    # ---- training
    def forward_train(self, tokens: Tensor, portrait_tokens: Tensor, audio: Tensor, cond: Tensor,
                      cond_mask: Tensor, prev_first: Tensor | None = None, digits: bool = False,
                      draft: Tensor | None = None, draft_known: Tensor | None = None) -> Tensor:
        """Teacher forcing of T frames under SFA -> logits [B,T,N,V] (``digits``: the per-digit
        logits [B,T,N,sum(levels)] instead, for :meth:`code_nll`).

        tokens [B,T,N] (frame 0 = first frame after the portrait), portrait_tokens [B,N],
        audio [B,T,A,F], cond [B,T,C,Dc], cond_mask bool [B,T,C]. ``prev_first`` [B,N]: the
        tokens frame 0 reads as its previous frame (default: the portrait's, as at a stream's
        start); training on windows cut from the middle of a clip passes the frame before.
        ``draft`` int64 [B,T,N] / ``draft_known`` bool [B,T,N]: each frame's draft, as ``step`` takes it.

        Each frame's rows attend only to the keys ``step`` would see, gathered per frame: the sink
        page, the W pages before it (missing ones masked) and its own P+N rows, i.e. the visible
        blocks of ``sfa_mask`` without the ~(1 - (W+2)/T) of the full [L, L] score matrix that the
        mask hides. Equal to :meth:`_forward_train_masked` (the full-mask reference) and to
        ``prefill`` + ``step`` frame by frame (tested); about 3x faster to train.
        """
        c = self.cfg
        B, T, sink, ctx, qry = self._train_inputs(tokens, portrait_tokens, audio, cond, cond_mask, prev_first,
                                                  draft, draft_known)
        P, N, W, H, D = c.page_tokens, c.tokens_per_frame, c.window, c.n_head, c.head_dim
        lag_keys, own_mask, rows = _window_lags(T, P, N, W, tokens.device)
        x = torch.cat([ctx.view(B, T, P, -1), qry.view(B, T, N, -1)], dim=2)    # [B,T,P+N,d]
        scale = 1.0 / math.sqrt(D)
        sink_lag = torch.zeros(P, P, dtype=torch.int32, device=tokens.device)

        def frame_keys(a: Tensor, sink_a: Tensor) -> Tensor:
            """[B,H,T,K,D]: frame t's keys (or values), sink | contexts of frames t-W .. t-1
            (zeros before frame 0) | its own rows."""
            src = torch.cat([sink_a, sink_a.new_zeros(B, H, P, D), a.reshape(B, H, T * (P + N), D)], dim=2)
            return src.index_select(2, rows).view(B, H, T, -1, D)

        for l, blk in enumerate(self.blocks):
            # the sink page: prefilled alone, it sees only itself (lag 0)
            sink, sk, sv = blk(sink, lag_bias(self.lag_bias[l], sink_lag, W).permute(2, 0, 1).unsqueeze(0))
            h = blk.ln1(x)
            q, k, v = blk.attn.qkv(h).view(B, T, P + N, 3, H, D).permute(3, 0, 4, 1, 2, 5)  # [B,H,T,P+N,D]
            keys, vals = frame_keys(k, sk), frame_keys(v, sv)
            bias = lag_bias(self.lag_bias[l], lag_keys, W).permute(2, 0, 1).unsqueeze(2) + own_mask  # [H,T,P+N,K]
            scores = (q * scale) @ keys.transpose(-2, -1)                            # [B,H,T,P+N,K]
            # Under bf16 autocast the scores, their bias and the softmax stay bf16 (the softmax
            # accumulates in float32 internally): the float32 round trips of this, the largest
            # tensor of a step, were ~3/4 of a training step's time (1.5x faster without them).
            scores = scores + bias.to(scores.dtype)
            with torch.autocast("cpu", enabled=False):
                p = torch.softmax(scores, dim=-1)
            y = (p @ vals).permute(0, 2, 3, 1, 4).reshape(B, T, P + N, H * D)
            x = x + blk.attn.proj(y)
            x = x + blk.mlp(blk.ln2(x))
        return self._digit_logits(x[:, :, P:]) if digits else self._logits(x[:, :, P:])

    def _forward_train_masked(self, tokens: Tensor, portrait_tokens: Tensor, audio: Tensor, cond: Tensor,
                              cond_mask: Tensor, prev_first: Tensor | None = None, draft: Tensor | None = None,
                              draft_known: Tensor | None = None) -> Tensor:
        """Reference for :meth:`forward_train`: the whole sequence under the [L, L] ``sfa_mask``."""
        c = self.cfg
        B, T, sink, ctx, qry = self._train_inputs(tokens, portrait_tokens, audio, cond, cond_mask, prev_first,
                                                  draft, draft_known)
        P, N = c.page_tokens, c.tokens_per_frame
        frames = torch.cat([ctx, qry], dim=1).view(B, T * (P + N), -1)
        x = torch.cat([sink, frames], dim=1)
        lag = _sfa_lag(T, P, N, c.window).to(tokens.device)
        for l, blk in enumerate(self.blocks):
            # one layer's [1,H,L,L] bias at a time: all layers at once would be L x the memory
            x, _, _ = blk(x, lag_bias(self.lag_bias[l], lag, c.window).permute(2, 0, 1).unsqueeze(0))
        q = x[:, P:].view(B, T, P + N, -1)[:, :, P:]
        return self._logits(q)

    def _train_inputs(self, tokens, portrait_tokens, audio, cond, cond_mask, prev_first, draft=None, draft_known=None):
        """Checked shapes -> (B, T, sink context [B,P,d], contexts [B*T,P,d], queries [B*T,N,d])."""
        c = self.cfg
        B, T = tokens.shape[:2]
        N = c.tokens_per_frame
        self._check_tokens(portrait_tokens, "portrait_tokens")
        for name, t, tail in (("tokens", tokens, (N,)), ("audio", audio, (c.audio_tokens, c.audio_dim)),
                              ("cond", cond, (c.cond_tokens, c.cond_dim)), ("cond_mask", cond_mask, (c.cond_tokens,))):
            if tuple(t.shape) != (B, T, *tail):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(B, T, *tail)}")
        first = portrait_tokens if prev_first is None else prev_first
        prev = torch.cat([first[:, None], tokens[:, :-1]], dim=1)  # frame t reads frame t-1
        flat = lambda t: t.reshape(B * T, *t.shape[2:])  # noqa: E731
        prev_emb, port_emb = self.embed_tokens(flat(prev)), self.embed_tokens(portrait_tokens)
        ctx = self._context(prev_emb, self.audio_proj(flat(audio)), flat(cond), flat(cond_mask))
        sink = self._context(port_emb, self.audio_null.expand(B, -1, -1), None, None)
        drafts = (None, None) if draft is None and draft_known is None else \
            (None if draft is None else flat(draft), None if draft_known is None else flat(draft_known))
        return B, T, sink, ctx, self._queries(ctx, *drafts)

    # ---- input checks (shapes only: static, so they vanish from an exported graph)
    def _check_tokens(self, t: Tensor, name: str):
        if t.dim() != 2 or t.shape[1] != self.cfg.tokens_per_frame:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B, {self.cfg.tokens_per_frame}]")

    def _check_step(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag):
        c = self.cfg
        B = prev_tokens.shape[0]
        kv = (c.n_layer, B, c.n_head, c.cache_tokens, c.head_dim)
        want = {"prev_tokens": (prev_tokens, (B, c.tokens_per_frame)),
                "audio": (audio, (B, c.audio_tokens, c.audio_dim)),
                "cond": (cond, (B, c.cond_tokens, c.cond_dim)),
                "cond_mask": (cond_mask, (B, c.cond_tokens)),
                "past_k": (past_k, kv), "past_v": (past_v, kv),
                "past_lag": (past_lag, (B, c.cache_tokens))}
        for name, (t, shape) in want.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"step input {name} has shape {tuple(t.shape)}; expected {list(shape)} "
                                 f"(L, B, H, S, D = {c.n_layer}, B, {c.n_head}, {c.cache_tokens}, {c.head_dim})")
        if cond_mask.dtype != torch.bool:
            raise ValueError(f"cond_mask must be bool, got {cond_mask.dtype}")


class StepModule(nn.Module):
    """``model.step`` as ``forward``, for torch.onnx.export / torch.export."""
    input_names = ["prev_tokens", "audio", "cond", "cond_mask", "past_k", "past_v", "past_lag"]
    output_names = ["logits", "new_k", "new_v"]

    def __init__(self, model: EARTalkGPT):
        super().__init__()
        self.model = model

    def forward(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag):
        return self.model.step(prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag)


class RefineModule(nn.Module):
    """A refinement pass (``model.step`` with a draft) as ``forward`` -> logits only: its K/V are
    those of the step already made for the frame (context rows never see query slots)."""
    input_names = StepModule.input_names + ["draft", "draft_known"]
    output_names = ["logits"]

    def __init__(self, model: EARTalkGPT):
        super().__init__()
        self.model = model

    def forward(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag, draft, draft_known):
        return self.model.step(prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag, draft, draft_known)[0]


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Token ids [...] from logits [..., V]: argmax at temperature 0, else top-k/temperature sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    V = logits.shape[-1]
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    z = logits.float() / temperature
    if top_k is not None and top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z.reshape(-1, V), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
