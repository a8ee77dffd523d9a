"""Deployment artifacts: ONNX graphs (``onnx_export``), their provenance (``metadata``), TensorRT
engines (``trt_build``), trtexec command lines (``trtexec``) and backend parity checks (``compare``).
Installed as ``eartalk.export``."""
