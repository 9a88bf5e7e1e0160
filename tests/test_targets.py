"""The one target table (qformat.targets): its invariants, and that every consumer reads it."""

import os
import subprocess
import sys

import pytest

from qformat import targets
from qformat.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        assert t.plugin_api == targets.PLUGIN_APIS[t.plugin_front_end]
        assert t.typings and t.default_typing() == t.typings[0]
        if t.typings == ("strong",):  # no weak typing: FP16 Q/DQ scales need opset 19 in every graph
            assert lo >= targets.MIN_TYPED_OPSET
    if t.l4t:
        assert t.tensorrt and t.python and t.docker_base and t.boards and t.jetpack and t.cuda


def test_jetpack_and_tensorrt_facts():
    """The JetPack / TensorRT facts the rows carry (issue #14)."""
    rows = {t.name: t for t in targets.TARGETS}
    tx2, jp5, jp6, jp7 = rows["tx2"], rows["orin-jp5"], rows["orin-jp6"], rows["orin-jp7"]
    assert (tx2.jetpack, tx2.trt_range(), tx2.plugin_front_end, tx2.fast_int8, tx2.python) == ("4.6", "8.2", "V2",
                                                                                                False, "3.6")
    assert (jp5.jetpack, jp5.trt_range(), jp5.plugin_front_end, jp5.typings) == ("5.1", "8.5", "V2", ("weak",))
    assert (jp6.trt_range(), jp6.plugin_front_end, jp6.int4, jp6.typings) == ("10.3", "V3", True, ("weak", "strong"))
    assert (jp7.jetpack, jp7.cuda, jp7.trt[0], jp7.plugin_front_end, jp7.typings, jp7.default_opset, jp7.int4) == (
        "7.2", "13.2", (11, 4), "V3", ("strong",), 21, True)
    assert rows["trt11"].typings == ("strong",) and rows["trt10"].default_typing() == "weak"
    assert targets.for_l4t("36.4.3") is jp6 and targets.for_l4t("32.7.1") is tx2 and targets.for_l4t("35.4.1") is jp5
    assert targets.for_l4t("36.3.0") is None  # JetPack 6.0 ships TensorRT 8.6: no row claims it
    assert targets.trt_has("weak_typing", (10, 3)) and not targets.trt_has("weak_typing", (11, 0))


def test_resolve_typing():
    jp6, trt11, tx2 = (targets.get_target(n) for n in ("orin-jp6", "trt11", "tx2"))
    assert targets.resolve_typing(jp6) == "weak" and targets.resolve_typing(jp6, "strong", 21) == "strong"
    assert targets.resolve_typing(trt11, "auto", 21) == "strong"
    with pytest.raises(UserError, match="builds only strong typed"):
        targets.resolve_typing(trt11, "weak")
    with pytest.raises(UserError, match="builds only weak typed"):
        targets.resolve_typing(tx2, "strong")
    with pytest.raises(UserError, match="--opset 19"):
        targets.resolve_typing(jp6, "strong", 17)


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
    for version in ("8.2.1", "8.6.1", "9.1.0", "10.3.0", "11.1.0"):
        caps = TrtCaps(version)
        assert caps.int4 == targets.trt_has("int4", caps.version)
        assert caps.strongly_typed == targets.trt_has("strongly_typed", caps.version)
        assert caps.weak_typing == targets.trt_has("weak_typing", caps.version)
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
    with pytest.raises(UserError, match="needs TensorRT 11.4-11.99; this is 10.3.0"):
        TrtCaps("10.3.0").check_target("orin-jp7", notes.append)


def test_list_targets_prints_one_row_per_target():
    r = subprocess.run([sys.executable, "-m", "export", "--list-targets"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == targets.markdown()
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| `")]
    assert [ln.split("`")[1] for ln in rows] == list(targets.TARGET_NAMES)


def test_runtime_readme_lists_the_target_table():
    """runtime/README.md's JetPack / TensorRT section embeds the table as the code has it."""
    text = open(os.path.join(ROOT, "runtime", "README.md")).read()
    block = text.split("<!-- targets:begin -->\n", 1)[1].split("<!-- targets:end -->", 1)[0]
    assert block == targets.markdown(), "regenerate: python -m export --list-targets"


def test_thor_row():
    """Jetson Thor, JetPack 7.0 (issue #23): TensorRT 10.13, CUDA 13, both typings, INT4 weight-only, IPluginV3."""
    thor = targets.get_target("thor-jp7")
    assert (thor.jetpack, thor.cuda, thor.trt_range(), thor.plugin_front_end, thor.typings, thor.fast_int8) == (
        "7.0", "13.0", "10.13", "V3", ("weak", "strong"), True)
    assert targets.use_int4(thor, 21) and not targets.use_int4(thor, 17)
    assert targets.for_l4t("38.2.0") is thor and targets.for_board("NVIDIA Jetson AGX Thor Developer Kit") is thor
    assert targets.for_board("NVIDIA Jetson AGX Orin Developer Kit").name == "orin-jp5"  # first Orin row, as before
    assert thor in targets.for_trt_version((10, 13, 3)) and targets.get_target("orin-jp7") not in \
        targets.for_trt_version((10, 13, 3))
