"""The ``--target ort`` graphs: what ONNX Runtime's CPU optimizer makes of them, and the exactness rules.

Parity of these graphs (0 code mismatches) is test_export_parity's matrix (it exports for ``ort``);
here: which emitter the target row picks, the UINT8 zero-points, the int16 pair-sum rule, and the
optimized graph ORT runs -- every block Linear and both attention MatMuls as integer kernels, the
packed ``lowbit`` weights unpacked once at session creation (the same kernels as ``qdq``).
"""

import numpy as np
import onnx
import pytest
from conftest import converted_model

import qformat
from experiments.ort_compare import fusion_report, open_session
from export.emitters import emitter_class
from export.exporter import build_graph
from qformat import targets


def _spec(lo_hi, axis=None, bits=4):
    """A signed activation spec whose (LSQ+) zero-points give the integer bounds ``lo_hi``, one pair per group."""
    z = np.array([qformat.qrange(bits, True)[0] - lo for lo, _ in lo_hi])
    return qformat.TensorSpec("act", True, bits, np.full(len(z), 0.1) if axis is not None else 0.1,
                              scale_axis=axis, zero_point=z if axis is not None else z[0])


def test_uint8_zero_point_makes_the_lower_bound_code_zero():
    s = _spec([(-8, 7)])
    assert [int(v) for v in s.bounds()] == [-8, 7] and s.uint8_zero_point() == 8
    g = _spec([(-8, 7), (-3, 12), (0, 15)], axis=-3)
    assert list(g.uint8_zero_point().ravel()) == [8, 3, 0]
    assert g.uint8_zero_point(common=True) == 8  # one zero-point every group fits: [0, 15], [5, 20], [8, 23]
    assert _spec([(-128, 127)], bits=8).uint8_zero_point() == 128


def test_pair_sum_rule_of_the_ort_row():
    ort = targets.get_target("ort")
    assert ort.emitter == "ort" and ort.pair_sum_max == 32767
    assert targets.int_matmul_exact(255, 64, ort.pair_sum_max)  # 7-bit weights behind 8-bit codes
    assert not targets.int_matmul_exact(255, 65, ort.pair_sum_max)
    assert targets.int_matmul_exact(255, 8, ort.pair_sum_max)  # 4-bit weights: always
    assert targets.int_matmul_exact(255, 127, None)  # a runtime without int16 pair sums
    assert all(t.emitter is None and t.pair_sum_max is None for t in targets.TARGETS if t.tensorrt)


def test_the_target_row_picks_the_emitter_variant():
    from export.qdq import QdqEmitter
    from export.qdq_ort import OrtQdqEmitter

    assert emitter_class("qdq", "ort") is OrtQdqEmitter and emitter_class("qdq") is QdqEmitter
    assert emitter_class("fp32", "ort") is emitter_class("fp32")  # no variant: the format's emitter


def _saved(tmp_path, g, name):
    p = str(tmp_path / (name + ".onnx"))
    onnx.save(g.ort, p)
    return p


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    d = tmp_path_factory.mktemp("ort4")
    dep = converted_model("vit_fmnist", 4)
    return dep, {f: _saved(d, build_graph(dep, f, "ort", 17, log=lambda s: None), f) for f in ("qdq", "lowbit")}


def test_block_linears_and_attention_matmuls_run_on_integer_kernels(w4):
    dep, paths = w4
    depth = sum(1 for s in dep.specs if s.name.endswith("attn.qkv"))
    linears = [s for s in dep.specs if s.op == "linear" and s.weight.max_bits <= 4]
    rep = fusion_report(paths["qdq"], 1)
    assert rep["int_kernels"] == len(linears) + 2 * depth, rep  # + QK^T and A.V of every block
    # only the 8-bit patch embedding and head stay in float (8-bit x 8-bit: see test_eight_bit_sites...)
    assert len(rep["float_nodes"]) == 2 and all(n.startswith(("patch_embed", "head")) for n in rep["float_nodes"])


def test_lowbit_unpacks_once_at_session_creation_and_stays_small(w4, tmp_path):
    _, paths = w4
    rep = {f: fusion_report(p, 1) for f, p in paths.items()}
    assert rep["lowbit"]["int_ops"] == rep["qdq"]["int_ops"]  # the packed weights were folded into INT8 constants
    opt = str(tmp_path / "lowbit.opt.onnx")
    open_session(paths["lowbit"], 1, opt)
    m = onnx.load(opt)
    assert not m.functions and not [n for n in m.graph.node if n.domain == qformat.LOWBIT_DOMAIN]
    assert not [n for n in m.graph.node if n.op_type in ("BitShift", "Mod", "ConstantOfShape")], "unpacked per run"
    import os

    assert os.path.getsize(paths["lowbit"]) < 0.75 * os.path.getsize(paths["qdq"])


def test_eight_bit_sites_keep_clear_of_int16_pair_saturation():
    """8-bit weights behind u8 codes up to 255 break 2*a*w <= 32767: UINT8 (w + 128), the exact u8 x u8 kernel."""
    dep = converted_model("vit_fmnist", 8)
    g = build_graph(dep, "qdq", "ort", 17, log=lambda s: None)
    inits = {t.name: t for t in g.ort.graph.initializer}
    for s in (s for s in dep.specs if s.op == "linear"):
        assert f"{s.name}/weight_uint8" in inits and f"{s.name}/weight_int8" not in inits, s.name
    g4 = build_graph(converted_model("vit_fmnist", 4), "qdq", "ort", 17, log=lambda s: None)
    names = {t.name for t in g4.ort.graph.initializer}
    assert "blocks.0.attn.qkv/weight_int8" in names  # 4-bit weights: the u8 x s8 kernel is exact
