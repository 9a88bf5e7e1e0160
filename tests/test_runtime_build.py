"""runtime.build: clear errors without TensorRT, and the whole build flow against fake TensorRT 8.2 / 8.6 / 10.3."""

import ctypes
import os
import subprocess
import sys

import pytest
from conftest import make_toy_model
from test_runtime_trt_compat import VERSIONS, make_fake_trt

from qformat import LOWBIT_OP
from qformat.errors import UserError
from qformat.io import read_json, sidecar_path
from runtime import build, engine_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = {"name": "Orin", "compute_capability": "8.7", "total_memory": 1 << 34}


def _has_trt():
    try:
        import tensorrt  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_trt(), reason="checks the message shown when TensorRT is absent")
def test_without_tensorrt_clear_error_and_trtexec_line(tmp_path):
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    r = subprocess.run([sys.executable, "-m", "runtime.build", "--onnx", onnx], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: the TensorRT Python bindings are not importable")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "trtexec --onnx=" + onnx in r.stdout and "--int8" in r.stdout and "--minShapes=input:1x3x32x32" in r.stdout


def test_print_only_and_bad_inputs(tmp_path, capsys):
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq", batch=1)
    assert build.main(["--onnx", onnx, "--print-only", "--int8"]) == 0
    out = capsys.readouterr().out
    assert "trtexec --onnx=" in out and "--int8" in out and "Shapes" not in out  # static batch: no shapes
    with pytest.raises(SystemExit) as e:
        build.main(["--onnx", onnx, "--print-only", "--fp16"])
    assert e.value.code == 2 and "use --int8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        build.main(["--onnx", str(tmp_path / "missing.onnx")])
    assert e.value.code == 2
    assert "make export" in capsys.readouterr().err
    with pytest.raises(UserError, match="fixed batch of 1"):
        build.build(build.parse_args(["--onnx", onnx, "--batch", "4"]), log=lambda *a: None)
    os.remove(sidecar_path(onnx))
    with pytest.raises(UserError, match="no sidecar"):
        build.build(build.parse_args(["--onnx", onnx]), log=lambda *a: None)


def _install_fake(monkeypatch, version, **kw):
    trt = make_fake_trt(version, **kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(build, "gpu_info", lambda: dict(GPU))
    return trt


@pytest.mark.parametrize("version", VERSIONS)
def test_build_with_fake_trt_writes_engine_sidecar_and_caches(tmp_path, monkeypatch, version):
    trt = _install_fake(monkeypatch, version)
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    lines = []
    path, meta = build.build(build.parse_args(["--onnx", onnx, "--batch", "2", "--max-batch", "8"]), log=lines.append)
    assert os.path.isfile(path) and path.endswith(".int8.b2.{}.engine".format(meta["cache_key"]))
    side = read_json(sidecar_path(path))
    for k in engine_cache.ENGINE_KEYS + ("input_size", "mean", "std", "class_names", "input_name", "output_name"):
        assert k in side, k
    assert side["tensorrt_version"] == version and side["gpu_name"] == "Orin" and side["precision"] == "int8"
    assert ("profile", ("input", [1, 3, 32, 32], [2, 3, 32, 32], [8, 3, 32, 32])) in trt.calls
    assert any(c[0] == "build_serialized_network" and "INT8" in c[1] and "FP16" in c[1] for c in trt.calls)
    assert any(line.startswith("trtexec --onnx=") for line in lines)
    memflag = "--memPoolSize=workspace:1024M" if version != "8.2.1" else "--workspace=1024"
    assert any(memflag in line for line in lines)
    assert os.path.isfile(os.path.join(os.path.dirname(path), "timing.{}.8.7.cache".format(version)))
    # second run: cache hit, no rebuild
    n_builds = sum(c[0] == "build_serialized_network" for c in trt.calls)
    lines.clear()
    path2, _ = build.build(build.parse_args(["--onnx", onnx, "--batch", "2", "--max-batch", "8"]), log=lines.append)
    assert path2 == path and any("cache hit" in line for line in lines)
    assert sum(c[0] == "build_serialized_network" for c in trt.calls) == n_builds


def test_tx2_qdq_refused_lowbit_needs_plugin(tmp_path, monkeypatch):
    _install_fake(monkeypatch, "8.2.1", fast_int8=False)
    qdq = make_toy_model(tmp_path, "toy_w4a4.qdq")
    with pytest.raises(UserError, match="no fast INT8"):
        build.build(build.parse_args(["--onnx", qdq]), log=lambda *a: None)
    lowbit = make_toy_model(tmp_path, "toy_w4a4.lowbit", fmt="lowbit")
    with pytest.raises(UserError, match="make plugins.*--plugins"):
        build.build(build.parse_args(["--onnx", lowbit]), log=lambda *a: None)


@pytest.mark.parametrize("version", ("8.2.1", "10.3.0"))
def test_lowbit_with_plugin_builds_fp16_without_reference_function(tmp_path, monkeypatch, version):
    trt = _install_fake(monkeypatch, version, fast_int8=(version != "8.2.1"))
    lib = tmp_path / "libqvit_plugins.so"
    lib.write_bytes(b"\x7fELF fake")

    def fake_cdll(path, mode=0):
        trt.registered.add(LOWBIT_OP)

    monkeypatch.setattr(ctypes, "CDLL", fake_cdll)
    onnx = make_toy_model(tmp_path, "toy_w4a4.lowbit", fmt="lowbit")
    lines = []
    path, meta = build.build(build.parse_args(["--onnx", onnx, "--plugins", str(lib)]), log=lines.append)
    assert meta["plugins"][0]["sha256"] and "--plugins=" + str(lib) in " ".join(lines)
    assert ("init_libnvinfer_plugins", "") in trt.calls
    # the parser got the model without the local reference function, so it must use the plugin
    parse = [c for c in trt.calls if c[0] == "parse"]
    assert parse and parse[0][2] is False
    if version == "8.2.1":
        assert meta["precision"] == "fp16"
        assert any("low-bit weight plugins" in line for line in lines)


def test_trtexec_line_is_shell_quoted(tmp_path, capsys):
    import shlex

    d = tmp_path / "my models $HOME;'x'"
    d.mkdir()
    onnx = make_toy_model(d, "toy w4a4.qdq")
    engine = str(d / "out engine.plan")
    assert build.main(["--onnx", onnx, "--print-only", "--saveEngine", engine]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("trtexec ")][0]
    argv = shlex.split(line)  # what a shell would pass: every path survives as one argument
    assert "--onnx=" + onnx in argv and "--saveEngine=" + engine in argv


def test_batch_above_max_batch_and_zero_workspace_are_refused(tmp_path, capsys):
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    for argv, needle in ((["--batch", "8", "--max-batch", "4"], "--batch 8 is above --max-batch 4"),
                         (["--workspace", "0"], "argument --workspace: must be >= 1, got 0"),
                         (["--useDLACore", "-1"], "argument --useDLACore: must be >= 0, got -1")):
        with pytest.raises(SystemExit) as e:
            build.main(["--onnx", onnx, "--print-only"] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1
