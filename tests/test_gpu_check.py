"""The one-command GPU check, on a machine without a GPU: preflight, the dry-run line, the summary."""

import json

import pytest

from runtime.torchtools import gpu_check


def test_missing_requirement_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "REQUIRED_TOOLS", ("nvcc", "no-such-tool-qvit"))
    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: gpu-check needs no-such-tool-qvit")


def test_without_gpu_it_builds_for_sm90_and_names_what_it_skipped(monkeypatch, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU dry run")
    monkeypatch.setenv("OUT", str(tmp_path))
    archs = []

    def fake_build(check, arch):
        archs.append(arch)
        return check.record("build kernels (cmake)", "ok", 0.0, "")

    monkeypatch.setattr(gpu_check, "build_library", fake_build)
    assert gpu_check.main([]) == 0
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gpu-check:")]
    assert archs == ["90"]
    assert len(out) == 1 and "skipped the extension build, pytest -m cuda, compute-sanitizer" in out[0]


def test_summary_has_steps_tables_and_e2e(tmp_path):
    check = gpu_check.Check(str(tmp_path), True)
    check.record("pytest -m cuda", "ok", 12.0, "")
    check.record("sanitizer racecheck", "FAILED", 3.0, "exit 3 (see tools.log)")
    (tmp_path / "bench_gemm.json").write_text(json.dumps({"markdown": "| layer | M |", "copy_gbps": 3000.0}))
    e2e = {"model": "deit_s", "modes": ["w4a8", "w4a4"], "logit_cosine": {"w4a8": 0.99, "w4a4": 0.9},
           "int4_path_identical": {"w4a4": True},
           "batches": {"1": {"fp16": {"eager": 500.0, "graph": 900.0}, "w4a8": {"eager": 400.0, "graph": 950.0},
                             "w4a4": {"eager": 300.0, "graph": 450.0}}}}
    (tmp_path / "bench_e2e.json").write_text(json.dumps({"e2e": e2e}))
    text = gpu_check.write_summary(check, {"name": "GPU"})
    assert "| sanitizer racecheck | FAILED | 3.0 | exit 3 (see tools.log) |" in text
    assert "| layer | M |" in text and "3000 GB/s" in text
    assert "| 1 | 500 | 900 | 400 | 950 (1.06x) | 300 | 450 (0.50x) |" in text
    assert "PROJECTION" in text and "IMMA.16864" in text and "identical to auto: w4a4 yes" in text
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["steps"][1]["status"] == "FAILED"
    assert saved["e2e"]["modes"] == ["w4a8", "w4a4"] and all(r["projection"] for r in saved["orin_projection"])


def _rows():
    def row(model, layer, m, backend, ms, gbps=None, n=384, k=384):
        return {"model": model, "layer": layer, "m": m, "n": n, "k": k, "backend": backend, "bits": 4,
                "kernel": "x", "ms": ms, "ms_call": ms, "tops": None, "gbps": gbps}

    return [row("deit_s", "qkv", 197, "cublas_fp16", 0.0036, n=1152), row("deit_s", "qkv", 197, "lowbit_w4a4", 0.0030,
                                                                          n=1152),
            row("deit_s", "qkv", 16, "cublas_fp16", 0.0033, n=1152),
            row("large", "proj", 1, "lowbit_w4a16", 0.02, gbps=2000.0, n=8192, k=8192)]


def test_gemv_bandwidth_and_m197_table():
    from runtime.torchtools import bench_gemm

    g = gpu_check.gemv_bandwidth({"rows": _rows(), "copy_gbps": 4000.0})
    assert g["gbps"] == 2000.0 and g["share_of_copy"] == 0.5
    assert gpu_check.gemv_bandwidth({"rows": []}) is None
    table = bench_gemm.format_m197(_rows())
    assert "| deit_s/qkv 1152x384 | 3.6 | 3.0 (1.20x) |" in table and "M = 197" in table
    assert "| 16 |" not in table  # only the M = 197 rows


def test_e2e_modes_parse_and_refuse():
    from runtime.torchtools import bench_gemm

    args = bench_gemm.parse_args(["--model-e2e", "deit_s", "--e2e-modes", "w4a8", "W2A2"])
    assert args.e2e_modes == [(4, 8), (2, 2)]
    with pytest.raises(SystemExit) as e:
        bench_gemm.parse_args(["--e2e-modes", "w5a8"])
    assert e.value.code == 2


@pytest.mark.parametrize("line", ["========= Error: Device not supported", "==ERROR== LibraryNotLoaded: libcupti",
                                  "[Errno 2] No such file or directory: 'ncu'"])
def test_tool_that_cannot_run_is_skipped_not_failed(tmp_path, line):
    """compute-sanitizer / ncu failing because of the image is SKIPPED with the tool's own line as the reason."""
    import sys

    check = gpu_check.Check(str(tmp_path), True)
    cmd = [sys.executable, "-c", "import sys; print({!r}); sys.exit(3)".format(line)]
    assert check.run("ncu mma_deit", cmd, "tools.log", 30, tool=True) is False
    step = check.steps[-1]
    assert step["status"] == "skipped" and line.strip() in step["detail"]
    # the same failure from a step that is not a tool, or a real finding of a tool: FAILED
    check.run("pytest", cmd, "pytest.log", 30)
    assert check.steps[-1]["status"] == "FAILED"
    real = [sys.executable, "-c", "import sys; print('========= Invalid __global__ read of size 4'); sys.exit(3)"]
    check.run("sanitizer memcheck", real, "tools.log", 30, tool=True)
    assert check.steps[-1]["status"] == "FAILED"


def test_missing_tool_binary_is_skipped(tmp_path):
    check = gpu_check.Check(str(tmp_path), True)
    check.run("ncu gemv_large", [str(tmp_path / "no-such-ncu")], "tools.log", 30, tool=True)
    assert check.steps[-1]["status"] == "skipped"


def test_orin_projection_is_labelled_and_ordered():
    from runtime import roofline

    rows = roofline.precision_rows(devices=("orin_nano_8gb",), batches=(32,))
    by = {r["precision"].split()[0]: r for r in rows}
    assert all(r["projection"] for r in rows)
    assert by["W4A4"]["img_s"] > by["W8A8"]["img_s"] > by["FP16"]["img_s"]
    assert roofline.precision_markdown(rows).startswith("PROJECTION")
