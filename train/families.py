"""Model-family adapters: what ``prepare`` needs to know about an architecture, one class per family.

An adapter says which attention modules to quantize (and the class they become), where the
block Linears live, which module is the patch embedding and which Linears are the classifier
head, and how q, k and v sit in the qkv rows.  A new family (say, a hierarchical ViT) is one
adapter registered with :func:`register_family` -- as timm registers models -- and a
``family=`` on its :class:`train.models.ModelSpec`::

    @register_family("myvit")
    class MyVitFamily(FamilyAdapter):
        model_types = (MyVisionTransformer,)
        ...
"""

from __future__ import annotations

from collections.abc import Iterator

from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter
from timm.models.vision_transformer import Attention, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter
from torch import nn

from qformat.errors import UserError

from .attention import QuantAttention, QuantWindowAttention, add_slots

_FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(name: str):
    """Class decorator: register an adapter under ``name`` (the ModelSpec ``family``)."""
    def deco(cls: type) -> type:
        cls.name = name
        _FAMILIES[name] = cls()
        return cls
    return deco


def families() -> list[str]:
    return sorted(_FAMILIES)


def supported() -> str:
    return "; ".join(f"{f.name}: {f.description}" for f in _FAMILIES.values())


def family_of(model: nn.Module) -> FamilyAdapter:
    """The adapter of a model: its registry family (create_model sets it), else the first match."""
    name = getattr(model, "qvit_family", None)
    if name is not None:
        if name not in _FAMILIES:
            raise UserError(f"model family {name!r} has no adapter: registered are {', '.join(families())}")
        return _FAMILIES[name]
    for fam in _FAMILIES.values():
        if isinstance(model, fam.model_types):
            return fam
    raise UserError(f"cannot quantize {type(model).__name__}: supported are {supported()}")


class FamilyAdapter:
    """Base adapter; subclasses set the class attributes and override what differs."""

    name = "?"
    description = "?"
    model_types: tuple[type, ...] = ()
    attention_type: type = Attention  # the float attention class to quantize
    quant_attention: type = QuantAttention  # what it becomes (train.attention)

    def check(self, model: nn.Module) -> None:
        """Raise UserError for variants ``prepare`` cannot quantize exactly."""
        if not isinstance(model, self.model_types):
            raise UserError(f"{type(model).__name__} is not a {self.name} model ({self.description})")

    def attention_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, m in model.named_modules():
            if type(m) is self.attention_type or type(m) is self.quant_attention:
                yield name, m

    def block_roots(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(prefix, module) whose nn.Linear descendants are the block Linears."""
        raise NotImplementedError

    def patch_embed(self, model: nn.Module) -> tuple[str, nn.Module]:
        return "patch_embed.proj", model.patch_embed.proj

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of one input image (the BitOPs counter runs one blank image)."""
        return (int(self.patch_embed(model)[1].in_channels),) + tuple(int(v) for v in model.patch_embed.img_size)

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, nn.Linear) of the classifier head(s)."""
        raise NotImplementedError

    @staticmethod
    def qkv_layout(attn: nn.Module) -> tuple[int, int, int]:
        """qkv output rows as (3, heads, head_dim): q rows first, then k, then v, head-major."""
        heads = int(attn.num_heads)
        return 3, heads, attn.qkv.out_features // (3 * heads)

    def expose_qk(self, model: nn.Module) -> None:
        """Give a float model q_norm/k_norm slots that DGD can hook (timm ViT has them)."""

    #: timm's key remapping for checkpoints of this family (other layouts, resized position / patch embeddings)
    checkpoint_filter = None

    def filter_checkpoint(self, sd: dict, model: nn.Module) -> dict:
        """A foreign (timm / original-repo) state dict in this model's layout, through timm's own filter."""
        return self.checkpoint_filter(sd, model) if self.checkpoint_filter is not None else sd


@register_family("vit")
class VitFamily(FamilyAdapter):
    description = "timm VisionTransformer (DeiT-T/S/B, distilled)"
    model_types = (VisionTransformer,)
    checkpoint_filter = staticmethod(vit_checkpoint_filter)

    def check(self, model: nn.Module) -> None:
        super().check(model)
        for blk in model.blocks:
            attn = blk.attn
            if type(attn) not in (Attention, QuantAttention) or getattr(attn, "gate", None) is not None or \
                    not isinstance(attn.norm, nn.Identity):
                raise UserError(f"unsupported attention variant {type(attn).__name__}: supported are {supported()}")

    def block_roots(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [("blocks", model.blocks)]

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        out = [("head", model.head)]
        if isinstance(getattr(model, "head_dist", None), nn.Linear):
            out.append(("head_dist", model.head_dist))
        return [(n, m) for n, m in out if isinstance(m, nn.Linear)]


@register_family("swin")
class SwinFamily(FamilyAdapter):
    description = "timm SwinTransformer (Swin-T/S)"
    model_types = (SwinTransformer,)
    attention_type = WindowAttention
    quant_attention = QuantWindowAttention
    checkpoint_filter = staticmethod(swin_checkpoint_filter)

    def block_roots(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [("layers", model.layers)]

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [("head.fc", model.head.fc)] if isinstance(model.head.fc, nn.Linear) else []

    def expose_qk(self, model: nn.Module) -> None:
        for _, m in self.attention_modules(model):
            if type(m) is WindowAttention:
                m.__class__ = QuantWindowAttention
                add_slots(m)
