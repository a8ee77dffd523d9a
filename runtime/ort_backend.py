"""ONNX Runtime backend: the exported graphs of ``eartalk export onnx`` behind the runtime's
:class:`~eartalk.runtime.backend.Backend` interface (numpy in, numpy out).

Loading is where trust is decided: every graph file is checked against ``manifest.json`` (sha256)
and its own metadata (graph kind, eartalk version, model config, weights hash) by
:func:`eartalk.export.metadata.verify_onnx`; a truncated or corrupt file, a file from another
model version or config, or a hash mismatch is refused with an error naming the file and the
mismatch, before any session exists.

Execution providers: ``cpu`` (default), ``cuda``, ``tensorrt`` (``CUDAExecutionProvider`` /
``TensorrtExecutionProvider`` with the CPU one as fallback for the ops they lack); asking for one
this onnxruntime build does not have is an error listing the available ones.

Copies: every call runs through an ``IOBinding``. Inputs are bound in place (a contiguous numpy
array is read where it lies on the CPU provider) and outputs are written by ONNX Runtime straight
into freshly allocated numpy arrays, so the K/V tensors -- the bulk of the bytes -- are never
copied on the way in or out. Session options are tuned for small CPUs (two cores here): a fixed
intra-op pool, no inter-op parallelism, and no spin-waiting, since idle ORT threads spinning
between calls would steal the core the next graph (decoder, audio encoder) needs (measured on the
tiny stream, 2 cores under load: spinning on was 2.5-3x slower per frame end to end).
The same holds for any other thread pool in the process: the streaming front end's log-mel runs
in numpy because torch's MKL/OpenMP threads spun ~200 ms after every 40 ms call and halved the
step's speed (``eartalk/model/audio.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from eartalk.export import metadata as md
from eartalk.runtime.backend import Backend

# the graphs a Backend maps its methods to (runtime/backend.py)
GRAPH_KINDS = ("tokenizer_encode", "tokenizer_reference", "prefill", "audio_encoder", "step",
               "tokenizer_decode")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
# ONNX tensor type string -> numpy dtype of a bound output
_NP = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
       "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


def provider_list(provider: str) -> list[str]:
    """ORT provider names for ``provider`` (cpu|cuda|tensorrt, or an ORT name), with CPU fallback.

    Raises ``RuntimeError`` listing what this onnxruntime build offers when it is missing.
    """
    import onnxruntime as ort
    name = PROVIDERS.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if name not in available:
        short = [k for k, v in PROVIDERS.items() if v in available]
        raise RuntimeError(f"onnxruntime {ort.__version__} has no {name}; available providers: {available} "
                           f"(short names {short}). CUDA/TensorRT need the onnxruntime-gpu package.")
    chain = [name]
    if name == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
        chain.append("CUDAExecutionProvider")
    if name != "CPUExecutionProvider":
        chain.append("CPUExecutionProvider")
    return chain


def session_options(threads: int | None = None, profile_prefix: str | None = None):
    """Options for a small CPU: ``threads`` intra-op threads (default: min(2, cores)), sequential."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


class OrtGraph:
    """One verified ONNX graph in an ``InferenceSession``, run through an IOBinding."""

    def __init__(self, path: Path, providers: list[str], options):
        import onnxruntime as ort
        self.path = path
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [(o.name, o.type, o.shape) for o in self.session.get_outputs()]
        self._device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"

    def __call__(self, *args: np.ndarray) -> list[np.ndarray]:
        if len(args) != len(self.inputs):
            raise ValueError(f"{self.path.name}: {len(args)} inputs given, expected {self.inputs}")
        batch = args[0].shape[0] if args[0].ndim else 1
        io = self.session.io_binding()
        for name, a in zip(self.inputs, args):
            io.bind_cpu_input(name, np.ascontiguousarray(a))
        outs = []
        for name, typ, shape in self.outputs:
            # the only symbolic dim is the batch; its position differs (K/V have it on axis 1)
            shp = tuple(batch if isinstance(d, str) or d is None else d for d in shape)
            if self._device == "cpu":
                buf = np.empty(shp, _NP[typ])
                io.bind_output(name, "cpu", 0, buf.dtype, shp, buf.ctypes.data)
                outs.append(buf)
            else:
                io.bind_output(name, "cpu")   # ORT allocates host memory and copies once D2H
        self.session.run_with_iobinding(io)
        if self._device != "cpu":
            outs = io.copy_outputs_to_cpu()
        return outs

    def end_profiling(self) -> str:
        return self.session.end_profiling()


