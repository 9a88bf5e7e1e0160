"""Where the converted model comes from: a trained checkpoint, or a fresh calibrated one.

A fresh model (no ``--checkpoint``) has random weights but real calibrated quantizers:
right structure and ranges for engine building and benchmarks, meaningless accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from qformat.errors import UserError


def from_checkpoint(path: str, model_name: str | None = None, bits: int | None = None) -> tuple[nn.Module, dict]:
    from train.checkpoint import load_converted

    model, meta = load_converted(path)
    if not meta.get("quant"):
        raise UserError(f"{path} is a float (fp) checkpoint: train with --method qvit/baseline to get a quantized one")
    if model_name and model_name != meta["model"]:
        raise UserError(f"--model {model_name} disagrees with the checkpoint's model {meta['model']}: drop --model")
    qb = meta["quant"].get("w_bits")
    if bits is not None and int(bits) != int(qb):
        raise UserError(f"--bits {bits} disagrees with the checkpoint ({meta['model']} trained at w{qb}a"
                        f"{meta['quant'].get('a_bits')}): drop --bits or pick the matching checkpoint")
    meta = dict(meta, checkpoint=path)
    return model, meta


def fresh(model_name: str, bits: int, calib_n: int = 32, seed: int = 0, method: str = "qvit",
          **quant_overrides) -> tuple[nn.Module, dict]:
    """create_model -> prepare(qvit preset) -> calibrate on real train images -> convert."""
    from train.config import QuantConfig
    from train.data import FMNIST_CLASSES, eval_images
    from train.models import create_model, model_spec
    from train.quant import calibrate, convert, prepare

    spec = model_spec(model_name)
    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    cfg = QuantConfig.for_method(method, bits, **quant_overrides)
    if cfg is None:
        raise UserError("export needs a quantized method (qvit, baseline, irm, dgd), not fp")
    prepare(model, cfg)
    x, _ = eval_images(calib_n, split="train", input_size=spec.input_size, mean=spec.mean, std=spec.std)
    calibrate(model, [x])
    convert(model)
    classes = list(FMNIST_CLASSES) if spec.num_classes == len(FMNIST_CLASSES) else \
        [f"class_{i}" for i in range(spec.num_classes)]
    meta = {"model": model_name, "quant": cfg.to_dict(), "input_size": list(spec.input_size), "mean": list(spec.mean),
            "std": list(spec.std), "class_names": classes, "metrics": {}, "num_classes": spec.num_classes}
    return model, meta
