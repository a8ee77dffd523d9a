"""Provenance of exported artifacts: what is written into each ONNX file and ``manifest.json``, and
the checks a backend runs before it trusts a file.

Every exported ONNX file carries, in ``metadata_props``:

- ``eartalk.graph``: the graph kind (``step``, ``prefill``, ``tokenizer_decode``, ...);
- ``eartalk.model_config``: the :class:`~eartalk.model.config.ModelConfig` JSON (``to_json``);
- ``eartalk.version``: the eartalk version that exported it;
- ``eartalk.weights_sha256``: a hash of the model weights (:func:`weights_sha256`);
- ``eartalk.format``: :data:`FORMAT_VERSION` of this layout.

``manifest.json`` beside the files lists each file with its sha256, graph kind, opset and I/O
shapes. :func:`verify_onnx` refuses, with an :class:`ArtifactError` naming the file and the
mismatch, a file that is missing, truncated/corrupt, differs from its manifest hash, or was
exported from another eartalk version, model config or set of weights.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT_VERSION = 2   # 2: tokenizer_decode reads codes float32 [B,N,d], not tokens (2026-12-06)
MANIFEST = "manifest.json"
PREFIX = "eartalk."
KEYS = ("graph", "model_config", "version", "weights_sha256", "format")


class ArtifactError(RuntimeError):
    """An exported artifact cannot be used: the message names the file and what does not match."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(modules: dict) -> str:
    """sha256 over every tensor of ``{prefix: nn.Module}``'s state dicts, in sorted name order.

    Names, dtypes and shapes are hashed with the bytes, so a renamed or reshaped tensor changes
    the hash even when its bytes do not. Buffers count too (a VQ codebook's ``initialized`` flag
    changes what the graph computes).
    """
    import torch
    h = hashlib.sha256()
    for prefix in sorted(modules):
        sd = modules[prefix].state_dict()
        for name in sorted(sd):
            t = sd[name].detach().cpu().contiguous()
            h.update(f"{prefix}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            # bytes through uint8 view: works for bf16/fp8 tensors numpy cannot represent
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def current_version() -> str:
    from eartalk import __version__
    return __version__


def make_props(graph: str, config_json: str, weights_hash: str, version: str | None = None) -> dict[str, str]:
    """The ``metadata_props`` of one exported graph (keys with the ``eartalk.`` prefix)."""
    return {PREFIX + "graph": graph, PREFIX + "model_config": config_json,
            PREFIX + "version": version or current_version(), PREFIX + "weights_sha256": weights_hash,
            PREFIX + "format": str(FORMAT_VERSION)}


def write_props(model, props: dict[str, str]) -> None:
    """Set (replace) ``props`` in an in-memory ``onnx.ModelProto``'s ``metadata_props``."""
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    for k in sorted(props):
        model.metadata_props.add(key=k, value=props[k])


def load_onnx(path: str | Path):
    """``onnx.load`` with a clear error for a missing, truncated or corrupt file."""
    import onnx
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such ONNX file (run `eartalk export onnx` first)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:   # protobuf DecodeError and friends: the message alone is cryptic
        raise ArtifactError(f"{path}: not a readable ONNX model (truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from e
    if not model.graph.node:
        raise ArtifactError(f"{path}: ONNX model has an empty graph (truncated or corrupt?)")
    return model


def read_props(model_or_path) -> dict[str, str]:
    """The ``eartalk.*`` metadata of an ONNX model (path or ModelProto), prefix stripped."""
    model = load_onnx(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    return {p.key[len(PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}


# ------------------------------------------------------------------ manifest
def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")   # contract order kept
    tmp.replace(path)   # atomic: a reader never sees half a manifest
    return path


def read_manifest(onnx_dir: str | Path) -> dict:
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest (is {onnx_dir} the output of `eartalk export onnx`?)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from e
    if m.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: manifest format {m.get('format')!r}, this eartalk reads {FORMAT_VERSION}; "
                            f"re-export with `eartalk export onnx`")
    return m


def manifest_entry(manifest: dict, graph: str, onnx_dir: str | Path = "") -> dict:
    files = manifest.get("files", {})
    if graph not in files:
        raise ArtifactError(f"{Path(onnx_dir) / MANIFEST}: no graph {graph!r}; it lists {sorted(files)}")
    return files[graph]


# ------------------------------------------------------------------ verification
def _config_diff(got: dict, want: dict) -> str:
    keys = sorted(set(got) | set(want))
    diffs = [f"{k}={got.get(k, '<missing>')!r} (expected {want.get(k, '<missing>')!r})"
             for k in keys if got.get(k) != want.get(k)]
    return ", ".join(diffs)


def check_props(path: str | Path, props: dict[str, str], graph: str | None = None,
                config: dict | None = None, weights_hash: str | None = None,
                version: str | None = None) -> None:
    """Raise :class:`ArtifactError` unless ``props`` (from :func:`read_props`) match the expectation.

    ``None`` skips a check, except the version, which defaults to the running eartalk's: graphs
    are only guaranteed to match the code that exported them.
    """
    missing = [k for k in KEYS if k not in props]
    if missing:
        raise ArtifactError(f"{path}: no eartalk metadata {missing} (not exported by `eartalk export onnx`?)")
    if props["format"] != str(FORMAT_VERSION):
        raise ArtifactError(f"{path}: export format {props['format']}, this eartalk reads {FORMAT_VERSION}; "
                            f"re-export with `eartalk export onnx`")
    if graph is not None and props["graph"] != graph:
        raise ArtifactError(f"{path}: graph kind {props['graph']!r}, expected {graph!r}")
    want_version = version or current_version()
    if props["version"] != want_version:
        raise ArtifactError(f"{path}: exported by eartalk {props['version']}, this is eartalk {want_version}; "
                            f"re-export with `eartalk export onnx`")
    if config is not None:
        try:
            got = json.loads(props["model_config"])
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: model config metadata is not JSON: {e}") from e
        if got != config:
            raise ArtifactError(f"{path}: exported for another model config: {_config_diff(got, config)}")
    if weights_hash is not None and props["weights_sha256"] != weights_hash:
        raise ArtifactError(f"{path}: weights sha256 {props['weights_sha256'][:16]}... does not match the "
                            f"model's {weights_hash[:16]}... (exported from other weights)")


def verify_onnx(path: str | Path, graph: str | None = None, config: dict | None = None,
                weights_hash: str | None = None, manifest: dict | None = None,
                version: str | None = None):
    """Load and verify one exported file; returns the ``onnx.ModelProto`` (without external data).

    With ``manifest`` (from :func:`read_manifest`) the file's sha256 must equal its entry; this is
    what catches a file modified after export even when its metadata still parses.
    """
    path = Path(path)
    if manifest is not None:
        kind = graph or path.name.split(".")[0]
        entry = manifest_entry(manifest, kind, path.parent)
        if entry["file"] != path.name:
            raise ArtifactError(f"{path}: manifest lists {kind!r} as {entry['file']!r}, not {path.name!r}")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                                f"{entry['sha256'][:16]}... (file changed or corrupted after export)")
    model = load_onnx(path)
    check_props(path, read_props(model), graph, config, weights_hash, version)
    return model
