"""calibration/quantize.py: Q/DQ files TensorRT's builder expects, metadata and manifest, the
accuracy gate naming excluded nodes, graph outputs (new_k/new_v) never clipped by a calibration
range, FP8 refused below sm_89, and stale calibration data refused."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eartalk.calibration.quantize import (PrecisionUnsupported, fp32_graph_outputs, outputs_from_dequantize,
                                          quantize)
from eartalk.calibration.record import CalibrationDataError, record
from eartalk.data.synth import synthesize_corpus
from eartalk.export import metadata as md
from eartalk.export.compare import bundle_hash
from eartalk.export.onnx_export import export_onnx
from eartalk.export.trt_build import precision_onnx
from eartalk.runtime.model_loader import load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    b = load_model("test", random_init=True, seed=0)
    onnx_dir = root / "onnx"
    export_onnx(b.cfg, b.gpt, b.tokenizer, b.audio, onnx_dir, model_name="test", weights_hash=bundle_hash(b),
                graphs=("step", "tokenizer_decode"))
    synthesize_corpus(root / "corpus", clips=3, seed=0, size=128, workers=1, progress=False)
    record("test", root / "corpus", root / "calib", split="train", random_init=True, max_clips=2,
           max_frames=40, samples=16, progress=False)
    return root, onnx_dir, root / "calib"


@pytest.fixture(scope="module")
def int8(setup):
    root, onnx_dir, calib = setup
    out = root / "q"
    entries = quantize(onnx_dir, calib, "int8", out, max_rounds=8)   # a random model: the gate may need more rounds
    return out, entries


def test_int8_files_metadata_and_manifest(setup, int8):
    _, onnx_dir, _ = setup
    out, entries = int8
    man = md.read_manifest(out)
    assert set(man["quantized"]["int8"]) == {"step", "tokenizer_decode"}
    for kind in ("step", "tokenizer_decode"):
        path = out / f"{kind}.int8.onnx"
        e = man["quantized"]["int8"][kind]
        assert e["file"] == path.name and e["sha256"] == md.file_sha256(path)
        # provenance copied, so the runtime's checks apply unchanged; quantization described
        m = md.verify_onnx(path, kind, config=man["model_config"], weights_hash=man["weights_sha256"])
        props = md.read_props(m)
        assert props["precision"] == "int8" and props["source_sha256"] == md.file_sha256(onnx_dir / f"{kind}.onnx")
        q = json.loads(props["quantization"])
        assert q["per_channel_weights"] and q["symmetric"] and q["method"] == {"step": "entropy", "tokenizer_decode": "percentile"}[kind]
        ops = {n.op_type for n in m.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        # symmetric int8 (TensorRT: zero point 0) and per-channel weights (a 1-D scale on a weight DQ)
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2]
        assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
        assert any(inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1
                   for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
        # what export/trt_build.py looks for
        assert precision_onnx(out, kind, "int8", out) == path
        assert e["gate_passed"], e["rounds"]
        assert not outputs_from_dequantize(m)
    assert entries["step"]["metrics"]["token_agreement"] >= 0.97
    assert entries["tokenizer_decode"]["metrics"]["psnr_db"] >= 35


def _pitfall_model():
    """x -> MatMul(W1) -> k; k is a graph output AND feeds MatMul(W2): the K/V projection pattern."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["k"], name="k_proj"),
         helper.make_node("MatMul", ["k", "w2"], ["y"], name="use_k")],
        "kv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_kv_outputs_are_not_clipped_to_the_calibration_range(tmp_path):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    src, dst = tmp_path / "kv.onnx", tmp_path / "kv.q.onnx"
    onnx.save(_pitfall_model(), str(src))
    small = [{"x": np.random.default_rng(i).uniform(-0.1, 0.1, (1, 8)).astype(np.float32)} for i in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(small)

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, extra_options={"ActivationSymmetric": True})
    m = onnx.load(str(dst))
    assert "k" in outputs_from_dequantize(m)            # the pitfall exists in plain onnxruntime output
    # an input inside the calibrated input range whose K lies outside K's calibrated range: aligned
    # with the strongest column of W1, as a K cache entry can be at a stream position never recorded
    w1 = numpy_helper.to_array(_pitfall_model().graph.initializer[0])
    j = int(np.abs(w1).sum(0).argmax())
    x = (0.1 * np.sign(w1[:, j]))[None].astype(np.float32)
    ref = ort.InferenceSession(str(src)).run(["k"], {"x": x})[0]
    clipped = ort.InferenceSession(m.SerializeToString()).run(["k"], {"x": x})[0]
    calib_max = max(np.abs(ort.InferenceSession(str(src)).run(["k"], f)[0]).max() for f in small)
    assert np.abs(ref).max() > 1.5 * calib_max
    assert np.abs(clipped).max() <= 1.01 * calib_max             # saturated at the calibration range
    assert "k" in fp32_graph_outputs(m)
    onnx.checker.check_model(m)
    assert outputs_from_dequantize(m) == []
    k, y = ort.InferenceSession(m.SerializeToString()).run(["k", "y"], {"x": x})
    # K is the float MatMul output again: only the input's own int8 rounding remains, no clipping
    assert np.abs(k).max() > 1.5 * calib_max
    assert np.linalg.norm(k - ref) / np.linalg.norm(ref) < 0.02
    assert np.isfinite(y).all()


