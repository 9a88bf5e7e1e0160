"""Methods are registered compositions of parts (train.methods) with registered handlers (train.qat).

Adding a method is one file plus its registration: this file registers ``lb-obr`` -- learned bits under a
BitOPs budget with VVTQ's OBR (a pair the trainer refused before parts composed) -- and trains it for
two steps from the command line.
"""

import csv
import json
import os

import pytest
import torch

from train.cli import parse_args
from train.config import DistillConfig, QuantConfig, VvtqConfig
from train.methods import (
    METHODS,
    Irm,
    Kd,
    LearnedBits,
    LsqQuant,
    ModuleScales,
    Obr,
    OscillationTracking,
    SwitchableScales,
    get_method,
    parts_of,
    register_method,
)
from train.qat import HANDLERS, Objective, QATConfig, handler_for
from train.trainer import run


@pytest.fixture
def example_method():
    """The example method: learned bits + OBR (OBR's schedule and the oscillation measures come with it);
    registered for this test only, so the other test files see the built-in methods."""
    yield register_method("lb-obr", LsqQuant(), LearnedBits(), OscillationTracking(), Obr(),
                          help="learned bits + OBR (tests/test_methods.py)")
    METHODS.pop("lb-obr")

TINY = ["--data", "synthetic", "--batch-size", "8", "--max-eval-batches", "1", "--no-tensorboard", "--workers", "0",
        "--seed", "0", "--calib-batches", "1", "--epochs", "1", "--max-train-batches", "2", "--device", "cpu"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_an_example_method_of_two_parts_trains_two_steps(example_method, tmp_path, capsys):
    from train.checkpoint import load_converted

    out = str(tmp_path / "run")
    run(parse_args(TINY + ["--method", "lb-obr", "--bits", "3", "--search-ratio", "0.5", "--obr-start", "0",
                           "--fp-epochs", "0", "--out", out]))
    meta = json.loads(open(os.path.join(out, "last.json")).read())
    assert meta["method"] == "lb-obr" and meta["distill"] is None  # no KD part: plain CE, no teacher needed
    assert meta["quant"]["mixed"]["budget"] == 3.0 and meta["vvtq"]["obr"] is True
    row = _rows(os.path.join(out, "metrics.csv"))[0]
    assert float(row["train_obr"]) > 0  # OBR's term ran (lambda > 0 from the second step on)
    assert float(row["train_bitops_ratio"]) > 1  # the BitOPs term ran (bits start at budget + 1)
    assert float(row["osc_rate"]) >= 0 and float(row["obr_lambda"]) > 0  # both parts' epoch hooks
    assert "search over at step 1/2" in capsys.readouterr().out  # the learned-bit step hook froze the bits
    assert os.path.isfile(os.path.join(out, "bits_report.json"))  # and its finish hook wrote the report
    model, _ = load_converted(os.path.join(out, "last.safetensors"))  # convert: learned bits fixed, then frozen
    assert model.qvit_specs and not any(p.requires_grad for p in model.parameters())


def test_cli_lists_registered_methods(example_method):
    from train.cli import build_parser

    choices = next(a.choices for a in build_parser()._actions if a.dest == "method")
    assert tuple(choices) == tuple(METHODS) and "lb-obr" in choices


@pytest.mark.parametrize("name", [n for n in METHODS])
def test_a_methods_records_rebuild_its_parts(name):
    """What a method lists is what its checkpoint's records give back (train.methods.parts_of)."""
    q = QuantConfig.for_method(name, 4)
    d = DistillConfig.for_method(name)
    v = VvtqConfig.for_method(name)
    assert parts_of(q, d, v) == tuple(type(p) for p in sorted(get_method(name).parts, key=_order))
    assert QATConfig.for_method(name, 4).parts == parts_of(q, d, v)


def _order(part):
    from train.methods import PARTS

    return PARTS.index(type(part))


def test_presets_are_the_papers_rows():
    assert not QuantConfig.for_method("baseline", 4).irm and QuantConfig.for_method("qvit", 4).irm
    assert DistillConfig.for_method("dgd").dgd and not DistillConfig.for_method("irm").dgd
    assert DistillConfig.for_method("vvtq").ce_weight == 0.0 and DistillConfig.for_method("qvit").ce_weight == 1.0
    assert QuantConfig.for_method("mp", 3).mixed == {**QuantConfig(mixed={"budget": 3.0}).mixed, "switchable": True}
    assert VvtqConfig.for_method("mp") is None and VvtqConfig.for_method("mp", obr=True).obr
    assert QuantConfig.for_method("fp", 4) is None and DistillConfig.for_method("fp") is None


def test_a_part_without_its_requirements_is_refused():
    with pytest.raises(ValueError, match="Obr needs OscillationTracking"):
        register_method("bad", LsqQuant(), Obr())
    with pytest.raises(ValueError, match="Irm needs LsqQuant"):
        register_method("bad", Irm(), Kd())
    assert "bad" not in METHODS


def test_parts_without_a_handler_do_nothing_and_objectives_compose():
    assert Kd not in HANDLERS and handler_for(Kd).terms(None, None, print) == []

    class Base(torch.nn.Module):
        def forward(self, x, y):
            return x.sum(), x, {"ce": 1.0}

    class Term:
        def __init__(self, k):
            self.k, self.steps = k, 0

        def add(self, loss, parts):
            parts[f"t{self.k}"] = self.k
            return loss + self.k

        def after_step(self):
            self.steps += 1

    terms = [Term(1), Term(10)]
    obj = Objective(Base(), terms)
    loss, _, parts = obj(torch.ones(2), None)
    assert float(loss) == 13.0 and parts == {"ce": 1.0, "t1": 1, "t10": 10}
    obj.after_step()
    assert [t.steps for t in terms] == [1, 1] and obj.resume_state() is None and obj.allocation_final


def test_learned_bits_take_vvtq_switches(tmp_path):
    """Nothing is refused: the bit search with OBR and module scales gets both parts' configs."""
    from train.trainer import _configs

    args = parse_args(TINY + ["--method", "mp", "--bits", "3", "--obr", "--module-scales", "--teacher", "t.safetensors",
                              "--out", str(tmp_path / "o")])
    _, q, d, v = _configs(args)
    assert parts_of(q, d, v) == (LsqQuant, LearnedBits, SwitchableScales, ModuleScales, Kd, OscillationTracking, Obr)


def test_learned_weight_quantizer_takes_module_scales_and_obr():
    """VVTQ's parts on learned-bit quantizers: the l1 module gradient scale, OBR and integer codes at the
    current width."""
    from train.mixedbits import LearnedWeightQuantizer
    from train.vvtq import obr_layer

    torch.manual_seed(0)
    w, r = torch.randn(6, 5) * 0.3, torch.randn(6, 5)
    grads = {}
    for norm in ("lsq", "l1"):
        q = LearnedWeightQuantizer(6, 5, 3.0, switchable=False, module_rows=2, grad_norm=norm)
        q.initialize(w)
        (q(w) * r).sum().backward()
        grads[norm] = q.scale.grad.reshape(-1)
    l1 = w.abs().reshape(3, -1).sum(1).repeat_interleave(2)  # ||w_m||_1 of each row's module
    assert torch.allclose(grads["l1"] / grads["lsq"], torch.sqrt(w.numel() / l1), rtol=1e-4)
    codes = q.integers(w)
    assert int(codes.min()) >= -4 and int(codes.max()) <= 3  # the 3-bit grid
    assert float(obr_layer(w, q)) > 0
