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
    e2e = {"model": "deit_s", "bits": 4, "logit_cosine": 0.99,
           "batches": {"1": {"fp16": {"eager": 500.0, "graph": 900.0}, "lowbit": {"eager": 400.0, "graph": 950.0}}}}
    (tmp_path / "bench_e2e.json").write_text(json.dumps({"e2e": e2e}))
    text = gpu_check.write_summary(check, {"name": "GPU"})
    assert "| sanitizer racecheck | FAILED | 3.0 | exit 3 (see tools.log) |" in text
    assert "| layer | M |" in text and "3000 GB/s" in text
    assert "| 1 | 500 | 400 | 900 | 950 |" in text
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"][1]["status"] == "FAILED"
