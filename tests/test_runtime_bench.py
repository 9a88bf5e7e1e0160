"""runtime/bench.py on the ORT backend (toy model): JSON, --compare ratios, batch sweep, entry points, torch path."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import make_toy_model
from onnx import numpy_helper

from runtime import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _run(argv, capsys=None):
    assert bench.main(argv) == 0
    return capsys.readouterr().out if capsys else None


def test_ort_bench_json_is_well_formed(tmp_path, capsys):
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    out_json = tmp_path / "r.json"
    out = _run(["--onnx", onnx, "--iters", "30", "--warmup", "3", "--batch", "1,4", "--threads", "1",
                "--json", str(out_json)], capsys)
    last = out.strip().splitlines()[-1]
    assert last.startswith("bench: 2 run(s); best toy w4a4 qdq ort") and last.endswith(str(out_json))
    res = json.loads(out_json.read_text())
    assert res["schema"] == bench.SCHEMA and res["compare"] is None
    assert [r["batch"] for r in res["runs"]] == [1, 4]
    for r in res["runs"]:
        assert r["status"] == "ok" and r["backend"] == "ort" and r["iterations"] == 30
        assert r["img_per_s"] > 0 and r["seconds"] > 0 and r["images"] == 30 * r["batch"]
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["mean"] > 0
        assert r["output_shape"] == [r["batch"], 10] and r["memory"]["host_peak_rss_mb"] > 0
        assert r["power"] is None  # not a Jetson


def test_compare_prints_ratios(tmp_path, capsys):
    a = make_toy_model(tmp_path, "toy_w8a8.qdq", seed=1)
    b = make_toy_model(tmp_path, "toy_w4a4.lowbit", fmt="lowbit")
    out_json = tmp_path / "c.json"
    out = _run(["--compare", "--onnx", a, b, "--iters", "20", "--warmup", "2", "--json", str(out_json)], capsys)
    res = json.loads(out_json.read_text())
    ratios = res["compare"]["ratios"]
    assert res["compare"]["baseline"] == "toy w8a8 qdq ort"
    assert [r["label"] for r in ratios] == ["toy w8a8 qdq ort", "toy w4a4 lowbit ort"]
    assert ratios[0]["speedup"] == 1.0 and ratios[1]["speedup"] > 0
    runs = dict((r["label"], r) for r in res["runs"])
    want = runs["toy w4a4 lowbit ort"]["img_per_s"] / runs["toy w8a8 qdq ort"]["img_per_s"]
    assert abs(ratios[1]["speedup"] - want) < 1e-9
    assert "speedup" in out and "x toy w8a8 qdq ort" in out.strip().splitlines()[-1]


def test_fixed_batch_model_skips_other_batches_and_duration_mode(tmp_path):
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq", batch=1)
    args = bench.parse_args(["--onnx", onnx, "--duration", "0.2", "--batch", "1,2", "--json", str(tmp_path / "d.json")])
    res = bench.run(args, log=lambda *a: None)
    ok, skipped = res["runs"]
    assert ok["status"] == "ok" and ok["iterations"] >= 10 and ok["seconds"] >= 0.2
    assert skipped["status"] == "skipped" and "fixed batch of 1" in skipped["reason"]


@pytest.mark.parametrize("how", (["runtime/bench.py"], ["-m", "runtime.bench"]))
def test_entry_points_and_no_torch_or_cv2(tmp_path, how):
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    # run the real entry points, then check the heavy packages stayed unimported
    r = subprocess.run([sys.executable] + how + ["--onnx", onnx, "--iters", "5", "--warmup", "1", "--json",
                                                str(tmp_path / "e.json")], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("bench: 1 run(s)")
    probe = ("import sys, runtime.bench as b; "
             "b.run(b.parse_args(['--onnx', {!r}, '--iters', '2', '--json', {!r}]), log=lambda *a: None); "
             "print('torch' in sys.modules, 'cv2' in sys.modules)").format(onnx, str(tmp_path / "p.json"))
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    os.remove(onnx[:-5] + ".json")
    for argv, needle in ((["--onnx", onnx], "no sidecar"),
                         (["--onnx", str(tmp_path / "nope.onnx")], "not found"),
                         (["--onnx", onnx, "--backend", "torch"], "--checkpoint"),
                         (["--onnx", onnx, "--batch", "0"], "must be >= 1")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1


def test_torch_backend_runs_the_real_checkpoint_loader(tiny_checkpoint, tmp_path, monkeypatch):
    """--checkpoint goes through train.deploy.load_deployable: the backend's logits are the converted model's."""
    import torch
    from conftest import test_images

    from runtime.backends import open_backend
    from train.checkpoint import load_converted

    backend = open_backend("torch", tiny_checkpoint)
    assert backend.meta["model"] == "vit_fmnist" and backend.meta["bits"]["weight"] == 3
    x = test_images("vit_fmnist", 8)
    model, _ = load_converted(tiny_checkpoint)
    with torch.no_grad():
        want = model(x).numpy()
    backend.prepare(8)
    np.testing.assert_array_equal(backend.run(x.numpy()), want)
    res = bench.run(bench.parse_args(["--checkpoint", tiny_checkpoint, "--iters", "3", "--warmup", "1", "--batch",
                                      "1,2", "--json", str(tmp_path / "t.json")]), log=lambda *a: None)
    assert [r["status"] for r in res["runs"]] == ["ok", "ok"]
    assert res["runs"][0]["backend"] == "torch" and res["runs"][1]["output_shape"] == [2, 10]
    import runtime.torchtools

    monkeypatch.setitem(sys.modules, "runtime.torchtools.gemm_ext", None)
    monkeypatch.delattr(runtime.torchtools, "gemm_ext", raising=False)  # an earlier test may have imported it
    with pytest.raises(Exception, match="--lowbit-cuda needs runtime/torchtools/gemm_ext.py"):
        bench.run(bench.parse_args(["--checkpoint", tiny_checkpoint, "--lowbit-cuda", "--iters", "1",
                                    "--json", str(tmp_path / "u.json")]), log=lambda *a: None)


def test_toy_model_matches_numpy(tmp_path):
    """The toy graphs compute what they claim: conv -> relu -> mean -> gemm, behind a Q/DQ pair for qdq."""
    import onnxruntime as ort

    x = np.random.RandomState(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for fmt in ("qdq", "lowbit", "fp32"):
        path = make_toy_model(tmp_path, "toy_w4a4." + fmt, fmt=fmt, seed=5)
        m = onnx.load(path)
        w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        xin = np.clip(np.rint(x / np.float32(0.05)), -128, 127) * np.float32(0.05) if fmt == "qdq" else x
        patches = xin.reshape(2, 3, 8, 4, 8, 4).transpose(0, 2, 4, 1, 3, 5).reshape(2, 64, 48)
        feat = np.maximum(patches @ w["w_conv"].reshape(16, 48).T + w["b_conv"], 0).mean(axis=1)
        want = feat @ w["w_fc"].T + w["b_fc"]
        got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
