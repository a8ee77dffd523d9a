"""Export the model's six inference graphs to ONNX (torch dynamo exporter, opset 18+).

Graphs (file = ``<kind>.onnx``), every shape static except the batch (``batch``, 1..max_batch):

| kind | inputs -> outputs |
|---|---|
| ``step`` | the step contract of ``shared/design.md`` (prev_tokens .. past_lag -> logits, new_k, new_v) |
| ``prefill`` | portrait_tokens int64 [B,N] -> sink_k, sink_v [L,B,H,P,D] |
| ``tokenizer_encode`` | images [B,3,S,S] -> tokens int64 [B,N] |
| ``tokenizer_reference`` | portrait [B,3,S,S] -> ref [B,Cr+48,S/4,S/4] |
| ``tokenizer_decode`` | codes float32 [B,N,d] (each token's FSQ digits, or their expectation), ref -> images [B,3,S,S] |
| ``audio_encoder`` | mel_window [B,R,n_mels] -> audio [B,A,F] (one video frame) |

Each file gets the provenance of :mod:`export.metadata` in ``metadata_props``, passes
``onnx.checker.check_model(full_check=True)`` and strict shape inference, must match
:func:`expected_signature` exactly, and may only use ops of :data:`TRT10_OPS` (ops the
TensorRT 10.0 ONNX parser imports natively, no plugins). ``manifest.json`` lists the files.

Opset 17 is refused: the dynamo exporter's down-conversion to 17 is broken (it produces graphs
that fail to load), and TensorRT 10 reads opsets 9..20, so 18..20 cost nothing.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from eartalk.export import metadata as md

GRAPHS = ("step", "prefill", "tokenizer_encode", "tokenizer_reference", "tokenizer_decode",
          "audio_encoder")
# exported only for a model trained with refinement (cfg.refine): a step pass with a draft
OPTIONAL_GRAPHS = ("refine",)
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 20, 18
BATCH = "batch"

# Standard ONNX ops the TensorRT 10.0 parser (onnx-tensorrt, opsets 9-20) imports without plugins.
# Deliberately a short list: only what these graphs need plus close relatives. An op outside it
# fails the export, so a model change that would need a plugin on Jetson is caught on a CPU.
TRT10_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil",
    "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "CumSum",
    "DepthToSpace", "DequantizeLinear", "Div", "Einsum", "Equal", "Erf", "Exp", "Expand", "Flatten",
    "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "Greater",
    "GreaterOrEqual", "GridSample", "GroupNormalization", "Identity", "InstanceNormalization",
    "LayerNormalization", "Less", "LessOrEqual", "Log", "MatMul", "Max", "MaxPool", "Min", "Mod", "Mul",
    "Neg", "Not", "Or", "Pad", "Pow", "QuantizeLinear", "Range", "Reciprocal", "ReduceL2",
    "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "Round", "ScatterElements",
    "ScatterND", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "SpaceToDepth", "Split", "Sqrt",
    "Squeeze", "Sub", "Tanh", "Tile", "TopK", "Transpose", "Unsqueeze", "Where",
})


def graphs_for(cfg) -> tuple[str, ...]:
    """The graphs a model of ``cfg`` exports: :data:`GRAPHS`, plus ``refine`` when it was trained to refine."""
    return GRAPHS + (OPTIONAL_GRAPHS if cfg.refine else ())


class ExportError(RuntimeError):
    """An exported graph broke a rule (contract, checker, op set): the message names file and rule."""


@dataclass
class GraphSpec:
    kind: str
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    batch_axis: dict[str, int]        # input name -> axis of the batch

    @property
    def file(self) -> str:
        return f"{self.kind}.onnx"


class _Prefill(nn.Module):
    """``gpt.prefill`` as ``forward`` (portrait tokens -> sink page K/V)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, portrait_tokens):
        return self.gpt.prefill(portrait_tokens)


