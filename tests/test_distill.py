"""IRM and DGD: shapes, zero loss when student equals teacher, gradients reach the student."""

import torch

from train.config import DistillConfig, QuantConfig
from train.distill import Distiller, dgd_loss, make_teacher, similarity
from train.irm import IRMNorm
from train.models import create_model
from train.qat import prepare
from train.quant import calibrate


def test_similarity_rows_are_unit_norm():
    g = similarity(torch.randn(2, 3, 5, 4))
    assert g.shape == (2, 3, 5, 5)
    assert torch.allclose(g.norm(dim=-1), torch.ones(2, 3, 5), atol=1e-5)


def test_dgd_zero_for_identical_and_positive_otherwise():
    a = [torch.randn(2, 3, 5, 4) for _ in range(2)]
    assert dgd_loss(a, [t.clone() for t in a]).item() == 0.0
    assert dgd_loss(a, [t + torch.randn_like(t) for t in a]).item() > 0


def test_irm_normalises_per_token_and_per_head_affine():
    x = torch.randn(2, 3, 7, 8) * 5 + 2
    y = IRMNorm(8, 3)(x)
    assert torch.allclose(y.mean(-1), torch.zeros(2, 3, 7), atol=1e-5)
    ph = IRMNorm(8, 3, per_head=True)
    with torch.no_grad():
        ph.weight[1].fill_(2.0)
    y2 = ph(x)
    assert torch.allclose(y2[:, 1], 2 * y[:, 1], atol=1e-5) and torch.allclose(y2[:, 0], y[:, 0], atol=1e-5)


def _losses(name):
    torch.manual_seed(0)
    m = create_model(name)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    same = Distiller(make_teacher(m), m, DistillConfig.for_method("qvit"))
    m.eval()
    _, _, parts_same = same(x, y)
    for h in same._s_rec.handles:
        h.remove()
    teacher = make_teacher(m)
    prepare(m, QuantConfig.for_method("qvit", 2))
    calibrate(m, [x])
    m.train()
    d = Distiller(teacher, m, DistillConfig.for_method("qvit"))
    loss, logits, parts = d(x, y)
    loss.backward()
    return parts_same, parts, m, logits


def test_dgd_and_kd_zero_when_student_is_teacher_and_grad_flows_vit():
    same, parts, m, logits = _losses("vit_fmnist")
    assert same["dgd"] == 0.0 and abs(same["kd"]) < 1e-6
    assert parts["dgd"] > 0 and logits.shape == (4, 10)
    irm = m.blocks[0].attn.q_norm
    assert irm.weight.grad is not None and irm.weight.grad.abs().sum() > 0


def test_dgd_on_swin_records_every_block():
    same, parts, m, _ = _losses("swin_fmnist")
    assert same["dgd"] == 0.0 and parts["dgd"] > 0
