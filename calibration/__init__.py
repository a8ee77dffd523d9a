"""eartalk.calibration: explicit INT8/FP8 (Q/DQ) quantization calibrated on recorded real streams.

    record    run held-out clips through the runtime, save real step/decoder inputs + a data card
    quantize  onnxruntime quantize_static (QDQ, symmetric, per-channel weights) with an accuracy
              gate that keeps failing nodes fp32; graph outputs (new_k/new_v) never read a DQ
    report    token agreement, PSNR, lip-sync and identity-drift deltas against fp32 (JSON/MD/PNG)

CLI: ``eartalk calibrate record|quantize|report``; runtime: ``precision="int8"`` on the
onnxruntime backend.
"""
