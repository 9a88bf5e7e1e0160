"""Model registry: the named ViTs qvit-edge can quantize, timm-style.

ImageNet models map to timm architectures (weights from ``--init-from`` / ``--checkpoint``, or
``--pretrained`` from the local timm cache), with the preprocessing of their timm ``pretrained_cfg``;
the ``*_fmnist`` models are small DeiT/Swin configs for 28x28 Fashion-MNIST that train on a CPU and
are what tests and the quick start use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
from torch import nn

from qformat.errors import UserError

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


@dataclass(frozen=True)
class ModelSpec:
    """What a model expects: the exporter, runtime and data pipeline read this."""

    name: str
    timm_name: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "vit"  # the model-family adapter prepare() uses (train.families)
    interpolation: str = "bilinear"  # resize filter of the preprocessing (timm's pretrained_cfg names)
    crop_pct: float = 1.0  # evaluation: resize the short side to size / crop_pct, then centre-crop to size


_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    from train.families import families

    if spec.family not in families():
        raise ValueError(f"model {spec.name}: family {spec.family!r} has no adapter ({', '.join(families())})")
    _SPECS[spec.name] = spec
    return spec


def _imagenet(name: str, timm_name: str, family: str = "vit") -> ModelSpec:
    """An ImageNet model whose preprocessing is its timm pretrained_cfg's (mean, std, interpolation, crop)."""
    cfg = timm.models.get_pretrained_cfg(timm_name).to_dict()
    return register(ModelSpec(name, timm_name, tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                              cfg["num_classes"], family=family, interpolation=cfg["interpolation"],
                              crop_pct=float(cfg["crop_pct"])))


for _name, _timm in (("deit_t", "deit_tiny_patch16_224"), ("deit_s", "deit_small_patch16_224"),
                     ("deit_b", "deit_base_patch16_224"), ("deit_s_distilled", "deit_small_distilled_patch16_224")):
    _imagenet(_name, _timm)
for _name, _timm in (("swin_t", "swin_tiny_patch4_window7_224"), ("swin_s", "swin_small_patch4_window7_224")):
    _imagenet(_name, _timm, family="swin")

register(ModelSpec(
    "vit_fmnist", "vit_tiny_patch16_224", (1, 28, 28), FMNIST_MEAN, FMNIST_STD, 10,
    kwargs=dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0,
                class_token=True, global_pool="token"),
))
# the same ViT with IRM's LayerNorm over head_dim in q_norm/k_norm (timm ``qk_norm``) from the FP stage:
# its FP teacher is trained with IRM, and ``prepare`` hands the trained gamma/beta to IRM
register(ModelSpec(
    "vit_fmnist_irm", "vit_tiny_patch16_224", (1, 28, 28), FMNIST_MEAN, FMNIST_STD, 10,
    kwargs=dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0,
                class_token=True, global_pool="token", qk_norm=True),
))
register(ModelSpec(
    "swin_fmnist", "swin_tiny_patch4_window7_224", (1, 28, 28), FMNIST_MEAN, FMNIST_STD, 10, family="swin",
    kwargs=dict(img_size=28, patch_size=2, in_chans=1, embed_dim=48, depths=(2, 2), num_heads=(2, 4),
                window_size=7, mlp_ratio=2.0, drop_path_rate=0.0),
))


def list_models() -> list[str]:
    return sorted(_SPECS)


def model_spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise UserError(f"unknown model {name!r}: supported models are {', '.join(list_models())}")
    return _SPECS[name]


def create_model(name: str, num_classes: int | None = None, **kw: Any) -> nn.Module:
    """Build a registered model, randomly initialised (weights: train.init_weights, or a checkpoint)."""
    spec = model_spec(name)
    kwargs = {**spec.kwargs, **kw, "num_classes": num_classes if num_classes is not None else spec.num_classes}
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    model.qvit_name = name  # type: ignore[attr-defined]
    model.qvit_family = spec.family  # type: ignore[attr-defined]
    return model
