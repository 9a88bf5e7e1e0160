"""`qvit doctor` (jetson/doctor.py) and the board state bench records (runtime/board.py), on recorded boards.

The boards under tests/fixtures/jetson/ are reconstructed from the documented output formats (see its
README), not captured on devices: TX2 (JetPack 4.6), Orin (JetPack 5.1, 6.2, 7.2) and Thor (JetPack 7.0).
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import make_toy_model

from jetson import doctor
from qformat import targets
from runtime import bench, board

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "jetson")


def recorded(name):
    return board.Host(os.path.join(FIXTURES, name), recorded=True)


# board -> (L4T, JetPack, target, the fix commands doctor must print, no more)
BOARDS = {
    "tx2-jp46": ("32.7.1", "4.6.1", "tx2", {"sudo nvpmodel -m 0", "sudo jetson_clocks"}),
    "orin-jp51": ("35.2.1", "5.1", "orin-jp5", set()),
    "orin-jp62": ("36.4.3", "6.2", "orin-jp6", {"sudo nvpmodel -m 2", "sudo jetson_clocks --fan",
                                               doctor.BUILD_PLUGINS.format("87")}),
    "orin-jp72": ("38.4.0", None, "orin-jp7", {"sudo jetson_clocks --fan"}),
    "thor-jp70": ("38.2.0", "7.0", "thor-jp7", {"sudo nvpmodel -m 0", "sudo jetson_clocks",
                                               doctor.BUILD_PLUGINS.format("110")}),
}


def test_every_fixture_is_tested():
    assert sorted(d for d in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, d))) == sorted(BOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_doctor_on_a_recorded_board(name):
    l4t_version, jetpack, target, fixes = BOARDS[name]
    facts = doctor.collect(recorded(name))
    assert (facts["l4t"]["l4t"], facts["l4t"]["jetpack"], facts["target"]) == (l4t_version, jetpack, target)
    assert {fix for _, fix in doctor.problems(facts)} == fixes
    screen = doctor.render(facts)
    assert "board         " + facts["board"] in screen and "--target " + target in screen
    assert ("problems: none" in screen) == (not fixes)
    for fix in fixes:
        assert "      fix: " + fix in screen


def test_thor_and_tx2_details():
    thor = doctor.collect(recorded("thor-jp70"))
    assert thor["gpu"]["compute_capability"] == "11.0" and thor["cuda"] == "13.0"
    assert thor["docker"] == "docker build -f docker/Dockerfile.jetson-jp7 -t qvit-edge:thor-jp7 ."
    assert thor["plugin_archs"] == {"elf": ["75", "80", "86", "87", "89", "90"], "ptx": ["90"]}
    assert any("no sm_110 code" in what and "PTX 90" in what for what, _ in doctor.problems(thor))
    tx2 = doctor.collect(recorded("tx2-jp46"))
    assert "BASE_IMAGE=nvcr.io/nvidia/l4t-base:r32.7.1" in tx2["docker"] and "PYCUDA_VERSION=2021.1" in tx2["docker"]
    st = tx2["board_state"]
    assert "PMIC" not in st["temps_c"] and st["temps_c"]["GPU"] == 31.5 and st["clocks"]["locked"] is False
    assert st["nvpmodel"] == {"name": "MAXP_CORE_ARM", "id": 3, "top": [0, "MAXN"]}


def test_docker_line_of_every_jetson_row():
    """Each Jetson row with an image names an existing Dockerfile whose base (default or build-arg) is the row's."""
    for t in targets.TARGETS:
        cmd = doctor.docker_command(t)
        if t.docker_base:
            path = cmd.split("-f ")[1].split()[0]
            text = open(os.path.join(ROOT, path)).read()
            assert t.docker_base in cmd or "ARG BASE_IMAGE=" + t.docker_base in text, t.name
    assert doctor.docker_command(targets.get_target("ort")) is None


def test_pick_target():
    assert doctor.pick_target("10.3.0", None, None).name == "trt10"  # x86: the row without boards
    assert doctor.pick_target("10.13.3", None, "NVIDIA Jetson AGX Thor Developer Kit").name == "thor-jp7"
    assert doctor.pick_target("9.0.1", None, None) is None
    assert doctor.pick_target(None, None, None).name == "ort"
    facts = {"board": None, "tensorrt": "9.0.1", "target": None, "gpu": None, "plugin": None}
    assert "has no target row" in doctor.problems(facts)[0][0]


