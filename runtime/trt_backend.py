"""TensorRT backend: the engines of ``eartalk export trt`` behind the runtime's Backend interface.

Importable without tensorrt (nothing TensorRT-specific happens at import); constructing
:class:`TrtBackend` without it raises ``TensorRTUnavailable`` whose message says what to install
on the device. Before an engine is deserialised its sidecar JSON (written by
``export/trt_build.py``) must match, field by field (:func:`check_engine_metadata`):

- the engine file's sha256 (a half-copied engine never reaches the deserialiser);
- this GPU's compute capability and this TensorRT's version -- engines are not portable
  across either ("Version tag does not match");
- the model config and weights hash the caller serves, the graph kind and the precision.

Engine I/O goes through cuda-python's driver API: device buffers sized for ``max_batch`` are
allocated once per tensor, inputs copied H2D, ``execute_async_v3`` on one stream, outputs D2H.
The paged ``append``/``gather`` helpers (``kv_append``/``kv_gather``) use
:class:`~eartalk.runtime.cuda_kernels.CudaKernels` when they load, on the engines' stream in the
same (primary) context, so a kernel and the engine call after it are ordered without a host
sync. A pool in device memory (a torch CUDA tensor, or a ``cuda_kernels.DeviceArray`` over an
allocation of this backend) is appended to and gathered from in place, with no host round trip;
the page table stays a host array (validated before the launch, uploaded by the kernels) or
comes as ``cuda_kernels.Mirrored``. A host (numpy) pool goes through the kernels' copying path,
or the numpy reference when the kernels did not load. The engines' own I/O is still numpy in/out
(the Backend interface).

Untested here: CI has no GPU and no tensorrt. Only the metadata checks and the import refusal
run in ``tests/test_trt.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eartalk.export import metadata as md
from eartalk.runtime.backend import Backend

GRAPH_KINDS = ("tokenizer_encode", "tokenizer_reference", "prefill", "audio_encoder", "step",
               "tokenizer_decode")


class EngineMismatch(md.ArtifactError):
    """An engine was built for another GPU, TensorRT, model or precision than asked."""


def check_engine_metadata(engine_path: str | Path, meta: dict, *, trt_version: str, cc: tuple[int, int],
                          graph: str, precision: str | None = None, config: dict | None = None,
                          weights_hash: str | None = None, engine_sha256: str | None = None) -> None:
    """Raise :class:`EngineMismatch` naming ``engine_path`` and the first field that differs."""
    p = Path(engine_path)
    want_cc = f"{cc[0]}.{cc[1]}"
    checks = [
        ("graph", meta.get("graph"), graph),
        ("engine sha256", meta.get("engine_sha256"), engine_sha256),
        ("compute capability", meta.get("compute_capability"), want_cc),
        ("TensorRT version", meta.get("tensorrt_version"), trt_version),
        ("precision", meta.get("precision"), precision),
        ("model config", meta.get("model_config"), config),
        ("weights sha256", meta.get("weights_sha256"), weights_hash),
    ]
    for what, got, want in checks:
        if want is not None and got != want:
            hint = {"compute capability": "engines are per GPU: rebuild on this device with `eartalk export trt`",
                    "TensorRT version": "engines are per TensorRT version: rebuild with this TensorRT",
                    "engine sha256": "the engine file changed or is incomplete"}.get(what, "rebuild the engine")
            raise EngineMismatch(f"{p}: {what} {got!r} in its sidecar, expected {want!r} ({hint})")


def load_sidecar(engine_path: str | Path) -> dict:
    side = Path(str(engine_path) + ".json")
    if not side.is_file():
        raise EngineMismatch(f"{side}: no sidecar metadata; build engines with `eartalk export trt`")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatch(f"{side}: not valid JSON: {e}") from e


class _Cuda:
    """The few driver calls the backend needs, with errors that name the call."""

    def __init__(self, device: int):
        from cuda.bindings import driver
        self.d = driver
        self._ck(driver.cuInit(0), "cuInit")
        self.dev = self._ck(driver.cuDeviceGet(device), "cuDeviceGet")
        self.ctx = self._ck(driver.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self._ck(driver.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        self.stream = self._ck(driver.cuStreamCreate(0), "cuStreamCreate")

    def _ck(self, ret, what):
        err, *vals = ret if isinstance(ret, tuple) else (ret,)
        if err != self.d.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{what} failed: {err}")
        return vals[0] if len(vals) == 1 else None

    def alloc(self, nbytes):
        return self._ck(self.d.cuMemAlloc(max(1, nbytes)), "cuMemAlloc")

    def h2d(self, ptr, a: np.ndarray):
        self._ck(self.d.cuMemcpyHtoDAsync(ptr, a.ctypes.data, a.nbytes, self.stream), "cuMemcpyHtoDAsync")

    def d2h(self, a: np.ndarray, ptr):
        self._ck(self.d.cuMemcpyDtoHAsync(a.ctypes.data, ptr, a.nbytes, self.stream), "cuMemcpyDtoHAsync")

    def sync(self):
        self._ck(self.d.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def free(self, ptr):
        self.d.cuMemFree(ptr)

    def close(self):
        self.d.cuStreamDestroy(self.stream)
        self.d.cuDevicePrimaryCtxRelease(self.dev)


class _Engine:
    """One deserialised engine with device buffers for its max batch."""

    def __init__(self, trt, runtime, path: Path, cuda: _Cuda, max_batch: int):
        self.path, self.cuda, self.trt = path, cuda, trt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise md.ArtifactError(f"{path}: TensorRT could not deserialise the engine")
        self.ctx = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.bufs = {}
        for n in names:   # the profile's max shape bounds every buffer
            shape = self.engine.get_tensor_profile_shape(n, 0)[2] if n in self.inputs else None
            if shape is None:
                shape = [max_batch if d < 0 else d for d in self.engine.get_tensor_shape(n)]
            self.bufs[n] = cuda.alloc(int(np.prod(shape)) * self.dtypes[n].itemsize)
            self.ctx.set_tensor_address(n, int(self.bufs[n]))

    def __call__(self, *args):
        if len(args) != len(self.inputs):
            raise ValueError(f"{self.path.name}: {len(args)} inputs given, expected {self.inputs}")
        host = []
        for n, a in zip(self.inputs, args):
            a = np.ascontiguousarray(a, self.dtypes[n])
            host.append(a)                      # kept alive until the copies finish
            self.ctx.set_input_shape(n, a.shape)
            self.cuda.h2d(self.bufs[n], a)
        outs = [np.empty(tuple(self.ctx.get_tensor_shape(n)), self.dtypes[n]) for n in self.outputs]
        if not self.ctx.execute_async_v3(int(self.cuda.stream)):
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed")
        for n, o in zip(self.outputs, outs):
            self.cuda.d2h(o, self.bufs[n])
        self.cuda.sync()
        return outs

    def close(self):
        for p in self.bufs.values():
            self.cuda.free(p)
        self.bufs.clear()


class TrtBackend(Backend):
    """Backend over ``engine_dir/<kind>.<precision>.engine`` (+ ``.json`` sidecars)."""

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, cfg, precision: str = "fp16", device: int = 0,
                 weights_hash: str | None = None, use_cuda_kernels: bool = True):
        from eartalk.export.trt_build import device_compute_capability, import_tensorrt
        from eartalk.export.trtexec import engine_name
        trt = import_tensorrt()                       # clear install instructions when missing
        cc = device_compute_capability(device)
        engine_dir = Path(engine_dir)
        metas = {}
        for kind in GRAPH_KINDS:                      # verify everything before deserialising anything
            path = engine_dir / engine_name(kind, precision)
            if not path.is_file():
                raise md.ArtifactError(f"{path}: no engine; build with `eartalk export trt --precision {precision}`")
            meta = load_sidecar(path)
            check_engine_metadata(path, meta, trt_version=trt.__version__, cc=cc, graph=kind, precision=precision,
                                  config=cfg.to_dict(), weights_hash=weights_hash, engine_sha256=md.file_sha256(path))
            metas[kind] = meta
        self.cuda = _Cuda(device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {k: _Engine(trt, self._runtime, engine_dir / engine_name(k, precision), self.cuda,
                                   metas[k]["batch"]["max"]) for k in GRAPH_KINDS}
        mel = self.engines["audio_encoder"].engine.get_tensor_shape("mel_window")
        super().__init__(cfg, int(mel[1]))
        self.precision, self.cc = precision, cc
        self.max_batch = min(int(m["batch"]["max"]) for m in metas.values())
        self.kernels = None
        if use_cuda_kernels:
            try:
                from eartalk.runtime.cuda_kernels import CudaKernels
                # the engines' stream: kernels and engine calls run in one order, no host sync
                self.kernels = CudaKernels(device, stream=self.cuda.stream)
            except Exception:   # no fatbin and no NVRTC: the numpy reference does append/gather
                self.kernels = None

    def tokenize(self, images):
        return self.engines["tokenizer_encode"](images)[0]

    def reference(self, portrait):
        return self.engines["tokenizer_reference"](portrait)[0]

    def prefill(self, portrait_tokens):
        k, v = self.engines["prefill"](portrait_tokens)
        return k, v

    def encode_audio(self, mel_window):
        return self.engines["audio_encoder"](mel_window)[0]

    def step(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag):
        logits, k, v = self.engines["step"](prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag)
        return logits, k, v

    def decode_float(self, codes, ref):
        return self.engines["tokenizer_decode"](codes, ref)[0]

    # paged KV ops: in place on a device pool, or on a host pool (kernels' copying path or the
    # numpy reference)
    def kv_append(self, pool, pages, new_k, new_v) -> None:
        if self.kernels is not None:
            return self.kernels.append(pool, pages, new_k, new_v)
        self._host_pool_only(pool)
        from eartalk.runtime import kv_reference
        return kv_reference.append(pool, pages, new_k, new_v)

    def kv_gather(self, pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots, out=None):
        """``out``: optional ``(past_k, past_v, past_lag)`` to write (required for a DeviceArray pool)."""
        if self.kernels is not None:
            return self.kernels.gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots,
                                       out=out)
        self._host_pool_only(pool)
        from eartalk.runtime import kv_reference
        res = kv_reference.gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots)
        if out is None:
            return res
        for o, r in zip(out, res):
            o[...] = r
        return tuple(out)

    @staticmethod
    def _host_pool_only(pool):
        if not isinstance(pool, np.ndarray):
            raise RuntimeError(f"the CUDA kernels did not load, and the numpy reference only takes a "
                               f"numpy pool, got {type(pool).__name__}: build the kernels "
                               f"(`make build-kernels`) or keep the pool on the host")

    def close(self) -> None:
        for e in getattr(self, "engines", {}).values():
            e.close()
        if getattr(self, "kernels", None) is not None:
            self.kernels.close()
        if getattr(self, "cuda", None) is not None:
            self.cuda.close()
            self.cuda = None
