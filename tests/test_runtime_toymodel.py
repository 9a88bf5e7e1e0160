"""A toy classifier ONNX + exporter-style sidecar, built in code, for the runtime tests.

Conv(4x4, stride 4) -> ReLU -> global average pool -> Gemm, optionally behind a Q/DQ
pair (the ``qdq`` format) or with a stand-in ``QvitLowBitLinear`` node (``lowbit``).
Not a trained model: its predictions mean nothing, its shapes and ops are realistic.
"""

import os
import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qformat import FORMAT_VERSION, LOWBIT_DOMAIN, LOWBIT_OP, SIDECAR_KEYS
from qformat.io import write_json

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


def make_toy_model(out_dir, stem="toy_w4a4.qdq", fmt="qdq", channels=3, size=32, classes=10, batch=None, seed=0,
                   class_names=None):
    """Write ``<out_dir>/<stem>.onnx`` and its sidecar; return the ONNX path."""
    rng = np.random.RandomState(seed)
    feat = 16
    w_conv = (rng.standard_normal((feat, channels, 4, 4)) * 0.2).astype(np.float32)
    b_conv = np.zeros(feat, np.float32)
    w_fc = (rng.standard_normal((classes, feat)) * 0.5).astype(np.float32)
    b_fc = (rng.standard_normal(classes) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(w_conv, "w_conv"), numpy_helper.from_array(b_conv, "b_conv"),
             numpy_helper.from_array(w_fc, "w_fc"), numpy_helper.from_array(b_fc, "b_fc")]
    nodes = []
    x = "input"
    if fmt == "qdq":
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "in_scale"),
                  numpy_helper.from_array(np.array(0, np.int8), "in_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["input", "in_scale", "in_zp"], ["in_q"]),
                  helper.make_node("DequantizeLinear", ["in_q", "in_scale", "in_zp"], ["in_dq"])]
        x = "in_dq"
    nodes += [helper.make_node("Conv", [x, "w_conv", "b_conv"], ["c"], kernel_shape=[4, 4], strides=[4, 4]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"], axis=1)]
    functions = []
    opsets = [helper.make_opsetid("", 17)]
    if fmt == "lowbit":
        # stand-in custom node with a model-local reference function (what ORT runs)
        nodes.append(helper.make_node(LOWBIT_OP, ["f", "w_fc", "b_fc"], ["logits"], domain=LOWBIT_DOMAIN))
        fn = helper.make_function(LOWBIT_DOMAIN, LOWBIT_OP, ["X", "W", "B"], ["Y"],
                                  [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1)],
                                  [helper.make_opsetid("", 17)])
        functions.append(fn)
        opsets.append(helper.make_opsetid(LOWBIT_DOMAIN, 1))
    else:
        nodes.append(helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["logits"], transB=1))
    dim0 = batch if batch else "N"
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [dim0, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dim0, classes])], inits)
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, producer_name="qvit-edge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = os.path.join(str(out_dir), stem + ".onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(model, path)
    m = re.search(r"_w(\d)a(\d)", stem)
    wb, ab = (int(m.group(1)), int(m.group(2))) if m else (4, 4)
    names = class_names or (FMNIST_CLASSES if classes == 10 else ["class_{}".format(i) for i in range(classes)])
    sidecar = {
        "format_version": FORMAT_VERSION, "model": stem.split("_w")[0], "format": fmt, "target": "ort", "opset": 17,
        "bits": {"weight": wb, "act": ab, "qkv": ab, "attn": ab, "embed": 8, "head": 8},
        "input_size": [channels, size, size], "mean": [0.5] * channels, "std": [0.25] * channels,
        "class_names": names, "input_name": "input", "output_name": "logits", "metrics": {},
        "exporter_revision": "tests",
    }
    assert set(SIDECAR_KEYS) <= set(sidecar)
    write_json(path[:-len(".onnx")] + ".json", sidecar)
    return path


def test_toy_model_runs_in_ort(tmp_path):
    import onnxruntime as ort

    for fmt in ("qdq", "lowbit", "fp32"):
        path = make_toy_model(tmp_path, "toy_w4a4." + fmt, fmt=fmt)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0]
        assert y.shape == (2, 10)