def test_parsers():
    assert board.parse_jetson_clocks("no clocks here") is None
    locked = board.parse_jetson_clocks("cpu0: Online=1 Governor=schedutil MinFreq=5 MaxFreq=5 CurrentFreq=5\n"
                                       "cpu1: Online=0 Governor=schedutil MinFreq=1 MaxFreq=5 CurrentFreq=1\n"
                                       "GPU MinFreq=9 MaxFreq=9 CurrentFreq=9\nEMC MinFreq=1 MaxFreq=3 CurrentFreq=3")
    assert locked["locked"] and not locked["gpu_throttled"] and "cpu1" not in locked["units"]
    assert board.parse_temps("CV0@-256C GPU@43.062C PMIC@100C tj@48.5C") == {"GPU": 43.062, "tj": 48.5}
    assert board.top_mode(board.power_modes("< POWER_MODEL ID=1 NAME=25W >\n< POWER_MODEL ID=2 NAME=MAXN_SUPER >")) \
        == (2, "MAXN_SUPER")
    assert board.top_mode({0: "15W"}) is None


def test_thermal_zones(tmp_path):
    for i, (kind, milli) in enumerate((("gpu-thermal", "51250"), ("PMIC-Die", "100000"), ("cv0-thermal", "-256000"),
                                       ("tj-thermal", "88000"))):
        d = tmp_path / "sys" / "class" / "thermal" / "thermal_zone{}".format(i)
        d.mkdir(parents=True)
        (d / "type").write_text(kind + "\n")
        (d / "temp").write_text(milli + "\n")
    host = board.Host(str(tmp_path))
    assert board.thermal_zones(host) == {"gpu-thermal": 51.25, "tj-thermal": 88.0}


def test_bench_records_the_board_state_and_warns(tmp_path, monkeypatch):
    """On a Jetson, bench's JSON holds power mode, clocks and temperatures, and one line warns when unlocked."""
    thor, orin = board.state(recorded("thor-jp70")), board.state(recorded("orin-jp51"))
    monkeypatch.setattr(bench, "jetson_model", lambda: "NVIDIA Jetson AGX Thor Developer Kit")
    monkeypatch.setattr(board, "state", lambda host=None: thor)
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    lines = []
    res = bench.run(bench.parse_args(["--onnx", onnx, "--iters", "2", "--warmup", "0", "--no-power", "--json",
                                      str(tmp_path / "b.json")]), log=lines.append)
    saved = json.load(open(str(tmp_path / "b.json")))
    assert saved["host"]["board_state"]["nvpmodel"]["name"] == "120W" and res["runs"][0]["status"] == "ok"
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warnings) == 1 and "clocks are not locked" in warnings[0] and "sudo jetson_clocks" in warnings[0]
    assert board.bench_warning(orin) is None  # MAXN, locked, cool
    assert board.bench_warning(None) is None


def test_qvit_doctor_runs_here():
    """On this machine: one screen, exit 0, and it says plainly what is absent."""
    r = subprocess.run([sys.executable, "-m", "qvit", "doctor"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "qvit doctor" and len(lines) < 40
    for label in ("board", "GPU", "CUDA", "TensorRT", "ONNX Runtime", "plugin", "target", "docker"):
        assert any(ln.startswith("  " + label + " ") for ln in lines), label
    if not os.path.isfile("/etc/nv_tegra_release"):
        assert "  board         not a Jetson" in lines
    r = subprocess.run([sys.executable, "-m", "jetson.doctor", "--json", "--recorded",
                        os.path.join(FIXTURES, "thor-jp70")], cwd=ROOT, stdout=subprocess.PIPE,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0 and json.loads(r.stdout)["target"] == "thor-jp7"


def test_unreadable_state_is_a_doctor_problem_but_no_bench_warning(tmp_path):
    """In a container: no nvpmodel, no jetson_clocks -- doctor says so, bench records nulls without warning."""
    (tmp_path / "commands").mkdir()
    st = board.state(board.Host(str(tmp_path), recorded=True))
    assert st == {"nvpmodel": None, "clocks": None, "temps_c": {}, "max_temp_c": None}
    assert [fix for _, fix in board.problems(st)] == ["sudo nvpmodel -q   # on the Jetson itself",
                                                       "sudo jetson_clocks --show"]
    assert board.bench_warning(st) is None
