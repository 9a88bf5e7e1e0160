"""What the runtime does with inputs that do not fit: broken ONNX files, an ONNX whose input disagrees with
its sidecar, a sidecar left from another export, and NaN/Inf frames (refused, not classified)."""

import json
import os

import numpy as np
import pytest
from conftest import make_toy_model
from test_outputs import one_line_error as _one_line

from qformat.errors import UserError
from qformat.io import sidecar_path
from runtime import backends, bench, build
from runtime.preprocess import NonFiniteInput


@pytest.mark.parametrize("damage", ["truncated", "jpeg", "empty", "text"])
def test_broken_onnx_is_one_line_in_build_and_bench(tmp_path, capsys, damage):
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    blob = open(onnx, "rb").read()
    with open(onnx, "wb") as f:
        f.write({"truncated": blob[: len(blob) * 2 // 3], "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF" + blob[:64],
                 "empty": b"", "text": b"ir_version: 8\ngraph { }\n"}[damage])
    for main, argv, needle in ((build.main, ["--onnx", onnx, "--print-only"], "is not a readable ONNX model"),
                               (build.main, ["--onnx", onnx], "is not a readable ONNX model"),
                               (bench.main, ["--onnx", onnx, "--json", str(tmp_path / "b.json")], onnx)):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        _one_line(capsys, needle)
    assert not os.path.exists(tmp_path / "b.json")


def _mismatched(tmp_path):
    """A 3x32x32 graph whose sidecar says 1x28x28 (the sidecar of another model beside it)."""
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    side = json.loads(open(sidecar_path(onnx)).read())
    side.update(input_size=[1, 28, 28], mean=[0.3], std=[0.3])
    with open(sidecar_path(onnx), "w") as f:
        json.dump(side, f)
    return onnx


def test_input_shape_disagreeing_with_sidecar_names_both_shapes(tmp_path, capsys):
    onnx = _mismatched(tmp_path)
    both = ("[N, 3, 32, 32]", "input_size [1, 28, 28]")
    with pytest.raises(SystemExit):
        build.main(["--onnx", onnx, "--print-only"])
    _one_line(capsys, onnx, *both)
    with pytest.raises(SystemExit):
        bench.main(["--onnx", onnx, "--json", str(tmp_path / "b.json")])
    _one_line(capsys, onnx, *both)
    with pytest.raises(UserError, match=r"\[N, 3, 32, 32\].*input_size \[1, 28, 28\]"):
        backends.open_backend("ort", onnx)


def test_sidecar_from_another_export_is_refused(tmp_path, converted):
    """The exporter records the graph's sha256; a kill between graph and sidecar, or a copied sidecar, is caught."""
    from export.exporter import ExportOptions, ParityOptions, export

    dep = converted("vit_fmnist", 4, calib_n=4)
    res = export(dep, str(tmp_path), ExportOptions("fp32", "ort", parity=ParityOptions(n=0)), log=lambda s: None)
    side = json.loads(open(res.sidecar).read())
    assert len(side["onnx_sha256"]) == 64
    backends.open_backend("ort", res.path).close()  # the pair matches
    other = make_toy_model(tmp_path, "other")  # another graph under the exported name, old sidecar kept
    os.replace(other, res.path)
    with pytest.raises(UserError, match="does not match its sidecar"):
        backends.open_backend("ort", res.path)


def test_runtime_refuses_nonfinite_frames_and_wrong_shapes(tmp_path):
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    be = backends.open_backend("ort", onnx)
    x = np.random.RandomState(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert be.run(x).shape == (4, 10)
    assert np.array_equal(be.run(x.astype(np.float64)), be.run(x))  # float64 is converted, not an ORT error
    for frame, value in ((1, np.nan), (3, np.inf), (0, -np.inf)):
        bad = x.copy()
        bad[frame, 1, 2, 3] = value
        with pytest.raises(NonFiniteInput, match=r"1 frame\(s\) .* hold NaN or Inf \(frame {}\)".format(frame)) as e:
            be.run(bad)
        assert e.value.frames == [frame]
    with pytest.raises(UserError, match=r"input batch of shape \[4, 1, 32, 32\] does not fit .* \[N, 3, 32, 32\]"):
        be.run(x[:, :1])


def test_what_each_format_does_with_nan_and_inf(converted):
    """The facts the README states: why the runtime refuses non-finite frames instead of running them."""
    import torch

    from export.exporter import build_graph
    from export.parity import ort_session

    dep = converted("vit_fmnist", 4, calib_n=4)
    m = dep.model
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x[0, 0, 3, 3], x[1, 0, 5, 5], x[2, 0, 7, 7] = float("nan"), float("inf"), float("-inf")
    with torch.no_grad():
        y = m(x).numpy()
    assert np.isfinite(y).all(axis=1).tolist() == [False, True, True]  # PyTorch: NaN -> NaN, +-Inf clamped
    ok = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)).numpy()
    finite, plain = {}, {}
    for fmt, guard in (("fp32", True), ("qdq", False), ("lowbit", False), ("qdq", True), ("lowbit", True)):
        g = build_graph(dep, fmt, "ort", log=lambda s: None, guard=guard)
        sess = ort_session(g.ort)
        finite[fmt, guard] = np.isfinite(sess.run(None, {"input": x.numpy()})[0]).all(axis=1).tolist()
        if fmt != "fp32":
            logits = sess.run(None, {"input": ok})[0]
            if guard:  # the guard adds exactly 0 to the logits of a finite input
                np.testing.assert_array_equal(logits, plain[fmt])
            plain[fmt] = logits
    assert finite["fp32", True] == [False, False, False]  # NaN propagates; Inf turns into NaN in LayerNorm
    # without the guard, QuantizeLinear maps NaN to a code: a class; with it (the default), NaN logits
    assert finite["qdq", False] == finite["lowbit", False] == [True, True, True]
    assert finite["qdq", True] == finite["lowbit", True] == [False, False, False]
