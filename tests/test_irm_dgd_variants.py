"""The IRM / DGD variants the study compares: each does what it says, and bad settings are one-line errors."""

import copy
import math

import pytest
import torch

from qformat.errors import UserError
from train.checkpoint import build_model, load_state
from train.cli import parse_args
from train.config import DistillConfig, QuantConfig, variant_overrides
from train.distill import Distiller, make_teacher
from train.irm import IRMNorm
from train.models import create_model
from train.qat import prepare
from train.quant import calibrate


def _x(n=8, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _q_of(model, x):
    """q of block 0 before and after its q_norm slot (pre-quantization), [B, H, N, d]."""
    seen = {}
    attn = model.blocks[0].attn
    h = attn.q_norm.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].detach(), out=o.detach()))
    model(x)
    h.remove()
    return seen["inp"], seen["out"]


# ----------------------------------------------------------------------------- IRM

@pytest.mark.parametrize("per_head", [False, True])
def test_std_init_sets_gamma_from_the_calibration_data_once(per_head):
    x = torch.randn(4, 3, 10, 8) * torch.tensor([0.5, 2.0, 6.0]).view(1, 3, 1, 1) + 1.0
    n = IRMNorm(8, 3, per_head=per_head, init="std")
    n.eval()
    n(x)
    per = x.var(-1, unbiased=False).add(1e-6).sqrt().transpose(0, 1).reshape(3, -1).mean(1)
    want = per.view(3, 1, 1).expand(3, 1, 8) if per_head else per.mean().expand(8)
    assert torch.allclose(n.weight, want, atol=1e-5)
    before = n.weight.detach().clone()
    n(x * 10)  # later batches never re-initialise: training owns gamma now
    assert torch.equal(n.weight, before) and bool(n.data_initialized)
    m = IRMNorm(8, 3, per_head=per_head, init="std")
    m.load_state_dict(n.state_dict())  # a resumed run keeps the fitted gamma
    m(x * 10)
    assert torch.equal(m.weight, before)


def test_default_irm_state_dict_is_unchanged():
    assert set(IRMNorm(8, 3).state_dict()) == {"weight", "bias"}


def test_std_init_keeps_the_fp_attention_temperature():
    """With gamma = per-head std, normalised q has the FP q's typical norm; gamma = 1 does not."""
    torch.manual_seed(0)
    fp = create_model("vit_fmnist").eval()
    with torch.no_grad():
        fp.blocks[0].attn.qkv.weight.mul_(20.0)  # make q's std far from 1
    x = _x()
    q_fp, _ = _q_of(fp, x)
    norms = {}
    for init in ("ln", "std"):
        m = copy.deepcopy(fp)
        prepare(m, QuantConfig(w_bits=8, a_bits=8, irm_init=init, irm_per_head=True))
        calibrate(m, [x])
        _, q_irm = _q_of(m.eval(), x)
        norms[init] = (q_irm.norm(dim=-1).mean() / q_fp.norm(dim=-1).mean()).item()
    assert 0.8 < norms["std"] < 1.25, norms
    assert norms["ln"] < 0.5, norms


def test_blend_starts_at_the_fp_function_and_reaches_irm():
    n = IRMNorm(8, 2, blend_steps=3)
    x = torch.randn(2, 2, 5, 8) * 3
    n.eval()
    assert torch.equal(n(x), x)  # step 0: identity; eval forwards do not advance
    n.train()
    outs = [n(x) for _ in range(5)]
    pure = IRMNorm(8, 2)(x)
    assert torch.equal(outs[0], x) and not torch.allclose(outs[1], pure) and torch.allclose(outs[3], pure)
    assert int(n.blend_step) == 5 and n.blend() == 1.0
    m = IRMNorm(8, 2, blend_steps=3)
    m.load_state_dict(n.state_dict())
    assert m.blend() == 1.0


def test_irm_blend_keeps_the_prepared_model_close_to_fp():
    torch.manual_seed(0)
    fp = create_model("vit_fmnist").eval()
    x = _x()
    ref = fp(x)
    errs = {}
    for steps in (0, 100):
        m = copy.deepcopy(fp)
        prepare(m, QuantConfig(w_bits=8, a_bits=8, irm_blend_steps=steps))
        calibrate(m, [x])
        errs[steps] = (m.eval()(x) - ref).abs().max().item()
    assert errs[100] < 0.25 * errs[0], errs


