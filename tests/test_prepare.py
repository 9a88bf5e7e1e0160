"""prepare/convert on DeiT and Swin configs: every intended tensor has its quantizer, counted."""

import copy

import pytest
import torch
from timm.models.vision_transformer import Attention

from qformat.errors import UserError
from train.config import QuantConfig
from train.irm import IRMNorm
from train.models import create_model, list_models, model_spec
from train.qat import convert, prepare
from train.quant import QuantConv2d, QuantLinear, calibrate, quant_parameters, quant_report


def _tiny(name):
    torch.manual_seed(0)
    return create_model(name)


def _counts(model):
    rows = quant_report(model)
    return {k: sum(r["kind"] == k for r in rows) for k in ("weight", "act", "act-unsigned")}


def test_deit_every_intended_tensor_quantized():
    m = _tiny("vit_fmnist")
    depth = len(m.blocks)
    prepare(m, QuantConfig.for_method("qvit", 4))
    c = _counts(m)
    # per block: qkv, proj, fc1, fc2 (+ patch embed + head) weights and inputs; q, k, v signed; softmax unsigned
    assert c["weight"] == 4 * depth + 2
    assert c["act"] == (4 + 3) * depth + 2
    assert c["act-unsigned"] == depth
    for blk in m.blocks:
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            assert isinstance(lin, QuantLinear) and lin.w_quant.bits == 4 and lin.a_quant.bits == 4
        assert isinstance(blk.attn.q_norm, IRMNorm) and isinstance(blk.attn.k_norm, IRMNorm)
        assert isinstance(blk.norm1, torch.nn.LayerNorm)  # LayerNorm stays float
    assert isinstance(m.patch_embed.proj, QuantConv2d) and m.patch_embed.proj.w_quant.bits == 8
    assert isinstance(m.head, QuantLinear) and m.head.w_quant.bits == 8


def test_deit_s_real_config_structure_without_running():
    m = create_model("deit_s")
    prepare(m, QuantConfig.for_method("baseline", 2, embed_bits=None, head_bits=None))
    c = _counts(m)
    assert c == {"weight": 4 * 12, "act": 7 * 12, "act-unsigned": 12}
    assert not isinstance(m.blocks[0].attn.q_norm, IRMNorm)
    assert type(m.patch_embed.proj) is torch.nn.Conv2d and type(m.head) is torch.nn.Linear


def test_swin_every_intended_tensor_quantized():
    m = _tiny("swin_fmnist")
    n_blocks = sum(len(layer.blocks) for layer in m.layers)
    n_merge = sum(1 for layer in m.layers if not isinstance(layer.downsample, torch.nn.Identity))
    prepare(m, QuantConfig.for_method("qvit", 3))
    c = _counts(m)
    assert c["weight"] == 4 * n_blocks + n_merge + 2
    assert c["act"] == 7 * n_blocks + n_merge + 2
    assert c["act-unsigned"] == n_blocks
    rpb = [n for n, _ in m.named_parameters() if "relative_position_bias_table" in n]
    assert rpb, "relative position bias is kept as a float parameter"


@pytest.mark.parametrize("name", ["vit_fmnist", "swin_fmnist"])
@pytest.mark.parametrize("granularity", ["deploy", "paper"])
def test_convert_is_exactly_the_trained_eval_function(name, granularity):
    m = _tiny(name)
    prepare(m, QuantConfig.for_method("qvit", 3, granularity=granularity))
    x = torch.randn(6, 1, 28, 28)
    calibrate(m, [x])
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)  # move zero-points/scales off their init
    for _ in range(2):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        before = m(x)
    convert(m)
    with torch.no_grad():
        after = m(x)
    assert torch.equal(before, after)
    for mod in m.modules():
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            assert not hasattr(mod, "weight") or "weight" not in mod._parameters
            assert mod.weight_int.dtype == torch.int8
            lo, hi = -(2 ** (mod.w_quant.bits - 1)), 2 ** (mod.w_quant.bits - 1) - 1
            assert mod.weight_int.min() >= lo and mod.weight_int.max() <= hi


def test_granularity_shapes():
    m = _tiny("vit_fmnist")
    prepare(m, QuantConfig.for_method("qvit", 4, granularity="paper"))
    attn = m.blocks[0].attn
    assert attn.qkv.a_quant.scale.shape == (96,)
    assert attn.q_quant.scale.shape == (3, 1, 1)
    m2 = _tiny("vit_fmnist")
    prepare(m2, QuantConfig.for_method("qvit", 4))
    assert m2.blocks[0].attn.qkv.a_quant.scale.shape == ()


def test_quant_parameters_are_scales_and_zero_points():
    m = _tiny("vit_fmnist")
    prepare(m, QuantConfig.for_method("qvit", 4))
    ids = {id(p) for p in quant_parameters(m)}
    names = [n for n, p in m.named_parameters() if id(p) in ids]
    assert names and all(n.endswith(("scale", "zero_point")) for n in names)


def test_state_dict_keys_survive_prepare():
    m = _tiny("vit_fmnist")
    fp_keys = set(m.state_dict())
    prepare(m, QuantConfig())
    assert fp_keys <= set(m.state_dict())


def test_prepare_rejects_unknown_architecture_and_double_prepare():
    with pytest.raises(UserError, match="supported"):
        prepare(torch.nn.Sequential(torch.nn.Linear(2, 2)), QuantConfig())
    m = _tiny("vit_fmnist")
    prepare(m, QuantConfig())
    with pytest.raises(UserError, match="already"):
        prepare(m, QuantConfig())


def test_registry_errors_and_specs():
    with pytest.raises(UserError, match="supported models are"):
        create_model("resnet50")
    assert {"deit_t", "deit_s", "deit_b", "swin_t", "swin_s", "vit_fmnist"} <= set(list_models())
    assert model_spec("vit_fmnist").input_size == (1, 28, 28)


def test_teacher_attention_untouched_by_prepare_of_copy():
    m = _tiny("vit_fmnist")
    teacher = copy.deepcopy(m)
    prepare(m, QuantConfig())
    assert type(teacher.blocks[0].attn) is Attention


def test_a_negative_learned_step_is_one_line_naming_the_module():
    """Checkpoints trained before steps were kept positive can hold a negative step: export must refuse
    them in one line that names the layer, not with a traceback from the format checks."""
    m = _tiny("vit_fmnist")
    prepare(m, QuantConfig.for_method("baseline", 2))
    calibrate(m, [torch.randn(4, 1, 28, 28)])
    with torch.no_grad():
        m.patch_embed.proj.w_quant.scale[3] = -0.01
    with pytest.raises(UserError, match=r"^patch_embed\.proj: scales must be positive.*retrain"):
        convert(m)