def expected_signature(cfg, receptive_field: int, ref_channels: int) -> dict[str, dict]:
    """Per graph: ``{"inputs"|"outputs": {name: (dtype, shape)}}`` with ``"batch"`` for the batch.

    This is the contract the runtime backends rely on; the exporter checks every file against it.
    """
    from eartalk.model.tokenizer import fsq_levels
    c, b = cfg, BATCH
    S, N, P = c.image_size, c.tokens_per_frame, c.page_tokens
    kv = lambda T: ("float32", [c.n_layer, b, c.n_head, T, c.head_dim])  # noqa: E731
    ref = ("float32", [b, ref_channels, S // 4, S // 4])
    img = ("float32", [b, 3, S, S])
    toks = ("int64", [b, N])
    digits = len(fsq_levels(c.codebook_size))   # d: a code is its FSQ digits (tokenizer.code_table)
    sig = {
        "step": {"inputs": {"prev_tokens": toks, "audio": ("float32", [b, c.audio_tokens, c.audio_dim]),
                            "cond": ("float32", [b, c.cond_tokens, c.cond_dim]),
                            "cond_mask": ("bool", [b, c.cond_tokens]),
                            "past_k": kv(c.cache_tokens), "past_v": kv(c.cache_tokens),
                            "past_lag": ("int32", [b, c.cache_tokens])},
                 "outputs": {"logits": ("float32", [b, N, c.codebook_size]), "new_k": kv(P), "new_v": kv(P)}},
        "prefill": {"inputs": {"portrait_tokens": toks}, "outputs": {"sink_k": kv(P), "sink_v": kv(P)}},
        "tokenizer_encode": {"inputs": {"images": img}, "outputs": {"tokens": toks}},
        "tokenizer_reference": {"inputs": {"portrait": img}, "outputs": {"ref": ref}},
        "tokenizer_decode": {"inputs": {"codes": ("float32", [b, N, digits]), "ref": ref},
                             "outputs": {"images": img}},
        "audio_encoder": {"inputs": {"mel_window": ("float32", [b, receptive_field, c.n_mels])},
                          "outputs": {"audio": ("float32", [b, c.audio_tokens, c.audio_dim])}},
    }
    if c.refine:
        sig["refine"] = {"inputs": {**sig["step"]["inputs"], "draft": toks, "draft_known": ("bool", [b, N])},
                         "outputs": {"logits": sig["step"]["outputs"]["logits"]}}
    return sig


def _step_batch_axes(names) -> dict[str, int]:
    """The batch axis of each step-like input: 1 for the [L, B, ...] caches, 0 for the rest."""
    return {n: (1 if n in ("past_k", "past_v") else 0) for n in names}


def graph_specs(cfg, gpt, tokenizer, audio_encoder, batch: int = 2) -> dict[str, GraphSpec]:
    """Modules and example inputs (batch ``batch``; 2 so the exporter cannot specialise on 1)."""
    from eartalk.model.audio import AudioEncoderStep
    from eartalk.model.gpt import RefineModule, StepModule
    from eartalk.model.tokenizer import TokenizerDecode, TokenizerEncode, TokenizerReference, code_table
    c, B = cfg, batch
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, c.codebook_size, (B, c.tokens_per_frame), generator=g)
    images = torch.rand(B, 3, c.image_size, c.image_size, generator=g)
    past_k, past_v, past_lag = gpt.empty_cache(B)
    with torch.no_grad():
        ref = tokenizer.reference(images)
    # expected codes under a random distribution over the codebook: points between the codes too
    probs = torch.softmax(torch.randn(B, c.tokens_per_frame, c.codebook_size, generator=g) * 3, -1)
    codes = probs @ code_table(c.codebook_size)
    step_args = (tokens, torch.randn(B, c.audio_tokens, c.audio_dim, generator=g),
                 torch.randn(B, c.cond_tokens, c.cond_dim, generator=g),
                 torch.zeros(B, c.cond_tokens, dtype=torch.bool), past_k, past_v, past_lag)
    R = audio_encoder.receptive_field
    specs = [
        GraphSpec("step", StepModule(gpt).eval(), step_args, list(StepModule.input_names),
                  list(StepModule.output_names),
                  _step_batch_axes(StepModule.input_names)),
        GraphSpec("prefill", _Prefill(gpt).eval(), (tokens,), ["portrait_tokens"], ["sink_k", "sink_v"],
                  {"portrait_tokens": 0}),
        GraphSpec("tokenizer_encode", TokenizerEncode(tokenizer), (images,), ["images"], ["tokens"],
                  {"images": 0}),
        GraphSpec("tokenizer_reference", TokenizerReference(tokenizer), (images,), ["portrait"], ["ref"],
                  {"portrait": 0}),
        GraphSpec("tokenizer_decode", TokenizerDecode(tokenizer), (codes, ref), ["codes", "ref"],
                  ["images"], {"codes": 0, "ref": 0}),
        GraphSpec("audio_encoder", AudioEncoderStep(audio_encoder),
                  (torch.randn(B, R, c.n_mels, generator=g) * 3 - 5,), ["mel_window"], ["audio"],
                  {"mel_window": 0}),
    ]
    if c.refine:
        # a tensor of its own: given ``tokens`` again, torch.export takes the two inputs for one
        # and wires prev_tokens' embedding into the draft's place
        draft = torch.randint(0, c.codebook_size, (B, c.tokens_per_frame), generator=g)
        known = torch.rand(B, c.tokens_per_frame, generator=g) < 0.5
        specs.append(GraphSpec("refine", RefineModule(gpt).eval(), step_args + (draft, known),
                               list(RefineModule.input_names), list(RefineModule.output_names),
                               _step_batch_axes(RefineModule.input_names)))
    return {s.kind: s for s in specs}


# ------------------------------------------------------------------ inspection helpers
def io_signature(model) -> dict[str, dict]:
    """``{"inputs"|"outputs": {name: (dtype, shape)}}`` of an ``onnx.ModelProto`` (dim_param for symbols)."""
    import onnx
    from onnx import helper

    def sig(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type != onnx.TensorProto.BOOL else "bool"
            out[v.name] = (dtype, [d.dim_param or d.dim_value for d in t.shape.dim])
        return out
    return {"inputs": sig(model.graph.input), "outputs": sig(model.graph.output)}


def op_types(model) -> set[str]:
    """Op types of the graph and of every subgraph (If/Loop bodies), with their domain if not ONNX."""
    found = set()

    def walk(graph):
        for n in graph.node:
            found.add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
            for a in n.attribute:
                if a.g is not None and a.g.node:
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)
    walk(model.graph)
    return found


def unsupported_ops(model, allowed=TRT10_OPS) -> list[str]:
    return sorted(op_types(model) - set(allowed))


def check_graph(model, path: str | Path, expected: dict | None = None, opset_range=(MIN_OPSET, MAX_OPSET)) -> None:
    """All export rules for one graph; raises :class:`ExportError` naming ``path`` and the rule."""
    import onnx
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"{path}: onnx.checker failed: {e}") from e
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        raise ExportError(f"{path}: ONNX shape inference failed: {e}") from e
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    v = opsets.get("ai.onnx")
    if v is None or not opset_range[0] <= v <= opset_range[1]:
        raise ExportError(f"{path}: opset {v}, expected {opset_range[0]}..{opset_range[1]}")
    extra = sorted(set(opsets) - {"ai.onnx"})
    bad = unsupported_ops(model)
    if bad or extra:
        raise ExportError(f"{path}: ops outside the TensorRT 10 plugin-free set: {bad} (domains {extra})")
    if expected is not None:
        got = io_signature(model)
        norm = lambda s: {k: {n: (d, list(sh)) for n, (d, sh) in v.items()} for k, v in s.items()}  # noqa: E731
        if norm(got) != norm(expected):
            raise ExportError(f"{path}: I/O signature {got} does not match the contract {expected}")
        if list(got["inputs"]) != list(expected["inputs"]) or list(got["outputs"]) != list(expected["outputs"]):
            raise ExportError(f"{path}: I/O order {list(got['inputs'])} -> {list(got['outputs'])}, "
                              f"expected {list(expected['inputs'])} -> {list(expected['outputs'])}")