@pytest.mark.parametrize("per_head", [False, True])
def test_irm_at_fp_stage_hands_its_trained_layernorm_to_irm(per_head):
    torch.manual_seed(0)
    fp = create_model("vit_fmnist_irm").eval()
    with torch.no_grad():
        for blk in fp.blocks:
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.uniform_(-0.3, 0.3)
    x = _x()
    ref = fp(x)
    ln = fp.blocks[1].attn.k_norm
    m = copy.deepcopy(fp)
    prepare(m, QuantConfig(w_bits=8, a_bits=8, irm_per_head=per_head))
    irm = m.blocks[1].attn.k_norm
    assert isinstance(irm, IRMNorm)
    assert torch.allclose(irm.weight.reshape(-1, 32), ln.weight.expand(irm.weight.reshape(-1, 32).shape))
    calibrate(m, [x])
    out = m.eval()(x)
    assert (out - ref).abs().max() < 0.15 * ref.abs().max()  # 8-bit noise only
    fresh = copy.deepcopy(fp)
    prepare(fresh, QuantConfig(w_bits=8, a_bits=8, irm_per_head=per_head))
    rebuilt = build_model({"model": "vit_fmnist_irm", "num_classes": 10, "quant": m.qvit_quant_config})
    load_state(rebuilt, m.state_dict())  # a checkpoint of it loads back (export's path)


# ----------------------------------------------------------------------------- DGD

def _dgd_parts(**kw):
    torch.manual_seed(0)
    m = create_model("vit_fmnist")
    teacher = make_teacher(m)
    x, y = _x(4), torch.randint(0, 10, (4,))
    prepare(m, QuantConfig(w_bits=2, a_bits=2))
    calibrate(m, [x])
    m.train()
    torch.manual_seed(1)
    _, _, parts = Distiller(teacher, m, DistillConfig(**kw))(x, y)
    return parts["dgd"]


def test_dgd_on_q_k_or_both_and_weight_scales_it():
    q, k, both = _dgd_parts(dgd_on=("q",)), _dgd_parts(dgd_on=("k",)), _dgd_parts(dgd_on=("q", "k"))
    assert q > 0 and k > 0 and math.isclose(q + k, both, rel_tol=1e-5)
    assert math.isclose(_dgd_parts(dgd_weight=0.03), 0.03 * both, rel_tol=1e-5)


@pytest.mark.parametrize("kw, needle", [
    (dict(dgd_on=("z",)), "dgd_on"), (dict(dgd_on=()), "dgd_on"), (dict(dgd_weight=-0.1), "dgd_weight"),
    (dict(dgd_weight=float("nan")), "dgd_weight"), (dict(temperature=0), "temperature")])
def test_distill_config_rejects_bad_values(kw, needle):
    with pytest.raises(UserError, match=needle):
        DistillConfig(**kw)


def test_quant_config_rejects_bad_irm_values():
    with pytest.raises(UserError, match="irm_init"):
        QuantConfig(irm_init="xavier")
    with pytest.raises(UserError, match="irm_blend_steps"):
        QuantConfig(irm_blend_steps=-1)


@pytest.mark.parametrize("argv, needle", [
    (["--method", "baseline", "--irm-per-head"], "--irm-"), (["--method", "irm", "--dgd-weight", "0.1"], "--dgd-"),
    (["--method", "qvit", "--dgd-on", "v"], "dgd_on"), (["--method", "qvit", "--irm-blend-steps", "-2"], "blend"),
    (["--method", "qvit", "--holdout", "-1"], "--holdout")])
def test_cli_variant_flags_checked_before_work(argv, needle):
    with pytest.raises(UserError, match=needle):
        parse_args(argv)


def test_cli_variant_flags_reach_the_configs():
    args = parse_args(["--method", "qvit", "--dgd-weight", "0.03", "--dgd-on", "k", "--irm-per-head",
                       "--irm-init", "std", "--irm-blend-steps", "50"])
    q, d = variant_overrides(args)
    assert q == {"irm_per_head": True, "irm_init": "std", "irm_blend_steps": 50}
    assert d == {"dgd_weight": 0.03, "dgd_on": ("k",)}
    assert variant_overrides(parse_args(["--method", "qvit"])) == ({}, {})  # presets unchanged
