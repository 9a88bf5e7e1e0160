"""qformat.formats: what each export format quantizes (the emitters, the exporter and the runtime ask it),
and the one naming function of artifacts and their labels."""

import onnx
import pytest

import qformat
from qformat import formats


def test_one_row_per_format():
    assert tuple(formats.FORMAT_FACTS) == tuple(qformat.FORMATS)
    assert [f for f in qformat.FORMATS if formats.weight_only(f)] == ["woq"]
    assert not formats.weight_only("nonsense") and not formats.weight_only(None)
    with pytest.raises(ValueError, match="unknown format"):
        formats.quantizes_activations("int2")


def test_every_emitter_takes_its_activation_fact_from_the_contract():
    from export.emitters import _EMITTERS, emitter_class

    emitter_class("qdq")  # loads every registered module
    assert {fmt for fmt, _ in _EMITTERS} == set(qformat.FORMATS)
    for (fmt, variant), cls in _EMITTERS.items():
        assert cls.quantizes_activations is formats.quantizes_activations(fmt), (fmt, variant)


@pytest.mark.parametrize("fmt", qformat.FORMATS)
def test_graph_quantizes_activations_exactly_when_the_table_says(fmt, converted):
    """The fact is true of the graphs: activation codes (a QuantizeLinear or a low-bit node) iff ``activations``,
    integer weights (an integer initializer behind DequantizeLinear, or packed words) iff ``weights``."""
    from export.exporter import build_graph

    g = build_graph(converted("vit_fmnist", 4, calib_n=4), fmt, "ort", log=lambda s: None).deploy
    ops = {n.op_type for n in g.graph.node}
    acts = "QuantizeLinear" in ops or qformat.LOWBIT_OP in ops
    ints = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.INT32}
    weights = any(t.data_type in ints and len(t.dims) >= 2 for t in g.graph.initializer)
    assert (acts, weights) == tuple(formats.facts(fmt)[:2]), ops


@pytest.mark.parametrize("bits,stem,label", [
    ({"weight": 4, "act": 4, "embed": 8}, "deit_s_w4a4.qdq", "deit_s w4a4 qdq"),
    ({"weight": 2, "act": 3}, "deit_s_w2a3.qdq", "deit_s w2a3 qdq"),
    ({"weight": 3, "act": 3, "budget": 3}, "deit_s_mp3.qdq", "deit_s mp3 qdq"),
    ({"weight": 3, "act": 3, "budget": 2.5}, "deit_s_mp2.5.qdq", "deit_s mp2.5 qdq"),
    (4, "deit_s_w4a4.qdq", "deit_s w4a4 qdq"),
])
def test_names_and_labels_come_from_one_function(bits, stem, label):
    assert formats.artifact_stem("deit_s", bits, "qdq") == stem
    assert formats.artifact_label("deit_s", bits, "qdq") == label
    assert formats.sibling_path("a/" + stem + ".onnx", "qdq", "woq") == "a/" + stem[:-3] + "woq.onnx"
    assert formats.sibling_path("a/x.onnx", "qdq", "woq") is None


def test_runtime_label_is_the_naming_function():
    from runtime import model_meta

    meta = {"model": "deit_s", "format": "lowbit", "bits": {"weight": 3, "act": 3, "budget": 3}}
    assert model_meta.label(meta) == "deit_s mp3 lowbit"
    assert model_meta.label({"format": "qdq"}, "/x/m.onnx") == "m.onnx qdq"
