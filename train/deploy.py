"""The one door from ``train`` to the later stages: checkpoint (or a fresh model) -> converted model + specs.

``export`` and the runtime's torch backend call :func:`load_deployable` and use only the
:class:`Deployable` it returns -- the converted model, its :class:`qformat.SiteSpec` records,
the checkpoint metadata and the model's preprocessing -- so they never reach into ``train``'s
modules, and a change inside ``train`` cannot silently change what they read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import qformat
from qformat.errors import UserError


@dataclass
class Deployable:
    """A converted model with everything downstream stages read."""

    model: nn.Module  # eval mode; quantized models are converted (integer weights, frozen quantizers)
    specs: list[qformat.SiteSpec]  # one per quantized site, in module order (empty for a float model)
    meta: dict[str, Any]  # checkpoint metadata: model, input_size, mean, std, class_names, quant, metrics, ...
    float_modules: list[str] = field(default_factory=list)  # LayerNorm / IRM module paths: keep them FP32

    @property
    def quantized(self) -> bool:
        return bool(self.meta.get("quant"))

    def bits(self) -> dict[str, Any]:
        """Default bits per tensor kind (the sidecar's ``bits``); per-site bits are in ``specs``."""
        from train.config import QuantConfig

        if not self.quantized:
            raise UserError("the model is not quantized (no quant config): export needs a converted qvit model")
        return QuantConfig.from_dict(self.meta["quant"]).bits_summary()

    def test_images(self, n: int) -> torch.Tensor:
        """The first ``n`` Fashion-MNIST test images, preprocessed for this model (parity checks)."""
        from train.data import eval_images

        x, _ = eval_images(n, split="test", input_size=self.meta["input_size"], mean=self.meta["mean"],
                           std=self.meta["std"])
        return x

    def image_files(self, files: list[str], n: int, folder: str) -> torch.Tensor:
        """The first ``n`` decodable ``files``, preprocessed; undecodable ones are skipped and named on
        stderr (a folder with none readable is a UserError)."""
        import numpy as np

        from train.data import UnreadableImage, image_mode, load_image, warn_unreadable

        size = self.meta["input_size"]
        imgs, bad = [], []
        for f in files:  # decode until n images are readable
            if len(imgs) >= n:
                break
            try:
                im = load_image(f, image_mode(size)).resize((int(size[2]), int(size[1])))
            except UnreadableImage as e:
                bad.append((e.path, e.reason))
                continue
            t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
            imgs.append(t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1))
        warn_unreadable(bad, folder, len(bad) + len(imgs))
        return self.preprocess(torch.stack(imgs))

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` pixels in [0, 1] -> model input (channels, size, mean/std as in training)."""
        from train.data import adapt

        return adapt(pixels, self.meta["input_size"], self.meta["mean"], self.meta["std"]).contiguous()


def load_deployable(checkpoint: str | None = None, model: str | None = None, bits: int | None = None,
                    overrides: dict | None = None, quantized_only: bool = True) -> Deployable:
    """A trained ``checkpoint`` (``model``/``bits``, when given, must agree with it), or else a fresh
    ``model`` at ``bits`` with real calibrated quantizers and random weights (structure and speed only).
    ``overrides``: per-module quant overrides of a fresh model."""
    if checkpoint:
        if overrides:
            raise UserError("--quant-override applies to a fresh model; a checkpoint keeps the bits it was trained "
                            "with")
        return _from_checkpoint(checkpoint, model, bits, quantized_only)
    if not model or bits is None:
        raise UserError("give --checkpoint CKPT, or --model NAME --bits B for a fresh calibrated model")
    return _fresh(model, bits, overrides)


def _from_checkpoint(path: str, model_name: str | None, bits: int | None, quantized_only: bool) -> Deployable:
    from train.checkpoint import load_converted

    model, meta = load_converted(path)
    if quantized_only and not meta.get("quant"):
        raise UserError(f"{path} is a float (fp) checkpoint: train with --method qvit/baseline to get a quantized one")
    if model_name and model_name != meta["model"]:
        raise UserError(f"--model {model_name} disagrees with the checkpoint's model {meta['model']}: drop --model")
    qb = (meta.get("quant") or {}).get("w_bits")
    if bits is not None and int(bits) != int(qb):
        raise UserError(f"--bits {bits} disagrees with the checkpoint ({meta['model']} trained at w{qb}a"
                        f"{meta['quant'].get('a_bits')}): drop --bits or pick the matching checkpoint")
    return from_model(model, dict(meta, checkpoint=path))


def from_model(model: nn.Module, meta: dict[str, Any]) -> Deployable:
    """Wrap a model already converted in this process (library use, tests) with its metadata."""
    from train.quant import float_modules

    if meta.get("quant") and not getattr(model, "qvit_converted", False):
        raise UserError("export needs a converted model (train.qat.convert) or a checkpoint from python -m train")
    return Deployable(model.eval(), list(getattr(model, "qvit_specs", [])), dict(meta), float_modules(model))


def _fresh(model_name: str, bits: int, overrides: dict | None, calib_n: int = 32, seed: int = 0) -> Deployable:
    """create_model -> prepare (Q-ViT preset) -> calibrate on real train images -> convert."""
    from train.config import QuantConfig
    from train.data import FMNIST_CLASSES, eval_images
    from train.models import create_model, model_spec
    from train.qat import convert, prepare
    from train.quant import calibrate

    spec = model_spec(model_name)
    cfg = QuantConfig.for_method("qvit", bits, overrides=overrides or {})
    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    prepare(model, cfg)
    x, _ = eval_images(calib_n, split="train", input_size=spec.input_size, mean=spec.mean, std=spec.std)
    calibrate(model, [x])
    convert(model)
    classes = list(FMNIST_CLASSES) if spec.num_classes == len(FMNIST_CLASSES) else \
        [f"class_{i}" for i in range(spec.num_classes)]
    meta = {"model": model_name, "quant": cfg.to_dict(), "input_size": list(spec.input_size), "mean": list(spec.mean),
            "std": list(spec.std), "interpolation": spec.interpolation, "crop_pct": spec.crop_pct,
            "class_names": classes, "metrics": {}, "num_classes": spec.num_classes}
    return from_model(model, meta)
