"""eartalk: an edge runtime for real-time audio-driven talking heads.

The top-level folders of the repository install here: ``eartalk.runtime`` (streaming sessions over
a paged KV cache), ``eartalk.export`` (ONNX / TensorRT), ``eartalk.calibration`` (INT8/FP8),
``eartalk.kernels_cu`` (CUDA sources). The model, data and evaluation code live in this package.
"""
__version__ = "0.1.0"


def open_session(*args, **kwargs):
    """Open a streaming session; see ``eartalk.runtime.open_session``."""
    from eartalk.runtime import open_session as _open
    return _open(*args, **kwargs)