def test_step_kv_outputs_are_float_and_unsaturated(setup, int8):
    """On the real step graph: new_k/new_v are not produced by a DequantizeLinear, and on held-out
    recorded samples they track fp32 without saturating (max |K| reached, small relative error)."""
    from eartalk.calibration.record import load_calibration
    _, onnx_dir, calib = setup
    out, _ = int8
    m = onnx.load(str(out / "step.int8.onnx"))
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    assert producer["new_k"] != "DequantizeLinear" and producer["new_v"] != "DequantizeLinear"
    cal = load_calibration(calib, "step")
    fp, q = ort.InferenceSession(str(onnx_dir / "step.onnx")), ort.InferenceSession(m.SerializeToString())
    for i in range(3, len(cal), 4):                      # the gate's held-out samples
        a = fp.run(["new_k", "new_v"], cal.feed(i))
        b = q.run(["new_k", "new_v"], cal.feed(i))
        for x, y in zip(a, b):
            assert np.abs(y).max() >= 0.95 * np.abs(x).max()
            assert np.linalg.norm(x - y) / np.linalg.norm(x) < 0.05


def test_gate_excludes_and_names_nodes(setup, tmp_path):
    _, onnx_dir, calib = setup
    strict = {"step": {"token_agreement": 1.01, "kv_rel_error": 0.0}, "tokenizer_decode": {"psnr_db": 35.0}}
    e = quantize(onnx_dir, calib, "int8", tmp_path / "strict", graphs=("step",), gates=strict, max_rounds=1)["step"]
    assert not e["gate_passed"] and e["excluded_nodes"]
    assert all("gate failed" in x["reason"] and "lost_db" in x for x in e["excluded"])
    m = onnx.load(str(tmp_path / "strict" / "step.int8.onnx"))
    node = {n.name: n for n in m.graph.node}
    inits = {t.name for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    for name in e["excluded_nodes"]:          # excluded = its inputs are float, not DequantizeLinear outputs
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node[name].input
                   if i not in inits)


def test_fp8_refused_below_sm89_and_built_otherwise(setup, tmp_path):
    _, onnx_dir, calib = setup
    with pytest.raises(PrecisionUnsupported, match="8.9"):
        quantize(onnx_dir, calib, "fp8", tmp_path / "f", target_sm=87)
    assert not (tmp_path / "f").exists()                  # refused before writing anything
    with pytest.raises(ValueError, match="distribution"):
        quantize(onnx_dir, calib, "fp8", tmp_path / "f", method="entropy")
    e = quantize(onnx_dir, calib, "fp8", tmp_path / "f", target_sm=89, graphs=("step",), max_rounds=0)["step"]
    m = onnx.load(str(tmp_path / "f" / "step.fp8.onnx"))
    q_types = {i.data_type for i in m.graph.initializer if i.name.endswith("zero_point")}
    assert TensorProto.FLOAT8E4M3FN in q_types
    assert e["min_compute_capability"] == "8.9" and e["target_sm"] == "8.9"
    assert 0 <= e["metrics"]["token_agreement"] <= 1           # measured on ORT CPU, whatever it shows


def test_a_second_precision_into_the_same_folder_keeps_the_first(setup, tmp_path):
    """int8 then fp8 into one --out: the manifest lists both (it used to keep only the last)."""
    _, onnx_dir, calib = setup
    out = tmp_path / "q"
    quantize(onnx_dir, calib, "int8", out, graphs=("step",), max_rounds=0)
    quantize(onnx_dir, calib, "fp8", out, target_sm=89, graphs=("step",), max_rounds=0)
    q = md.read_manifest(out)["quantized"]
    assert set(q) == {"int8", "fp8"}
    assert q["int8"]["step"]["file"] == "step.int8.onnx" and q["fp8"]["step"]["file"] == "step.fp8.onnx"
    assert q["int8"]["step"]["sha256"] == md.file_sha256(out / "step.int8.onnx")
    # a folder quantized from another model keeps nothing of it
    man = md.read_manifest(out)
    md.write_manifest(out, {**man, "weights_sha256": "f" * 64})
    quantize(onnx_dir, calib, "fp8", out, target_sm=89, graphs=("step",), max_rounds=0)
    assert set(md.read_manifest(out)["quantized"]) == {"fp8"}


def test_stale_calibration_data_is_refused(setup, tmp_path):
    _, onnx_dir, calib = setup
    stale = tmp_path / "stale"
    shutil.copytree(calib, stale)
    card = json.loads((stale / "card.json").read_text())
    card["weights_sha256"] = "f" * 64                      # recorded from another model version
    (stale / "card.json").write_text(json.dumps(card))
    with pytest.raises(CalibrationDataError, match="another model version"):
        quantize(onnx_dir, stale, "int8", tmp_path / "out")
    card["weights_sha256"] = md.read_manifest(onnx_dir)["weights_sha256"]
    card["config"] = {**card["config"], "head_dim": 16}
    (stale / "card.json").write_text(json.dumps(card))
    with pytest.raises(CalibrationDataError, match="another model config"):
        quantize(onnx_dir, stale, "int8", tmp_path / "out")