# ------------------------------------------------------------------ export
def export_graph(spec: GraphSpec, max_batch: int, opset: int = DEFAULT_OPSET):
    """One module -> ``onnx.ModelProto`` (dynamo exporter, optimised, batch dynamic 1..max_batch)."""
    # one warning per missing torchvision op on every export: noise, not a problem of ours
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = torch.export.Dim(BATCH, min=1, max=max_batch)
    dyn = {n: {spec.batch_axis[n]: batch} for n in spec.input_names}
    # the exporter warns about internals (treespec deprecations, axis renaming) on every call
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, UserWarning, DeprecationWarning))
        prog = torch.onnx.export(spec.module, spec.args, None, dynamo=True, opset_version=opset,
                                 dynamic_shapes=dyn, input_names=spec.input_names,
                                 output_names=spec.output_names, optimize=True, verbose=False)
    return prog.model_proto


def export_onnx(cfg, gpt, tokenizer, audio_encoder, out_dir: str | Path, *, model_name: str = "custom",
                weights_hash: str | None = None, opset: int = DEFAULT_OPSET,
                graphs: tuple[str, ...] | None = None, log=None) -> dict:
    """Export ``graphs`` (default :func:`graphs_for` ``cfg``) to ``out_dir``; returns the manifest
    (also written as ``manifest.json``).

    ``weights_hash`` defaults to :func:`export.metadata.weights_sha256` of the three modules.
    ``manifest["export_seconds"]`` is the wall time per graph (export + checks + write).
    """
    import onnx
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} not supported: use {MIN_OPSET}..{MAX_OPSET} "
                         f"(the dynamo exporter's down-conversion to 17 is broken)")
    allowed = graphs_for(cfg)
    graphs = allowed if graphs is None else tuple(graphs)
    unknown = sorted(set(graphs) - set(allowed))
    if unknown:
        why = " (refine: only for a model trained with refinement, config refine=true)" if "refine" in unknown else ""
        raise ValueError(f"unknown graphs {unknown}; expected some of {list(allowed)}{why}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in (gpt, tokenizer, audio_encoder):
        m.eval()
    if weights_hash is None:
        weights_hash = md.weights_sha256({"gpt": gpt, "tokenizer": tokenizer, "audio_encoder": audio_encoder})
    config_json = cfg.to_json()
    specs = graph_specs(cfg, gpt, tokenizer, audio_encoder)
    contract = expected_signature(cfg, audio_encoder.receptive_field, tokenizer.ref_channels + 48)
    files, seconds = {}, {}
    for kind in graphs:
        t0 = time.perf_counter()
        spec = specs[kind]
        path = out / spec.file
        model = export_graph(spec, cfg.max_batch, opset)
        md.write_props(model, md.make_props(kind, config_json, weights_hash))
        check_graph(model, path, contract[kind])
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(path)
        sig = io_signature(model)
        files[kind] = {"file": spec.file, "sha256": md.file_sha256(path), "bytes": path.stat().st_size,
                       "inputs": {n: {"dtype": d, "shape": s} for n, (d, s) in sig["inputs"].items()},
                       "outputs": {n: {"dtype": d, "shape": s} for n, (d, s) in sig["outputs"].items()},
                       "ops": sorted(op_types(model))}
        seconds[kind] = round(time.perf_counter() - t0, 2)
        if log:
            log(f"{path}: {len(model.graph.node)} nodes, {path.stat().st_size / 1e6:.1f} MB, {seconds[kind]:.1f} s")
    manifest = {"format": md.FORMAT_VERSION, "eartalk_version": md.current_version(), "model": model_name,
                "model_config": cfg.to_dict(), "weights_sha256": weights_hash, "opset": opset,
                "batch": {"dim": BATCH, "min": 1, "max": cfg.max_batch}, "files": files,
                "torch_version": torch.__version__, "onnx_version": onnx.__version__}
    # merge with graphs exported earlier into the same folder (partial re-export)
    try:
        old = md.read_manifest(out)
        if old.get("weights_sha256") == weights_hash and old.get("model_config") == cfg.to_dict():
            manifest["files"] = {**{k: v for k, v in old["files"].items() if (out / v["file"]).is_file()}, **files}
    except md.ArtifactError:
        pass
    md.write_manifest(out, manifest)
    return {**manifest, "export_seconds": seconds}
