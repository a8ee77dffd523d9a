"""The frame transformer: SFA mask (golden), streaming == training, FCIC causality, ONNX export."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eartalk.model.conditions import encode_controls
from eartalk.model.config import ModelConfig, preset
from eartalk.model.gpt import EARTalkGPT, StepModule, lag_bias, sample, sfa_mask


def make_model(seed=0, **overrides) -> EARTalkGPT:
    torch.manual_seed(seed)
    m = EARTalkGPT(preset("test", **overrides)).eval()
    # The default init is near-zero for embeddings and smooth for lag biases: perturb everything so a
    # mistake in a mask, a lag column or an embedding cannot hide behind small numbers.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        m.lag_bias.normal_(0.0, 1.0)
    return m


def random_inputs(cfg: ModelConfig, B: int, T: int, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.codebook_size, (B, T, cfg.tokens_per_frame), generator=g)
    portrait = torch.randint(0, cfg.codebook_size, (B, cfg.tokens_per_frame), generator=g)
    audio = torch.randn(B, T, cfg.audio_tokens, cfg.audio_dim, generator=g)
    cond = torch.randn(B, T, cfg.cond_tokens, cfg.cond_dim, generator=g)
    mask = torch.rand(B, T, cfg.cond_tokens, generator=g) < 0.5
    return tokens, portrait, audio, cond, mask


def stream(model, portrait, tokens, audio, cond, mask, draft=None, known=None):
    """Prefill + step frame by frame through a page cache: sinks first, then the window oldest ->
    newest, empty slots zero with lag -2; the oldest window page is dropped after W frames."""
    cfg = model.cfg
    B, T = tokens.shape[:2]
    P, W = cfg.page_tokens, cfg.window
    sink_k, sink_v = model.prefill(portrait)
    window, out, prev = [], [], portrait
    for t in range(T):
        past_k, past_v, past_lag = model.empty_cache(B)
        pages = [(sink_k, sink_v, -1)] + [(k, v, len(window) - i) for i, (k, v) in enumerate(window)]
        for j, (k, v, lag) in enumerate(pages):
            past_k[:, :, :, j * P:(j + 1) * P] = k
            past_v[:, :, :, j * P:(j + 1) * P] = v
            past_lag[:, j * P:(j + 1) * P] = lag
        drafts = {} if draft is None else {"draft": draft[:, t], "draft_known": known[:, t]}
        logits, nk, nv = model.step(prev, audio[:, t], cond[:, t], mask[:, t], past_k, past_v, past_lag, **drafts)
        assert nk.shape == (cfg.n_layer, B, cfg.n_head, P, cfg.head_dim) == nv.shape
        window = (window + [(nk, nv)])[-W:]
        prev = tokens[:, t]
        out.append(logits)
    return torch.stack(out, dim=1)


def test_sfa_mask_golden():
    # One cond, one audio, one frame token: P = 3, N = 1; W = 2 so frame 3 no longer sees frame 0.
    cfg = ModelConfig(cond_tokens=1, audio_tokens=1, token_grid=1, window=2)
    assert (cfg.page_tokens, cfg.tokens_per_frame) == (3, 1)
    # '.' invisible (-2), 's' sink (-1), digits = frame lag. Columns/rows:
    # sink(3) | ctx0(3) q0 | ctx1(3) q1 | ctx2(3) q2 | ctx3(3) q3
    rows = [
        "000................",  # sink context: only itself, as its own frame
        "000................",
        "000................",
        "sss000.............",  # ctx0: sink + own context, never a query slot
        "sss000.............",
        "sss000.............",
        "sss0000............",  # q0: sink + own context + own queries
        "sss111.000.........",  # ctx1
        "sss111.000.........",
        "sss111.000.........",
        "sss111.0000........",  # q1
        "sss222.111.000.....",  # ctx2: frame 0 at lag 2 = W, still visible
        "sss222.111.000.....",
        "sss222.111.000.....",
        "sss222.111.0000....",  # q2
        "sss....222.111.000.",  # ctx3: frame 0 (lag 3 > W) has left the window
        "sss....222.111.000.",
        "sss....222.111.000.",
        "sss....222.111.0000",  # q3
    ]
    code = {".": -2, "s": -1}
    expected = torch.tensor([[code[ch] if ch in code else int(ch) for ch in r] for r in rows],
                            dtype=torch.int32)
    visible, lag = sfa_mask(4, cfg)
    assert lag.dtype == torch.int32 and visible.dtype == torch.bool
    assert torch.equal(lag, expected)
    assert torch.equal(visible, expected != -2)


def test_lag_bias_columns():
    W = 3
    table = torch.arange(2 * (W + 2), dtype=torch.float32).view(2, W + 2)  # [H=2, W+2]
    lag = torch.tensor([[-1, -2, 0, 1, 3, 7]], dtype=torch.int32)
    b = lag_bias(table, lag, W)                                             # [1, 6, H]
    inf = float("inf")
    expected = torch.tensor([[[4, 9], [-inf, -inf], [0, 5], [1, 6], [3, 8], [3, 8]]])
    assert torch.equal(b, expected)


@pytest.mark.parametrize("B", [1, 2])
def test_streaming_equals_training(B):
    model = make_model()
    cfg = model.cfg
    T = cfg.window + 3        # long enough that window pages get dropped
    tokens, portrait, audio, cond, mask = random_inputs(cfg, B, T)
    with torch.no_grad():
        train = model.forward_train(tokens, portrait, audio, cond, mask)
        streamed = stream(model, portrait, tokens, audio, cond, mask)
    assert train.shape == (B, T, cfg.tokens_per_frame, cfg.codebook_size)
    assert train.abs().max() > 0.5      # not a trivially flat output
    torch.testing.assert_close(streamed, train, atol=1e-5, rtol=0)


def test_windowed_training_equals_the_full_mask_reference():
    """forward_train gathers each frame's visible keys; the reference runs the whole sequence under
    sfa_mask. Same logits and same gradients, also for a window cut from a clip (prev_first)."""
    model = make_model()
    cfg = model.cfg
    T = cfg.window + 4
    tokens, portrait, audio, cond, mask = random_inputs(cfg, 2, T)
    prev = torch.randint(0, cfg.codebook_size, (2, cfg.tokens_per_frame))
    for first in (None, prev):
        a = model.forward_train(tokens, portrait, audio, cond, mask, prev_first=first)
        ga = torch.autograd.grad(a.square().mean(), [model.lag_bias, model.tok_emb.weight])
        b = model._forward_train_masked(tokens, portrait, audio, cond, mask, prev_first=first)
        gb = torch.autograd.grad(b.square().mean(), [model.lag_bias, model.tok_emb.weight])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


def test_drafts_enter_the_query_slots_alike_in_training_streaming_and_reference():
    """Refinement (cfg.refine): a frame's known draft tokens reach its query slots; forward_train,
    its full-mask reference and step give the same logits; the page K/V do not depend on the
    draft; an all-unknown draft is the plain pass, bit for bit."""
    model = make_model(refine=True)
    cfg = model.cfg
    T = cfg.window + 2
    tokens, portrait, audio, cond, mask = random_inputs(cfg, 2, T)
    g = torch.Generator().manual_seed(5)
    draft = torch.randint(0, cfg.codebook_size, tokens.shape, generator=g)
    known = torch.rand(tokens.shape, generator=g) < 0.5
    with torch.no_grad():
        train = model.forward_train(tokens, portrait, audio, cond, mask, draft=draft, draft_known=known)
        ref = model._forward_train_masked(tokens, portrait, audio, cond, mask, draft=draft, draft_known=known)
        streamed = stream(model, portrait, tokens, audio, cond, mask, draft, known)
        plain = model.forward_train(tokens, portrait, audio, cond, mask)
        none_known = model.forward_train(tokens, portrait, audio, cond, mask, draft=draft,
                                         draft_known=torch.zeros_like(known))
    torch.testing.assert_close(train, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed, train, atol=1e-5, rtol=0)
    assert (train - plain).abs().amax() > 0.1                  # the draft is read
    assert torch.equal(none_known, plain)
    # the cache page of a drafted pass is the plain pass's
    past = model.empty_cache(2)
    a = model.step(portrait, audio[:, 0], cond[:, 0], mask[:, 0], *past)
    b = model.step(portrait, audio[:, 0], cond[:, 0], mask[:, 0], *past, draft=draft[:, 0], draft_known=known[:, 0])
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    with pytest.raises(ValueError, match="draft and draft_known must both be given"):
        model.step(portrait, audio[:, 0], cond[:, 0], mask[:, 0], *past, draft=draft[:, 0])
    with pytest.raises(ValueError, match="not trained to refine"):
        make_model().step(portrait, audio[:, 0], cond[:, 0], mask[:, 0], *past, draft=draft[:, 0],
                          draft_known=known[:, 0])


def test_training_forward_is_causal_and_windowed():
    """Changing frame k's inputs changes no logits before k; frames' logits do depend on their inputs."""
    model = make_model()
    cfg = model.cfg
    T, k = 6, 2
    tokens, portrait, audio, cond, mask = random_inputs(cfg, 1, T)
    audio2 = audio.clone()
    audio2[:, k] += 1.0
    with torch.no_grad():
        a = model.forward_train(tokens, portrait, audio, cond, mask)
        b = model.forward_train(tokens, portrait, audio2, cond, mask)
    torch.testing.assert_close(a[:, :k], b[:, :k], atol=1e-6, rtol=0)
    for t in range(k, T):
        # frame k's page is seen by frames k..k+W; later frames only via the residual of its tokens
        # (teacher forcing keeps tokens fixed), so they must be unchanged.
        changed = (a[:, t] - b[:, t]).abs().max() > 1e-4
        assert changed == (t <= k + cfg.window), t


def test_cache_slot_order_is_irrelevant():
    """Temporal position is only the lag: permuting cache slots (with their lags) is a no-op."""
    model = make_model()
    cfg = model.cfg
    tokens, portrait, audio, cond, mask = random_inputs(cfg, 1, 1)
    sink_k, sink_v = model.prefill(portrait)
    past_k, past_v, past_lag = model.empty_cache(1)
    P = cfg.page_tokens
    past_k[:, :, :, :P], past_v[:, :, :, :P], past_lag[:, :P] = sink_k, sink_v, -1
    g = torch.Generator().manual_seed(3)
    past_k[:, :, :, P:3 * P] = torch.randn(past_k[:, :, :, P:3 * P].shape, generator=g)
    past_v[:, :, :, P:3 * P] = torch.randn(past_v[:, :, :, P:3 * P].shape, generator=g)
    past_lag[:, P:2 * P], past_lag[:, 2 * P:3 * P] = 2, 1
    perm = torch.randperm(cfg.cache_tokens, generator=g)
    args = (portrait, audio[:, 0], cond[:, 0], mask[:, 0])
    with torch.no_grad():
        a = model.step(*args, past_k, past_v, past_lag)[0]
        b = model.step(*args, past_k[:, :, :, perm], past_v[:, :, :, perm], past_lag[:, perm])[0]
        # and an empty slot is really ignored, whatever garbage its K/V hold
        past_k[:, :, :, -P:] = 100.0
        c = model.step(*args, past_k, past_v, past_lag)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)


def _stream_controls(model, controls_per_frame, tokens, portrait, audio):
    cfg = model.cfg
    enc = [encode_controls(c) for c in controls_per_frame]
    cond = torch.from_numpy(np.stack([e[0] for e in enc]))[None]
    mask = torch.from_numpy(np.stack([e[1] for e in enc]))[None]
    assert cond.shape[2:] == (cfg.cond_tokens, cfg.cond_dim)
    with torch.no_grad():
        return stream(model, portrait, tokens, audio, cond, mask)


def test_fcic_control_change_takes_effect_from_its_frame():
    model = make_model()
    cfg = model.cfg
    T, k = 2 * cfg.window + 2, 3
    tokens, portrait, audio, _, _ = random_inputs(cfg, 1, T)
    base = [{"yaw": 10.0, "emotion": "happy"}] * T
    changed = base[:k] + [{"yaw": -20.0, "emotion": "happy"}] * (T - k)
    a = _stream_controls(model, base, tokens, portrait, audio)
    b = _stream_controls(model, changed, tokens, portrait, audio)
    assert torch.equal(a[:, :k], b[:, :k])          # bit-identical before the change
    for t in range(k, T):
        assert (a[:, t] - b[:, t]).abs().max() > 1e-4, t


def test_free_differs_from_pinned_neutral():
    model = make_model()
    cfg = model.cfg
    tokens, portrait, audio, _, _ = random_inputs(cfg, 1, 2)
    free = _stream_controls(model, [{}] * 2, tokens, portrait, audio)
    pinned = _stream_controls(model, [{"yaw": 0.0}] * 2, tokens, portrait, audio)
    assert (free - pinned).abs().max() > 1e-4


def test_step_rejects_bad_shapes():
    model = make_model()
    cfg = model.cfg
    tokens, portrait, audio, cond, mask = random_inputs(cfg, 2, 1)
    past_k, past_v, past_lag = model.empty_cache(2)
    with pytest.raises(ValueError, match="past_k"):
        model.step(portrait, audio[:, 0], cond[:, 0], mask[:, 0], past_k[:, :, :, :-1], past_v, past_lag)
    with pytest.raises(ValueError, match="audio"):
        model.step(portrait, audio[:, 0, :1], cond[:, 0], mask[:, 0], past_k, past_v, past_lag)
    with pytest.raises(ValueError, match="bool"):
        model.step(portrait, audio[:, 0], cond[:, 0], mask[:, 0].float(), past_k, past_v, past_lag)
    with pytest.raises(ValueError, match="portrait_tokens"):
        model.prefill(portrait[:, :-1])
    with pytest.raises(ValueError, match="cond_mask"):
        model.forward_train(tokens, portrait, audio, cond, mask[:, :, :-1])


def test_sample():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]])
    assert torch.equal(sample(logits), torch.tensor([1, 0]))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1, generator=g), torch.tensor([1, 0]))
    big = torch.randn(4, 5, 16)
    s1 = sample(big, temperature=0.8, top_k=4, generator=torch.Generator().manual_seed(7))
    s2 = sample(big, temperature=0.8, top_k=4, generator=torch.Generator().manual_seed(7))
    assert s1.shape == (4, 5) and torch.equal(s1, s2)
    top4 = torch.topk(big, 4, dim=-1).indices
    assert (top4 == s1[..., None]).any(-1).all()    # never outside the top k
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, temperature=-1.0)


def test_num_params():
    model = make_model()
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0


def test_onnx_export_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = make_model()
    cfg = model.cfg
    B = 2
    tokens, portrait, audio, cond, mask = random_inputs(cfg, B, 1)
    # Cache: the real sink page, one window page of random K/V at lag 1, the rest empty.
    g = torch.Generator().manual_seed(5)
    past_k, past_v, past_lag = model.empty_cache(B)
    with torch.no_grad():
        sink_k, sink_v = model.prefill(portrait)
    P = cfg.page_tokens
    past_k[:, :, :, :P], past_v[:, :, :, :P], past_lag[:, :P] = sink_k, sink_v, -1
    past_k[:, :, :, P:2 * P] = torch.randn(past_k[:, :, :, P:2 * P].shape, generator=g)
    past_v[:, :, :, P:2 * P] = torch.randn(past_v[:, :, :, P:2 * P].shape, generator=g)
    past_lag[:, P:2 * P] = 1
    args = (portrait, audio[:, 0], cond[:, 0], mask[:, 0], past_k, past_v, past_lag)

    batch = torch.export.Dim("batch", min=1, max=cfg.max_batch)
    dyn = {"prev_tokens": {0: batch}, "audio": {0: batch}, "cond": {0: batch}, "cond_mask": {0: batch},
           "past_k": {1: batch}, "past_v": {1: batch}, "past_lag": {0: batch}}
    path = tmp_path / "step.onnx"
    torch.onnx.export(StepModule(model).eval(), args, str(path), dynamo=True, opset_version=18,
                      dynamic_shapes=dyn, input_names=StepModule.input_names,
                      output_names=StepModule.output_names)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == StepModule.input_names
    # Run at another batch size than the export's example to prove the batch is dynamic.
    for b in (1, 3):
        idx = torch.arange(b) % B
        feed_args = [a[idx] if a.dim() < 5 else a[:, idx] for a in args]
        with torch.no_grad():
            want = model.step(*feed_args)
        got = sess.run(None, {n: a.numpy() for n, a in zip(StepModule.input_names, feed_args)})
        for w, g_ in zip(want, got):
            np.testing.assert_allclose(g_, w.numpy(), atol=1e-4, rtol=0)


def test_code_logits_are_the_sum_of_the_codes_fsq_digit_logits():
    """V logits built from per-digit logits: softmax over V factorises, so CE over V is the sum of
    the per-digit CEs, and the argmax code is the code of the per-digit argmaxes."""
    from eartalk.model.tokenizer import fsq_levels
    cfg = preset("tiny")
    model = EARTalkGPT(cfg)
    levels = fsq_levels(cfg.codebook_size)
    assert levels == (8, 8, 8)
    g = torch.Generator().manual_seed(0)
    dl = torch.randn(5, sum(levels), generator=g)
    logits = model.code_logits(dl)
    assert logits.shape == (5, cfg.codebook_size)
    parts = dl.split(levels, dim=-1)
    code = torch.randint(0, cfg.codebook_size, (5,), generator=g)
    digits = [(code // 1) % 8, (code // 8) % 8, (code // 64) % 8]   # the tokenizer's code = d0 + 8 d1 + 64 d2
    want = sum(F.cross_entropy(p, d, reduction="none") for p, d in zip(parts, digits))
    torch.testing.assert_close(F.cross_entropy(logits, code, reduction="none"), want, atol=1e-5, rtol=1e-5)
    best = parts[0].argmax(-1) + 8 * parts[1].argmax(-1) + 64 * parts[2].argmax(-1)
    assert torch.equal(logits.argmax(-1), best)


@pytest.mark.parametrize("name", ["tiny", "test"])
def test_code_nll_equals_cross_entropy_over_the_code_logits(name):
    """Training's loss (code_nll over forward_train(digits=True)) is the CE over the V code logits
    the model streams with, for the tiny (8x8x8) and the test (4x4) codebooks, gradients too."""
    model = make_model() if name == "test" else EARTalkGPT(preset("tiny"))
    cfg = model.cfg
    tokens, portrait, audio, cond, mask = random_inputs(cfg, 2, 3)
    digits = model.forward_train(tokens, portrait, audio, cond, mask, digits=True)
    assert digits.shape == (2, 3, cfg.tokens_per_frame, sum(model.digit_levels))
    logits = model.forward_train(tokens, portrait, audio, cond, mask)
    torch.testing.assert_close(model.code_logits(digits), logits, atol=0, rtol=0)
    want = F.cross_entropy(logits.flatten(0, 2), tokens.flatten(), reduction="none").view(tokens.shape)
    got = model.code_nll(digits, tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(got.mean(), [model.head.weight, model.lag_bias])
    gb = torch.autograd.grad(want.mean(), [model.head.weight, model.lag_bias])
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "test"])
def test_init_layer0_head0_reads_the_portrait_token_at_its_own_position(name):
    """At initialisation, layer 0 head 0 of query slot i attends mostly to the sink's token i (the
    portrait's code at the same place), over the sink page and its own frame's rows."""
    import math
    cfg = preset(name)
    torch.manual_seed(0)
    m = EARTalkGPT(cfg).eval()
    B, N, P, D = 3, cfg.tokens_per_frame, cfg.page_tokens, cfg.head_dim
    ca = cfg.cond_tokens + cfg.audio_tokens
    g = torch.Generator().manual_seed(2)
    port = torch.randint(0, cfg.codebook_size, (B, N), generator=g)
    prev = torch.randint(0, cfg.codebook_size, (B, N), generator=g)
    with torch.no_grad():
        sink_k, _ = m.prefill(port)
        cond = torch.randn(B, cfg.cond_tokens, cfg.cond_dim, generator=g)
        ctx = m._context(m.embed_tokens(prev), m.audio_proj(torch.randn(B, cfg.audio_tokens, cfg.audio_dim, generator=g)),
                         cond, torch.ones(B, cfg.cond_tokens, dtype=torch.bool))
        x = torch.cat([ctx, m._queries(ctx)], dim=1)
        q, k, _ = m.blocks[0].attn.qkv(m.blocks[0].ln1(x)).view(B, P + N, 3, cfg.n_head, D).unbind(2)
        q0, k0 = q[:, P:, 0], k[:, :, 0]                                    # head 0: [B,N,D], [B,P+N,D]
        bias = m.lag_bias[0, 0]
        scores = torch.cat([q0 @ sink_k[0, :, 0].transpose(1, 2), q0 @ k0.transpose(1, 2)], -1) / math.sqrt(D)
        scores[..., :P] += bias[cfg.window + 1]
        scores[..., P:] += bias[0]
        attn = scores.softmax(-1)                                           # [B,N,2P+N]
    own = attn[:, torch.arange(N), ca + torch.arange(N)]
    assert float(own.mean()) > 0.85 and float(own.min()) > 0.6
    assert torch.equal(attn[..., :P].argmax(-1), (ca + torch.arange(N)).expand(B, N))


def test_logits_head_is_centred_per_digit():
    """A constant added to one digit's head rows (the offset training lets drift) changes neither
    the logits nor their softmax: each digit's logits have mean 0, and the code logits equal the
    uncentred ones minus one constant per token."""
    cfg = preset("test")
    model = EARTalkGPT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, cfg.d_model, generator=g)
    with torch.no_grad():
        model.head.weight.add_(torch.randn(model.head.weight.shape, generator=g))
        before = model._logits(x)
        raw = model.code_logits(model.head(model.ln_f(x)))
        start = 0
        for n in model.digit_levels:                 # each digit's rows shifted by one vector
            model.head.weight[start:start + n] += torch.randn(1, cfg.d_model, generator=g) * 50
            start += n
        after = model._logits(x)
        digit = F.linear(model.ln_f(x), model._centered_head())
    torch.testing.assert_close(after, before, atol=2e-4, rtol=0)
    shift = raw - before
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), atol=1e-4, rtol=0)
    for part in digit.split(model.digit_levels, dim=-1):
        torch.testing.assert_close(part.mean(-1), torch.zeros(part.shape[:-1]), atol=1e-4, rtol=0)