PRECISIONS = ("fp32", "int8", "fp8")


def _quantized_files(manifest: dict, precision: str, onnx_dir: Path) -> dict:
    """``{kind: manifest entry}`` of the ``precision`` Q/DQ graphs; {} for fp32. No silent fallback:
    a folder without them is an error saying how to make them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "fp32":
        return {}
    files = manifest.get("quantized", {}).get(precision)
    if not files:
        raise md.ArtifactError(f"{onnx_dir / md.MANIFEST}: no {precision} graphs; make them with `eartalk calibrate "
                               f"record` then `eartalk calibrate quantize --onnx {onnx_dir} --precision {precision}`")
    return files


class OrtGraphs:
    """The six graphs of an ONNX folder, verified at load (see the module docstring).

    ``config``: the model config dict the caller serves (``ModelConfig.to_dict()``); None takes the
    manifest's, which every file must then agree with. ``weights_hash``: likewise. ``graphs``: the
    kinds to load (default: every file of the manifest); ``optional``: kinds also loaded when the
    manifest lists them (``refine``, exported only for a model trained to refine).
    """

    def __init__(self, onnx_dir: str | Path, provider: str = "cpu", config: dict | None = None,
                 weights_hash: str | None = None, threads: int | None = None,
                 graphs: tuple[str, ...] | None = None, profile_prefix: str | None = None,
                 precision: str = "fp32", optional: tuple[str, ...] = ()):
        self.dir = Path(onnx_dir)
        self.manifest = md.read_manifest(self.dir)
        if config is not None and self.manifest["model_config"] != config:
            raise md.ArtifactError(f"{self.dir / md.MANIFEST}: exported for another model config: "
                                   f"{md._config_diff(self.manifest['model_config'], config)}")
        if weights_hash is not None and self.manifest["weights_sha256"] != weights_hash:
            raise md.ArtifactError(f"{self.dir / md.MANIFEST}: weights sha256 {self.manifest['weights_sha256'][:16]}... "
                                   f"does not match the model's {weights_hash[:16]}...")
        self.config = self.manifest["model_config"]
        self.weights_hash = self.manifest["weights_sha256"]
        self.providers = provider_list(provider)
        options = session_options(threads, profile_prefix)
        self.graphs: dict[str, OrtGraph] = {}
        self.precision = precision
        quantized = _quantized_files(self.manifest, precision, self.dir)
        kinds = tuple(graphs or self.manifest["files"])
        kinds += tuple(k for k in optional if k in self.manifest["files"] and k not in kinds)
        for kind in kinds:
            # int8/fp8: the Q/DQ files of `eartalk calibrate quantize` for the graphs it quantized
            # (step, decoder); the others stay fp32. Same checks, against the "quantized" entries.
            man = {"files": quantized} if kind in quantized else self.manifest
            path = self.dir / md.manifest_entry(man, kind, self.dir)["file"]
            md.verify_onnx(path, kind, config=self.config, weights_hash=self.weights_hash, manifest=man)
            self.graphs[kind] = OrtGraph(path, self.providers, options)

    def __getitem__(self, kind: str) -> OrtGraph:
        if kind not in self.graphs:
            raise KeyError(f"{self.dir}: graph {kind!r} not loaded; loaded: {sorted(self.graphs)}")
        return self.graphs[kind]

    def end_profiling(self) -> dict[str, str]:
        """Stop ORT profiling; ``{kind: profile json path}``."""
        return {k: g.end_profiling() for k, g in self.graphs.items()}


class OrtBackend(Backend):
    """:class:`~eartalk.runtime.backend.Backend` over the ONNX graphs of ``onnx_dir``.

    ``cfg``: the ModelConfig the caller serves; the files must have been exported for exactly it
    (None: take the manifest's). ``weights_hash``: when given, the files must come from those
    weights. ``provider``: ``cpu`` | ``cuda`` | ``tensorrt``. ``threads``: intra-op threads per
    graph (default min(2, cores)). ``profile_prefix``: enable ORT's per-node profiler.
    ``precision``: ``fp32`` | ``int8`` | ``fp8``: the Q/DQ step and decoder graphs of
    ``eartalk calibrate quantize`` listed in the manifest (the other graphs stay fp32).
    """

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path | None = None, cfg=None, provider: str | None = None,
                 weights_hash: str | None = None, threads: int | None = None,
                 profile_prefix: str | None = None, *, model=None, random_init: bool = False, seed: int = 0,
                 device: str | None = None, precision: str = "fp32"):
        # runtime.make_backend passes model/random_init/seed/device: the files must then come from
        # exactly that bundle (its config and weights hash), not merely from the same preset
        if onnx_dir is None:
            raise ValueError(f"the onnxruntime backend needs onnx_dir=: export the graphs first with "
                             f"`eartalk export onnx --model {model or 'tiny'}{' --random-init' if random_init else ''} --out DIR`")
        if model is not None:
            from eartalk.export.compare import bundle_hash
            from eartalk.runtime.model_loader import load_model
            bundle = load_model(model, random_init=random_init, seed=seed)
            cfg = bundle.cfg if cfg is None else cfg
            weights_hash = weights_hash or bundle_hash(bundle)
        provider = provider or device or "cpu"
        self.graphs = OrtGraphs(onnx_dir, provider, config=cfg.to_dict() if cfg is not None else None,
                                weights_hash=weights_hash, threads=threads, graphs=GRAPH_KINDS,
                                profile_prefix=profile_prefix, precision=precision, optional=("refine",))
        if cfg is None:   # the manifest's config (OrtBackend(onnx_dir) alone)
            from eartalk.model.config import ModelConfig
            cfg = ModelConfig.from_dict(self.graphs.config)
        entry = md.manifest_entry(self.graphs.manifest, "audio_encoder", onnx_dir)
        super().__init__(cfg, entry["inputs"]["mel_window"]["shape"][1])
        self.provider = provider
        self.precision = precision
        self.weights_hash = self.graphs.weights_hash

    @classmethod
    def from_bundle(cls, onnx_dir: str | Path, bundle, **kw) -> "OrtBackend":
        """For a runtime ModelBundle: the files must carry its config and weights hash."""
        from eartalk.export.compare import bundle_hash
        return cls(onnx_dir, bundle.cfg, weights_hash=bundle_hash(bundle), **kw)

    def tokenize(self, images):
        return self.graphs["tokenizer_encode"](np.asarray(images, np.float32))[0]

    def reference(self, portrait):
        return self.graphs["tokenizer_reference"](np.asarray(portrait, np.float32))[0]

    def prefill(self, portrait_tokens):
        k, v = self.graphs["prefill"](np.asarray(portrait_tokens, np.int64))
        return k, v

    def encode_audio(self, mel_window):
        return self.graphs["audio_encoder"](np.asarray(mel_window, np.float32))[0]

    def step(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag):
        # dtypes of the step contract; asarray is a no-op (no copy) when they already match
        logits, k, v = self.graphs["step"](
            np.asarray(prev_tokens, np.int64), np.asarray(audio, np.float32), np.asarray(cond, np.float32),
            np.asarray(cond_mask, np.bool_), np.asarray(past_k, np.float32), np.asarray(past_v, np.float32),
            np.asarray(past_lag, np.int32))
        return logits, k, v

    def refine(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag, draft, draft_known):
        return self.graphs["refine"](
            np.asarray(prev_tokens, np.int64), np.asarray(audio, np.float32), np.asarray(cond, np.float32),
            np.asarray(cond_mask, np.bool_), np.asarray(past_k, np.float32), np.asarray(past_v, np.float32),
            np.asarray(past_lag, np.int32), np.asarray(draft, np.int64), np.asarray(draft_known, np.bool_))[0]

    def refine_blocker(self) -> str | None:
        why = super().refine_blocker()
        if why is None and "refine" not in self.graphs.graphs:
            return (f"{self.graphs.dir} has no refine.onnx (exported before refinement, or with --graphs "
                    f"leaving it out): re-export with `eartalk export onnx`")
        if why is None and self.precision != "fp32":
            return f"refinement passes run on the fp32 graphs only (precision {self.precision} has no quantized refine graph)"
        return why

    def decode_float(self, codes, ref):
        return self.graphs["tokenizer_decode"](np.asarray(codes, np.float32), np.asarray(ref, np.float32))[0]

    def end_profiling(self) -> dict[str, str]:
        return self.graphs.end_profiling()

    def close(self) -> None:
        self.graphs.graphs.clear()
