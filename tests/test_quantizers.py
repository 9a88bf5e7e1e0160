"""Quantizer forward (grid, clipping, rounding) and gradients (closed form, LSQ/LSQ+)."""

import math

import numpy as np
import pytest
import torch

import qformat
from train.quantizers import ActQuantizer, WeightQuantizer, grad_scale, round_ste


def test_round_ste_is_half_even_with_identity_gradient():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.4], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0]
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_grad_scale_value_and_gradient():
    x = torch.tensor(3.0, requires_grad=True)
    y = grad_scale(x, 0.25)
    assert y.item() == 3.0
    y.backward()
    assert x.grad.item() == pytest.approx(0.25)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_quantizer_values_on_grid_and_clipped(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 20) * 3
    wq = WeightQuantizer(bits, 6)
    out = wq(w)
    s = wq.scale.detach()
    q = out.detach() / s
    assert torch.allclose(q, torch.round(q), atol=1e-4)
    qmin, qmax = qformat.qrange(bits)
    assert q.min() >= qmin - 1e-4 and q.max() <= qmax + 1e-4
    # matches the format contract's numpy reference exactly
    ref = qformat.dequantize_weight(qformat.quantize_weight(w.numpy(), s.numpy().ravel(), bits), s.numpy().ravel())
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=0, atol=1e-6)


def test_weight_scale_gradient_matches_lsq_closed_form():
    bits, n = 3, 2
    qmin, qmax = qformat.qrange(bits)
    w = torch.tensor([[0.1, -0.37, 5.0, -9.0], [0.26, 0.74, -0.05, 0.5]])
    wq = WeightQuantizer(bits, n)
    with torch.no_grad():
        wq.scale.copy_(torch.tensor([[0.5], [0.25]]))
        wq.initialized.fill_(True)
    wq(w).sum().backward()
    g = 1.0 / math.sqrt(w.numel() * qmax)
    s = wq.scale.detach()
    v = w / s
    per_elem = torch.where(v <= qmin, torch.full_like(v, qmin),
                           torch.where(v >= qmax, torch.full_like(v, qmax), torch.round(v) - v))
    expected = per_elem.sum(dim=1, keepdim=True) * g
    assert torch.allclose(wq.scale.grad, expected, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_act_quantizer_zero_point_folds_into_int8_bounds(bits):
    torch.manual_seed(1)
    x = torch.randn(4, 10, 16) + 1.5  # skewed: asymmetric range, non-zero offset
    aq = ActQuantizer(bits, signed=True)
    y_train = aq(x)
    z = int(aq.integer_zero_point())
    lo, hi = qformat.int_bounds(bits, True, z)
    assert -128 <= lo and hi <= 127 and hi - lo == 2**bits - 1
    s = aq.scale.detach()
    y_folded = torch.clamp(torch.round(x / s), lo, hi) * s
    assert torch.allclose(y_train.detach(), y_folded, atol=1e-6)
    ref = qformat.fake_quant_act(x.numpy(), s.numpy(), bits, True, z)
    np.testing.assert_allclose(y_train.detach().numpy(), ref, atol=1e-6)


def test_act_gradients_scale_and_zero_point_closed_form():
    bits = 2
    qmin, qmax = qformat.qrange(bits)  # -2, 1
    aq = ActQuantizer(bits, signed=True)
    with torch.no_grad():
        aq.scale.fill_(0.5)
        aq.zero_point.fill_(1.0)
        aq.initialized.fill_(True)
    x = torch.tensor([[-3.0, -0.6, 0.1, 0.2, 2.0]], requires_grad=True)
    aq(x).sum().backward()
    s, z = 0.5, 1.0
    v = x.detach() / s
    r = v + z  # LSQ: clip before rounding
    lower, upper = r <= qmin, r >= qmax
    inside = ~(lower | upper)
    g = 1.0 / math.sqrt(x[0].numel() * qmax)
    ds = torch.where(lower, torch.full_like(v, qmin - z),
                     torch.where(upper, torch.full_like(v, qmax - z), torch.round(v) - v)).sum() * g
    dz = (-(lower | upper).float() * s).sum() * g
    assert aq.scale.grad.item() == pytest.approx(ds.item(), abs=1e-6)
    assert aq.zero_point.grad.item() == pytest.approx(dz.item(), abs=1e-6)
    assert torch.equal(x.grad, inside.float())  # STE passes in range, blocks clipped


def test_unsigned_quantizer_for_softmax():
    aq = ActQuantizer(3, signed=False, grouping="head", groups=2)
    a = torch.softmax(torch.randn(2, 2, 5, 5), dim=-1)
    y = aq(a)
    assert not aq.zero_point.requires_grad and aq.integer_zero_point().abs().sum() == 0
    codes = y / aq.scale.detach().reshape(2, 1, 1)
    assert codes.min() >= 0 and codes.max() <= 7 + 1e-4
    assert torch.allclose(codes, torch.round(codes), atol=1e-4)


def test_per_head_and_per_channel_shapes():
    x = torch.randn(2, 3, 7, 8)
    head = ActQuantizer(4, grouping="head", groups=3)
    head(x)
    assert head.scale.shape == (3, 1, 1)
    lin = ActQuantizer(4, grouping="channel", groups=8)
    lin(torch.randn(2, 7, 8))
    assert lin.scale.shape == (8,)


def test_mse_init_beats_lsq_rule_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((4096,))

    def err(init):
        q = ActQuantizer(3, init=init)
        return ((q(x) - x) ** 2).mean().item()

    assert err("mse") < err("lsq")


@pytest.mark.parametrize("bits", [1, 9, 0, "4"])
def test_bad_bits_raise_value_error_naming_range(bits):
    with pytest.raises(ValueError, match="2..8"):
        WeightQuantizer(bits, 4)
    with pytest.raises(ValueError, match="2..8"):
        ActQuantizer(bits)
