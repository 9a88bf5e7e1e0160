"""The one target table (qformat.targets): its invariants, and that every consumer reads it."""

import subprocess
import sys

import pytest

from qformat import targets
from qformat.errors import UserError


@pytest.mark.parametrize("t", targets.TARGETS, ids=lambda t: t.name)
def test_each_row_is_consistent(t):
    lo, hi = t.opsets
    assert targets.MIN_OPSET <= lo <= t.default_opset <= hi and hi in targets.OPSET_IR_VERSION
    assert not t.int4 or hi >= 21  # INT4 DequantizeLinear is opset 21
    assert not t.layernorm_op or hi >= 17  # LayerNormalization is opset 17
    if t.tensorrt:
        assert t.trt[0] <= t.trt[1] and t.trt[0] >= targets.TRT_MIN
        assert not t.uint8  # TensorRT has no UINT8 Q/DQ
        assert not t.int4 or targets.trt_has("int4", t.trt[0])
        assert t.plugin_api == "IPluginV2DynamicExt"
    if t.l4t:
        assert t.tensorrt and t.python and t.docker_base and t.boards


def test_rows_are_unique_and_named():
    names = [t.name for t in targets.TARGETS]
    assert len(set(names)) == len(names) and tuple(names) == targets.TARGET_NAMES
    l4t = [t.l4t for t in targets.TARGETS if t.l4t]
    assert len(set(l4t)) == len(l4t)
    with pytest.raises(UserError, match="unknown --target 'nano'"):
        targets.get_target("nano")
    with pytest.raises(UserError, match="use --opset 13"):
        targets.resolve_opset(targets.get_target("tx2"), 17)


def test_consumers_read_the_table():
    """export's flags, the builder's gates and jetson/ all answer from the rows."""
    from export.cli import build_parser
    from jetson import bench_matrix, l4t
    from runtime.trt_compat import MIN_VERSION, TrtCaps

    actions = {a.dest: a for a in build_parser()._actions}
    assert tuple(actions["target"].choices) == targets.TARGET_NAMES
    assert all(f"{t.name} {t.default_opset}" in actions["opset"].help for t in targets.TARGETS)
    assert MIN_VERSION == targets.TRT_MIN
    for version in ("8.2.1", "8.6.1", "9.1.0", "10.3.0"):
        caps = TrtCaps(version)
        assert caps.int4 == targets.trt_has("int4", caps.version)
        assert caps.strongly_typed == targets.trt_has("strongly_typed", caps.version)
    for t in targets.TARGETS:
        if t.l4t:
            d = l4t.describe(t.l4t + ".0.0")
            assert (d["tensorrt"], d["python"], d["docker_base"], d["target"]) == (
                t.trt_range(), t.python, t.docker_base, t.name)
    assert bench_matrix.pick_format("auto", 4, "NVIDIA Jetson TX2 Developer Kit") == "lowbit"  # no fast INT8
    assert bench_matrix.pick_format("auto", 8, "NVIDIA Jetson TX2 Developer Kit") == "qdq"  # 8 bits do not pack
    assert bench_matrix.pick_format("auto", 4, "NVIDIA Jetson AGX Orin") == "qdq"


def test_builder_refuses_a_graph_for_a_newer_target():
    from runtime.trt_compat import TrtCaps

    notes = []
    with pytest.raises(UserError, match="needs TensorRT 10.0-10.99; this is 8.2.1: re-export with --target tx2"):
        TrtCaps("8.2.1").check_target("trt10", notes.append)
    TrtCaps("10.3.0").check_target("ort", notes.append)
    TrtCaps("10.3.0").check_target("orin-jp6", notes.append)
    assert len(notes) == 1 and "UINT8" in notes[0] and "orin-jp6, trt10" in notes[0]


def test_list_targets_prints_one_row_per_target():
    r = subprocess.run([sys.executable, "-m", "export", "--list-targets"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == targets.markdown()
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| `")]
    assert [ln.split("`")[1] for ln in rows] == list(targets.TARGET_NAMES)
