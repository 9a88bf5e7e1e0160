"""jetson/: tegrastats power parsing (TX2, Nano, Orin NX, AGX Orin lines), nvpmodel, L4T detection, bench matrix."""

import os
import stat
import subprocess

import pytest
from conftest import make_toy_model

from jetson import bench_matrix, l4t
from runtime import power as tegrastats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TX2 = ("RAM 2019/7846MB (lfb 1014x4MB) SWAP 0/3923MB (cached 0MB) CPU [2%@345,off,off,1%@345,0%@345,0%@345] "
       "EMC_FREQ 0% GR3D_FREQ 0% PLL@33.5C MCPU@33.5C PMIC@100C Tboard@29C GPU@31.5C BCPU@33.5C thermal@32.4C "
       "Tdiode@30.25C VDD_SYS_GPU 152/152 VDD_SYS_SOC 380/380 VDD_4V0_WIFI 0/0 VDD_IN 1829/1829 VDD_SYS_CPU 152/152 "
       "VDD_SYS_DDR 244/244")
NANO = ("RAM 1445/3956MB (lfb 4x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) CPU [9%@102,5%@102,0%@102,"
        "0%@102] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@20C CPU@22.5C PMIC@100C GPU@22C AO@27.5C "
        "thermal@22.25C POM_5V_IN 2578/2578 POM_5V_GPU 0/0 POM_5V_CPU 491/491")
ORIN_NX = ("11-25-2024 20:53:01 RAM 2452/15656MB (lfb 2x4MB) SWAP 0/7828MB (cached 0MB) CPU [1%@729,0%@729,"
           "0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] GR3D_FREQ 0% cpu@46.5C soc2@45.6C soc0@45.8C gpu@45.9C "
           "tj@46.5C soc1@45.2C VDD_IN 4946mW/4946mW VDD_CPU_GPU_CV 515mW/515mW VDD_SOC 1433mW/1433mW")
AGX_ORIN = ("RAM 3413/30536MB (lfb 6623x4MB) SWAP 0/15268MB (cached 0MB) CPU [0%@2201,0%@2201] EMC_FREQ 0%@3199 "
            "GR3D_FREQ 0%@[1300,1300] VIC_FREQ 729 APE 233 CV0@-256C CPU@48.5C Tboard@37C SOC2@44.843C "
            "VDD_GPU_SOC 2394mW/2394mW VDD_CPU_CV 399mW/399mW VIN_SYS_5V0 2623mW/2623mW VDDQ_VDD2_1V8AO 504mW/504mW")


@pytest.mark.parametrize("line,mw,src", [
    (TX2, 1829, "VDD_IN"), (NANO, 2578, "POM_5V_IN"), (ORIN_NX, 4946, "VDD_IN"),
    (AGX_ORIN, 2394 + 399 + 2623 + 504, "sum(VDDQ_VDD2_1V8AO+VDD_CPU_CV+VDD_GPU_SOC+VIN_SYS_5V0)"),
])
def test_board_power_of_each_format(line, mw, src):
    assert tegrastats.board_power_mw(line) == (mw, src)


def test_rails_skip_memory_fields_and_summary():
    rails = tegrastats.parse_rails(TX2)
    assert "RAM" not in rails and "SWAP" not in rails and rails["VDD_SYS_GPU"] == 152 and len(rails) == 6
    assert tegrastats.board_power_mw("RAM 1/2MB SWAP 0/0MB") == (None, None)
    s = tegrastats.summarize([TX2, TX2.replace("VDD_IN 1829/1829", "VDD_IN 2829/2000"), "garbage"])
    assert s["samples"] == 2 and abs(s["mean_w"] - 2.329) < 1e-9 and s["max_w"] == 2.829


def test_nvpmodel_parsing():
    assert tegrastats.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert tegrastats.parse_nvpmodel("NVPM WARN: x\nNV Power Mode: MODE_15W_2CORE\n2") == {
        "name": "MODE_15W_2CORE", "id": 2}


def test_power_logger_runs_a_tegrastats_process(tmp_path):
    import time

    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\nwhile true; do echo '{}'; sleep 0.05; done\n".format(ORIN_NX))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    logger = tegrastats.PowerLogger(interval_ms=50, exe=str(fake))
    logger.start()
    time.sleep(0.4)
    s = logger.stop()
    assert s["samples"] >= 1 and abs(s["mean_w"] - 4.946) < 1e-9 and s["source"] == "VDD_IN"