def _reads_dequantized(m, name):
    node = {n.name: n for n in m.graph.node}[name]
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    return any(producer.get(i) == "DequantizeLinear" for i in node.input)


def test_attention_products_stay_fp32_unless_asked(setup, int8, tmp_path):
    """By default only ops with a weight are quantized: the matmuls of two activations (queries
    against the KV cache) are listed and read float inputs; ``activations=True`` quantizes them."""
    _, onnx_dir, calib = setup
    out, entries = int8
    src = onnx.load(str(onnx_dir / "step.onnx"))
    inits = {t.name for t in src.graph.initializer}
    act = [n.name for n in src.graph.node if n.op_type == "MatMul" and not any(i in inits for i in n.input)]
    assert act and entries["step"]["activation_nodes_fp32"] == act
    q = onnx.load(str(out / "step.int8.onnx"))
    assert not any(_reads_dequantized(q, name) for name in act)
    weighted = [n.name for n in src.graph.node if n.op_type == "MatMul" and any(i in inits for i in n.input)]
    kept = set(entries["step"]["excluded_nodes"])
    assert any(_reads_dequantized(q, name) for name in weighted if name not in kept)
    e = quantize(onnx_dir, calib, "int8", tmp_path / "all", graphs=("step",), max_rounds=0, activations=True)["step"]
    assert e["activation_nodes_fp32"] == []
    qa = onnx.load(str(tmp_path / "all" / "step.int8.onnx"))
    assert any(_reads_dequantized(qa, name) for name in act)


def test_head_nodes_golden_on_a_toy_graph():
    """The walk stops at the first matmul on each path back from the output, whatever lies between."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="body"),
             helper.make_node("MatMul", ["h", "w"], ["a"], name="head"),
             helper.make_node("Transpose", ["a"], ["t"], name="tr"),
             helper.make_node("MatMul", ["x", "w"], ["b"], name="bias_path"),
             helper.make_node("Add", ["t", "b"], ["logits"], name="add")]
    g = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 4])], [w])
    from eartalk.calibration.quantize import head_nodes
    m = helper.make_model(g)
    assert sorted(head_nodes(m)) == ["bias_path", "head"]
    assert head_nodes(m, "missing") == []


def test_output_heads_stay_fp32_unless_asked(setup, int8, tmp_path):
    """The matmul that makes the logits and the convs that write the decoder's pixels and flow read
    float inputs by default and are named in the manifest; ``quantize_head=True`` quantizes them."""
    from eartalk.calibration.quantize import head_nodes
    _, onnx_dir, calib = setup
    out, entries = int8
    src = onnx.load(str(onnx_dir / "step.onnx"))
    head = head_nodes(src)
    assert len(head) == 1 and entries["step"]["head_nodes_fp32"] == head
    assert not _reads_dequantized(onnx.load(str(out / "step.int8.onnx")), head[0])
    dec = onnx.load(str(onnx_dir / "tokenizer_decode.onnx"))
    dec_head = head_nodes(dec, "images")
    convs = {n.name for n in dec.graph.node if n.op_type == "Conv"}
    # the pixel head, the fine flow and the coarse flow (through its resize): three convs, not all
    assert len(dec_head) == 3 and set(dec_head) < convs
    assert entries["tokenizer_decode"]["head_nodes_fp32"] == dec_head
    qd = onnx.load(str(out / "tokenizer_decode.int8.onnx"))
    assert not any(_reads_dequantized(qd, n) for n in dec_head)
    e = quantize(onnx_dir, calib, "int8", tmp_path / "h", graphs=("step",), max_rounds=0, quantize_head=True)["step"]
    assert e["head_nodes_fp32"] == []
    assert _reads_dequantized(onnx.load(str(tmp_path / "h" / "step.int8.onnx")), head[0])


def test_qdq_placement_per_graph(int8):
    """Step graph: Q/DQ on a quantized op's inputs only (TensorRT's placement), no quantized matmul
    feeds a QuantizeLinear, so its result stays float. Decoder: outputs quantized too, so that
    onnxruntime's CPU provider can run its convs as QLinearConv (every conv but the output heads
    and the gate's exclusions feeds a QuantizeLinear)."""
    out, entries = int8
    for kind, outputs in (("step", False), ("tokenizer_decode", True)):
        m = onnx.load(str(out / f"{kind}.int8.onnx"))
        quantized = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and _reads_dequantized(m, n.name)]
        assert quantized
        feeds_q = {n.name for n in quantized
                   if any(c.op_type == "QuantizeLinear" for c in m.graph.node if n.output[0] in c.input)}
        if outputs:
            assert feeds_q, kind
        else:
            assert feeds_q == set(), kind
