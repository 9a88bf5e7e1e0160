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


def test_trt_compare_builds_every_precision_of_one_model(tmp_path, capsys, monkeypatch):
    """--compare --backend trt on one export: the FP16 (fp32 graph), INT8 (qdq) and INT4 weight-only (woq)
    engines of the same checkpoint are built and timed in one run; one that cannot build here is a skipped row."""
    from qformat.errors import UserError
    from runtime import backends, build

    make_toy_model(tmp_path, "toy_w4a4.fp32", fmt="fp32")
    qdq = make_toy_model(tmp_path, "toy_w4a4.qdq", seed=1)
    make_toy_model(tmp_path, "toy_w4a4.woq", fmt="woq", seed=2)
    built = {}

    def fake_build(a, log=print):  # no TensorRT here: the "engine" is the ONNX, timed on ORT
        if a.onnx.endswith(".woq.onnx"):
            raise UserError("this ONNX stores INT4 weights, which need TensorRT 10.0+")
        built[a.onnx] = a.precision
        return a.onnx, {}

    def fake_open(kind, path, **kw):
        b = backends.open_backend("ort", path, threads=1)
        b.precision = built[path]
        return b

    monkeypatch.setattr(build, "build", fake_build)
    monkeypatch.setattr(bench, "open_backend", fake_open)
    out_json = tmp_path / "t.json"
    out = _run(["--compare", "--backend", "trt", "--onnx", qdq, "--iters", "5", "--warmup", "1",
                "--json", str(out_json)], capsys)
    assert [os.path.basename(p) + ":" + v for p, v in built.items()] == ["toy_w4a4.fp32.onnx:fp16",
                                                                        "toy_w4a4.qdq.onnx:auto"]
    res = json.loads(out_json.read_text())
    assert [(r["label"], r["status"]) for r in res["runs"]] == [
        ("toy w4a4 fp32 trt fp16", "ok"), ("toy w4a4 qdq trt auto", "ok"), ("toy w4a4 woq trt auto", "skipped")]
    assert "INT4 weights" in res["runs"][2]["reason"] and "not built" in out
    assert res["compare"]["baseline"] == "toy w4a4 fp32 trt fp16" and len(res["compare"]["ratios"]) == 2


def test_trt_compare_names_missing_and_foreign_exports(tmp_path, capsys):
    qdq = make_toy_model(tmp_path, "toy_w4a4.qdq")
    other = make_toy_model(tmp_path, "toy_w4a4.fp32", fmt="fp32")
    side = other[:-len(".onnx")] + ".json"
    meta = json.loads(open(side).read())
    meta["source_checkpoint"] = "runs/another/best.safetensors"
    with open(side, "w") as f:
        json.dump(meta, f)
    notes = []
    got = bench.trt_variants(qdq, notes.append)
    assert got == [(qdq, "auto")]
    assert any("not an export of the same checkpoint" in n for n in notes)
    assert any("no int4-woq engine" in n and "--format woq" in n for n in notes)


def test_learned_bit_export_is_labelled_by_its_budget(tmp_path, capsys):
    """A learned allocation's bits are nominal (weight/act = budget widths): the table names it ``mp3``."""
    from qformat.formats import artifact_stem
    from qformat.io import read_json, write_json

    bits = {"weight": 3, "act": 3, "qkv": 3, "attn": 3, "embed": 8, "head": 8, "budget": 3}
    mp = make_toy_model(tmp_path, artifact_stem("toy", bits, "qdq"))
    assert os.path.basename(mp) == "toy_mp3.qdq.onnx"
    side = mp[:-len(".onnx")] + ".json"
    write_json(side, dict(read_json(side), model="toy", bits=bits))
    uniform = make_toy_model(tmp_path, "toy_w3a3.qdq", seed=1)
    out_json = tmp_path / "c.json"
    out = _run(["--compare", "--onnx", uniform, mp, "--iters", "3", "--warmup", "1", "--json", str(out_json)], capsys)
    labels = [r["label"] for r in json.loads(out_json.read_text())["compare"]["ratios"]]
    assert labels == ["toy w3a3 qdq ort", "toy mp3 qdq ort"]
    assert "toy mp3 qdq ort" in out and out.count("w3a3") == out.count("toy w3a3")


def test_trt_variants_follow_the_format_facts():
    """The --compare --backend trt sweep: a float baseline, then one engine per quantized format TensorRT builds
    without plugins -- what each format quantizes comes from qformat.formats, not from this table."""
    from qformat import formats

    (base, base_fmt, base_prec), *rest = bench.TRT_VARIANTS
    assert not formats.facts(base_fmt).weights and not formats.facts(base_fmt).activations and base_prec == "fp16"
    plugin_free = {f for f, facts in formats.FORMAT_FACTS.items() if facts.weights and f != "lowbit"}
    assert {fmt for _, fmt, _ in rest} == plugin_free
    for name, fmt, _ in rest:
        assert ("woq" in name) == formats.weight_only(fmt), name