def test_power_logger_without_tegrastats(monkeypatch):
    monkeypatch.setattr(tegrastats.shutil, "which", lambda name: None)
    with pytest.raises(OSError, match="tegrastats not found"):
        tegrastats.PowerLogger()


def test_l4t_detection(tmp_path):
    rel = tmp_path / "nv_tegra_release"
    rel.write_text("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64, "
                   "DATE: Sat Feb 19 17:05:08 UTC 2022\n")
    info = l4t.detect(str(rel))
    assert (info["l4t"], info["jetpack"], info["tensorrt"], info["python"], info["board"]) == (
        "32.7.1", "4.6.1", "8.2", "3.6", "t186ref")
    assert info["docker_base"] == "nvcr.io/nvidia/l4t-base:r32.7.1"
    # JetPack 6: version from the nvidia-l4t-core package when the release file is absent
    info = l4t.detect(str(tmp_path / "absent"), run=lambda *a, **k: b"36.4.3-20250107174145")
    assert (info["l4t"], info["jetpack"], info["tensorrt"], info["source"]) == (
        "36.4.3", "6.2", "10.3", "dpkg nvidia-l4t-core")
    assert info["target"] == "orin-jp6"
    info = l4t.describe("36.3.0")  # JetPack 6.0 ships TensorRT 8.6, which no row claims
    assert (info["jetpack"], info["target"], info["tensorrt"]) == ("6.0", None, None)

    def no_dpkg(*a, **k):
        raise OSError("no dpkg")

    assert l4t.detect(str(tmp_path / "absent"), run=no_dpkg) is None
    assert l4t.describe("35.9.9")["jetpack"] == "5.x"


def test_bench_matrix_ort_dry_run(tmp_path):
    art = tmp_path / "artifacts"
    make_toy_model(art, "toy_w4a4.qdq")
    out = str(tmp_path / "matrix")
    rows = bench_matrix.run(bench_matrix.parse_args(
        ["--models", "toy", "--bits", "4", "2", "--backend", "ort", "--artifacts", str(art), "--iters", "5",
         "--warmup", "1", "--out", out]), log=lambda *a: None)
    assert rows[0]["status"] == "ok" and rows[0]["img_s"] > 0
    assert rows[1]["status"].startswith("failed: missing") and "make export" in rows[1]["status"]
    md = open(out + ".md").read()
    assert "| toy | 4 | qdq |" in md and "| img/s |" in md
    assert bench_matrix.pick_format("auto", 4, "NVIDIA Jetson TX2") == "lowbit"
    assert bench_matrix.pick_format("auto", 8, "NVIDIA Jetson TX2") == "qdq"
    assert bench_matrix.pick_format("auto", 4, "Jetson AGX Orin") == "qdq"


def test_bench_matrix_takes_every_format_and_names_files_as_export_does(tmp_path):
    """--format accepts every format (woq included) and reads the file the exporter names."""
    import qformat
    from qformat.formats import artifact_stem

    art = tmp_path / "artifacts"
    make_toy_model(art, artifact_stem("toy", 4, "woq"), fmt="fp32")  # a float toy graph under the woq name
    for fmt in qformat.FORMATS:
        assert bench_matrix.parse_args(["--models", "toy", "--bits", "4", "--format", fmt]).format == fmt
    assert bench_matrix.onnx_path(str(art), "toy", 4, "woq") == str(art / "toy_w4a4.woq.onnx")
    rows = bench_matrix.run(bench_matrix.parse_args(
        ["--models", "toy", "--bits", "4", "--format", "woq", "--backend", "ort", "--artifacts", str(art),
         "--iters", "2", "--warmup", "1", "--out", str(tmp_path / "m")]), log=lambda *a: None)
    assert [(r["format"], r["status"]) for r in rows] == [("woq", "ok")]


def test_setup_script_refuses_non_jetson():
    if l4t.detect() is not None:
        pytest.skip("this is a Jetson")
    r = subprocess.run(["bash", "jetson/setup.sh", "--no-deps"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "not a Jetson" in r.stderr
