"""Shared fixtures and helpers: tiny models built in code, data made locally; nothing from a hub."""

import os
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qformat import FORMAT_VERSION, LOWBIT_DOMAIN, LOWBIT_OP, SIDECAR_KEYS
from qformat.io import write_json

FMNIST_DIR = os.environ.get("QVIT_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_nvcc = pytest.mark.skip(reason="needs nvcc on PATH")
    skip_trt = pytest.mark.skip(reason="needs the TensorRT Python bindings")
    has_cuda = _has_cuda()
    has_nvcc = shutil.which("nvcc") is not None
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "nvcc" in item.keywords and not has_nvcc:
            item.add_marker(skip_nvcc)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def fmnist_dir():
    if not os.path.isfile(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.fail(f"Fashion-MNIST missing under {FMNIST_DIR}: apt-get install dataset-fashion-mnist")
    return FMNIST_DIR


# ----------------------------------------------------------------------------- shared helpers

def one_line_error(capsys, fn, argv, needle, code=2):
    """Run ``fn(argv)`` (a CLI main): it must exit ``code`` with exactly one ``error: ...`` line holding ``needle``."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    return err[0]


@pytest.fixture
def expect_error(capsys):
    """``expect_error(main, argv, needle)``: one ``error:`` line and exit 2 (see :func:`one_line_error`)."""
    return lambda fn, argv, needle, code=2: one_line_error(capsys, fn, argv, needle, code)


_CONVERTED = {}


def converted_model(name="vit_fmnist", bits=4, seed=0, calib_n=16, **cfg):
    """A fresh converted model as a ``train.deploy.Deployable`` (cached per arguments): prepare the
    Q-ViT preset (``cfg`` overrides QuantConfig fields, e.g. ``overrides={...}``), calibrate on real
    Fashion-MNIST training images, convert."""
    import json

    key = (name, bits, seed, calib_n, json.dumps(cfg, sort_keys=True))
    if key not in _CONVERTED:
        import torch

        from train.config import QuantConfig
        from train.data import FMNIST_CLASSES, eval_images
        from train.deploy import from_model
        from train.models import create_model, model_spec
        from train.qat import convert, prepare
        from train.quant import calibrate

        spec = model_spec(name)
        torch.manual_seed(seed)
        model = create_model(name).eval()
        qcfg = QuantConfig.for_method("qvit", bits, **cfg)
        prepare(model, qcfg)
        x, _ = eval_images(calib_n, split="train", model=name)
        calibrate(model, [x])
        convert(model)
        meta = {"model": name, "quant": qcfg.to_dict(), "input_size": list(spec.input_size), "mean": list(spec.mean),
                "std": list(spec.std), "class_names": list(FMNIST_CLASSES), "num_classes": 10, "metrics": {}}
        _CONVERTED[key] = from_model(model, meta)
    return _CONVERTED[key]


@pytest.fixture(scope="session")
def converted():
    """Factory fixture for :func:`converted_model`."""
    return converted_model


def test_images(name="vit_fmnist", n=16):
    """The first ``n`` Fashion-MNIST test images preprocessed for registry model ``name``."""
    from train.data import eval_images

    return eval_images(n, split="test", model=name)[0]


test_images.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint as python -m train writes it: prepared + calibrated vit_fmnist at 3 bits, with metadata."""
    import torch

    from train.checkpoint import save_checkpoint
    from train.config import QuantConfig
    from train.data import FMNIST_CLASSES, eval_images
    from train.models import create_model, model_spec
    from train.qat import prepare
    from train.quant import calibrate

    spec = model_spec("vit_fmnist")
    torch.manual_seed(0)
    m = create_model("vit_fmnist").eval()
    cfg = QuantConfig.for_method("qvit", 3)
    prepare(m, cfg)
    x, _ = eval_images(16, split="train", model="vit_fmnist")
    calibrate(m, [x])
    meta = {"model": "vit_fmnist", "quant": cfg.to_dict(), "input_size": list(spec.input_size),
            "mean": list(spec.mean), "std": list(spec.std), "class_names": list(FMNIST_CLASSES),
            "num_classes": 10, "metrics": {"top1": 0.5}, "bits": cfg.bits_summary()}
    d = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(str(d / "best"), m, meta)


# ----------------------------------------------------------------------------- a toy ONNX for the runtime
#
# Conv(4x4, stride 4) -> ReLU -> global average pool -> Gemm, optionally behind a Q/DQ pair (the ``qdq``
# format) or with a stand-in ``QvitLowBitLinear`` node (``lowbit``).  Not a trained model: its
# predictions mean nothing, its shapes and ops are realistic.

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
