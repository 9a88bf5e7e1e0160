"""The training loop: FP teacher (when no weights are given) then quantization-aware training.

One function per step of the recipe, in the order :func:`run` calls them:
FP weights (``--init-from`` / ``--checkpoint`` / ``--teacher`` / ``--pretrained`` / train them here) ->
``prepare`` + ``calibrate`` -> :func:`fit` (AdamW, per-step warm-up + cosine, separate
quantizer lr/weight decay, clipping, AMP on GPU) with KD/DGD from the frozen FP teacher.
Each phase writes ``last.*``/``best.*`` checkpoints and ``last.state.pt`` atomically, so
``--resume`` continues bit-identically.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qformat.errors import UserError
from qformat.io import code_revision, output_error, remove_stale_temps
from qformat.lock import hold as hold_folder
from qformat.lock import release as release_folder
from qformat.paths import check_out_dir
from train import checkpoint as ckpt
from train import dist, runconfig
from train.config import mixed_settings, nominal_bits, resolve_bits
from train.data import Loaders, build_loaders
from train.evaluate import evaluate
from train.logger import RunLogger, write_metrics_csv
from train.provenance import ancestors, check_sources, image_records

# ----------------------------------------------------------------------------- small pieces


class Supervised(nn.Module):
    """Plain CE objective with the Distiller's interface: (loss, logits, parts)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        logits = self.model(images)
        if isinstance(logits, tuple):  # distilled DeiT in train mode: (cls, dist)
            logits = (logits[0] + logits[1]) / 2
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, logits, {"ce": float(loss.detach())}


class WarmupCosine:
    """lr multiplier per optimizer step: linear warm-up, then cosine to ``min_ratio``.
    A class (not a lambda) so LambdaLR's state dict holds plain numbers."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.01):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(model: nn.Module, lr: float, wd: float, quant_lr: float, quant_wd: float) -> list[dict]:
    """Three AdamW groups: weights (decayed), norms/biases/tokens (not), quantizer steps (own lr/wd)."""
    from train.quant import is_prepared, quant_parameters

    qids = {id(p) for p in quant_parameters(model)} if is_prepared(model) else set()
    skip = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
    decay, no_decay, quant = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in qids:
            quant.append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or "_norm." in name or any(s in name for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": wd, "name": "decay"},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"}]
    if quant:
        groups.append({"params": quant, "lr": quant_lr, "weight_decay": quant_wd, "name": "quant"})
    return groups


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # weights_only-loadable
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np.asarray(np_state["state"]["key"], dtype=np.uint32))
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def amp_context(device: torch.device, mode: str):
    """(autocast factory, GradScaler or None). Autocast on GPU only: CPU runs stay fp32 and exact."""
    if device.type != "cuda" or mode == "off":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def resolve_device(name: str, dinfo: dist.DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device {} but no CUDA GPU is visible; use --device cpu".format(name))
        if dinfo.enabled:
            name = "cuda:{}".format(dinfo.local_rank)
    return torch.device(name)


def objective_hook(objective: nn.Module, name: str, *args):
    """Call an optional hook of a training objective (``begin_fit``, ``after_step``, ``epoch_metrics``,
    ``resume_state``, ``note``, ``finish``; see train.qat.Objective) when it has one; DDP-wrapped objectives
    are unwrapped."""
    fn = getattr(getattr(objective, "module", objective), name, None)
    return fn(*args) if callable(fn) else None


def say(msg: str, dinfo: dist.DistInfo) -> None:
    if dinfo.is_main:
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


# ----------------------------------------------------------------------------- one phase


@dataclass
class Phase:
    """One optimisation run with its own output folder (the FP teacher or the QAT student)."""

    name: str  # "fp-teacher" | "qat" | "fp"
    out: str
    epochs: int
    lr: float


@dataclass
class Optim:
    """The optimisation state one phase steps: optimizer, schedule, AMP, and the quantizer scales kept positive."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: Optional[torch.amp.GradScaler]
    autocast: object
    scales: list  # quantizer steps: projected to >= MIN_SCALE after every step (Adam can push a tiny step below 0)
    total: int = 0  # optimizer steps of the phase
    bit_widths: list = field(default_factory=list)  # learned bit-widths (train.mixedbits): projected into 2..8


MIN_SCALE = 1e-8


def _optimizer(args: argparse.Namespace, phase: Phase, model: nn.Module, total: int, warmup: int,
               device: torch.device) -> Optim:
    from train.mixedbits import bit_widths, split_bit_group
    from train.quant import is_prepared, scale_parameters

    quant_lr = args.quant_lr if args.quant_lr is not None else phase.lr
    groups = param_groups(model, phase.lr, args.weight_decay, quant_lr, args.quant_weight_decay)
    bits = bit_widths(model)
    if bits:  # learned bit-widths: their own lr, no decay
        from train.config import QuantConfig

        groups = split_bit_group(groups, model, QuantConfig.from_dict(model.qvit_quant_config).mixed_bits.bit_lr)
    opt = torch.optim.AdamW(groups, lr=phase.lr, betas=(0.9, 0.999))
    autocast, scaler = amp_context(device, args.amp)
    scales = list(scale_parameters(model)) if is_prepared(model) else []
    return Optim(opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, total)), scaler, autocast, scales,
                 total, bits)


def _step(args: argparse.Namespace, o: Optim, train_obj: nn.Module, x: torch.Tensor, y: torch.Tensor, *extra):
    """One optimizer step; returns (loss, logits, parts). ``extra``: more batch fields (stored soft labels)."""
    with o.autocast():
        loss, logits, parts = train_obj(x, y, *extra)
    o.opt.zero_grad(set_to_none=True)
    if o.scaler is not None:
        o.scaler.scale(loss).backward()
        o.scaler.unscale_(o.opt)
    else:
        loss.backward()
    if args.clip_grad and args.clip_grad > 0:  # bit-widths apart: their large gradients must not shrink the rest
        nn.utils.clip_grad_norm_([p for g in o.opt.param_groups if g.get("name") != "bits" for p in g["params"]],
                                 args.clip_grad)
    if o.scaler is not None:
        o.scaler.step(o.opt)
        o.scaler.update()
    else:
        o.opt.step()
    o.sched.step()
    with torch.no_grad():
        for p in o.scales:
            p.clamp_(min=MIN_SCALE)
        for m in o.bit_widths:
            m.project_()
    return loss, logits, parts


def _restore(state: dict, o: Optim) -> tuple[int, int, float]:
    """Optimizer, schedule, scaler and RNG from a resume state; returns (epoch, step, best top-1)."""
    o.opt.load_state_dict(state["optimizer"])
    o.sched.load_state_dict(state["scheduler"])
    if o.scaler is not None and state.get("scaler"):
        o.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["epoch"], state["step"], state["best_top1"]


def _save_epoch(phase: Phase, model: nn.Module, meta: dict, row: dict, best: float, is_best: bool,
                o: Optim, rows: list, objective: Optional[nn.Module] = None) -> None:
    """best first (a new file of its own), then the one-file commit of the epoch (weights, metadata,
    optimizer, RNG, metric rows), then the ``last.*`` copies derived from it: a kill anywhere leaves
    either epoch N-1 or epoch N, never a mix."""
    metrics = {"top1": row["val_top1"], "top5": row["val_top5"], "val_loss": row["val_loss"],
               "train_loss": row["train_loss"], "best_top1": best}
    m = dict(meta, epoch=row["epoch"], step=row["step"], metrics=metrics, save_id=ckpt.new_save_id())
    if is_best:
        ckpt.save_checkpoint(os.path.join(phase.out, "best"), model, m)
    ckpt.save_state(os.path.join(phase.out, "last.state.pt"), {
        "epoch": row["epoch"], "step": row["step"], "best_top1": best, "phase": phase.name,
        "model": ckpt.cpu_state(model), "meta": m, "rows": rows,
        "optimizer": o.opt.state_dict(), "scheduler": o.sched.state_dict(),
        "scaler": o.scaler.state_dict() if o.scaler is not None else None, "rng": rng_state(),
        "objective": objective_hook(objective, "resume_state")})
    ckpt.save_checkpoint(os.path.join(phase.out, "last"), model, m)


def fit(args: argparse.Namespace, phase: Phase, model: nn.Module, objective: nn.Module, loaders: Loaders,
        meta: dict, dinfo: dist.DistInfo, device: torch.device, resume_state: Optional[dict]) -> dict:
    """Train ``model`` through ``objective`` for ``phase.epochs``; returns the last epoch's row.
    ``model`` must already hold the resumed weights when ``resume_state`` is given."""
    steps_per_epoch = len(loaders.train)
    if args.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, args.max_train_batches)
    total = phase.epochs * steps_per_epoch
    o = _optimizer(args, phase, model, total, min(total, int(round(args.warmup_epochs * steps_per_epoch))), device)
    start_epoch, step, best = 0, 0, -1.0
    if resume_state is not None:
        start_epoch, step, best = _restore(resume_state, o)
        say("{}: resumed at epoch {}/{} (best top-1 {:.2f})".format(phase.name, start_epoch, phase.epochs, best),
            dinfo)
    objective_hook(objective, "begin_fit", step, total, (resume_state or {}).get("objective"))
    fused = _fuse(args, model, total, device, dinfo)  # by the phase's length: a resumed run keeps its path
    meta = dict(meta, fused=fused is not None)  # which path trained (not a resume key: either path resumes)
    train_obj = objective
    if dinfo.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_obj = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    logger = RunLogger(phase.out, enabled=dinfo.is_main, tensorboard=not args.no_tensorboard,
                       resume_epoch=start_epoch, resume_step=step,
                       resume_rows=resume_state.get("rows") if resume_state is not None else None)
    row: dict = {}
    try:
        for epoch in range(start_epoch, phase.epochs):
            if args.stop_after_epochs and epoch - start_epoch >= args.stop_after_epochs:
                say("{}: stopped after {} epoch(s) as asked; continue with --resume".format(
                    phase.name, args.stop_after_epochs), dinfo)
                return {"stopped": True, **row}
            loaders.sampler.set_epoch(epoch)
            objective.train()
            tr = _train_epoch(args, phase, epoch, train_obj, o, loaders, steps_per_epoch, step, dinfo, device, logger)
            step += steps_per_epoch
            ev = evaluate(model, loaders.val, device, args.max_eval_batches, o.autocast)
            # a learned allocation still searching may be over budget: best.* only from the final allocation on
            final = getattr(objective, "allocation_final", True)
            is_best = ev["top1"] > best and final
            best = max(best, ev["top1"]) if final else best
            extra = dict(objective_hook(objective, "epoch_metrics") or {},  # fused: graphs compiled so far (1)
                         **({"compiled_graphs": fused.graphs} if fused is not None else {}))
            row = {"epoch": epoch + 1, "step": step, "lr": o.sched.get_last_lr()[0], **tr,
                   "val_loss": ev["loss"], "val_top1": ev["top1"], "val_top5": ev["top5"], "val_img_s": ev["img_s"],
                   **extra}
            top5 = "n/a" if ev["top5"] is None else "{:.2f}".format(ev["top5"])
            note = objective_hook(objective, "note")
            say("{} epoch {}/{}: train loss {:.4f} acc {:.2f} | val top-1 {:.2f} top-5 {} loss {:.4f} | "
                "{:.0f} img/s{}".format(phase.name, epoch + 1, phase.epochs, tr["train_loss"], tr["train_acc"],
                                      ev["top1"], top5, ev["loss"], tr["train_img_s"],
                                      (" | " + note if note else "") +
                                      "".join(" | {} {:.4g}".format(k, v) for k, v in extra.items())), dinfo)
            if dinfo.is_main:
                _save_epoch(phase, model, meta, row, best, is_best, o, logger.rows + [row], objective)
                logger.epoch(row)
            dist.barrier()
    finally:
        logger.close()
        if fused is not None:  # the model leaves fit() a plain module again (copyable, its class's forward)
            fused.remove()
    return row


def _fuse(args: argparse.Namespace, model: nn.Module, steps: int, device: torch.device, dinfo: dist.DistInfo):
    """The compiled training forward (train/fastqat.py) for ``--compile``, or None (eager).  ``auto`` compiles
    phases of at least ``fastqat.AUTO_MIN_STEPS`` steps: compiling costs minutes on a CPU."""
    from train import fastqat

    mode = getattr(args, "compile", "off")
    if mode == "auto" and steps < fastqat.AUTO_MIN_STEPS:
        return None
    return fastqat.enable(model, mode, device, log=lambda msg: say(msg, dinfo))


def _train_epoch(args, phase: Phase, epoch: int, train_obj: nn.Module, o: Optim, loaders: Loaders, steps: int,
                 step: int, dinfo: dist.DistInfo, device: torch.device, logger: RunLogger) -> dict:
    loss_sum = correct = seen = 0.0
    part_sums: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="{} {}/{}".format(phase.name, epoch + 1, phase.epochs), disable=not dinfo.is_main,
               leave=False, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    progress = getattr(getattr(train_obj, "module", train_obj), "set_progress", None)  # learned bits: freezing
    for i, (x, y, *extra) in enumerate(loaders.train):
        if i >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if progress is not None:
            progress(step + i, o.total)
        loss, logits, parts = _step(args, o, train_obj, x, y, *(e.to(device, non_blocking=True) for e in extra))
        objective_hook(train_obj, "after_step")
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise UserError("{}: loss became {} at epoch {} step {}; lower --lr/--quant-lr or raise --warmup-epochs"
                            .format(phase.name, lv, epoch + 1, step + i + 1))
        n = y.numel()
        loss_sum += lv * n
        correct += float((logits.detach().argmax(1) == y).sum())
        seen += n
        for k, v in parts.items():
            part_sums[k] = part_sums.get(k, 0.0) + v * n
        img_s = seen * dinfo.world_size / (time.perf_counter() - t0)
        if dinfo.is_main and (i % 10 == 0 or i == steps - 1):
            bar.set_postfix(loss="{:.4f}".format(loss_sum / seen), acc="{:.2f}".format(100 * correct / seen),
                            img_s="{:.0f}".format(img_s), refresh=False, **_bits_postfix(parts))
            logger.scalar("train/loss", lv, step + i + 1)
            logger.scalar("train/lr", o.sched.get_last_lr()[0], step + i + 1)
        bar.update(1)
    bar.close()
    dt = time.perf_counter() - t0
    loss_sum, correct, seen = dist.all_reduce_sum([loss_sum, correct, seen], device)
    out = {"train_loss": loss_sum / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1),
           "train_img_s": seen / dt if dt > 0 else 0.0, "time_s": dt}
    out.update({"train_" + k: v / max(seen / dinfo.world_size, 1) for k, v in part_sums.items()})
    return out


def _bits_postfix(parts: dict) -> dict:
    """Progress-bar fields of a learned-bit run: mean weight/activation bits, BitOPs against the budget."""
    if "bitops_ratio" not in parts:
        return {}
    return {"bits": "{:.2f}/{:.2f}".format(parts["w_bits"], parts["a_bits"]),
            "bitops": "{:.2f}x".format(parts["bitops_ratio"])}


# ----------------------------------------------------------------------------- the recipe


def _run_key(meta: dict, key: str):
    """``meta[key]`` in a form comparable across code versions: configs with their defaults filled in
    (a run saved before a config field existed used its default), no holdout recorded = 0."""
    from train.config import DistillConfig, QuantConfig, VvtqConfig

    value = meta.get(key)
    if key == "holdout":
        return value or 0
    cls = {"quant": QuantConfig, "distill": DistillConfig, "vvtq": VvtqConfig}.get(key)
    return cls.from_dict(value).to_dict() if cls is not None and value else value


def _resume_state_for(out: str, meta: dict, repair: bool = True) -> tuple[Optional[dict], Optional[dict]]:
    """(state, weights) to continue the run in ``out``, or (None, None) when there is none.

    The state file is the one-file commit of an epoch (weights + metadata + optimizer + RNG), so
    nothing else is read; ``last.*`` is rewritten from it when a kill left it behind or ahead."""
    state_path = os.path.join(out, "last.state.pt")
    if not os.path.isfile(state_path):
        return None, None
    state = ckpt.load_state_file(state_path)
    sd, last = state.get("model"), state.get("meta")
    if sd is None or last is None:  # a state written before checkpoints were one file: check the pair
        sd, last = ckpt.load_checkpoint(os.path.join(out, "last.safetensors"))
        if last.get("epoch") != state.get("epoch"):
            best = ckpt.read_meta(os.path.join(out, "best.json")) or {}
            raise UserError("--resume: {} holds a mixed checkpoint set (last.safetensors at epoch {}, last.state.pt "
                            "at epoch {}: a save was interrupted), which cannot continue exactly; nothing was "
                            "changed -- start a new run with another --out{}".format(
                                out, last.get("epoch"), state.get("epoch"),
                                " (best.safetensors, epoch {}, is intact and exportable)".format(best["epoch"])
                                if best.get("epoch") else ""))
    runconfig.check_resume(out, last, meta)  # every flag that changes a number (the note: printed up front)
    for key in ("model", "method", "quant", "distill", "data", "holdout", "seed", "epochs", "batch_size", "vvtq"):
        if _run_key(last, key) != _run_key(meta, key):
            raise UserError("--resume: {} holds a run with {}={!r}, this command asks for {!r}; use the same flags "
                            "or another --out".format(out, key, last.get(key), meta.get(key)))
    if repair and "meta" in state:  # rank 0 rewrites what a kill left stale: last.*, metrics.csv, best.json
        if not ckpt.is_current(os.path.join(out, "last"), last.get("save_id")):
            ckpt.save_checkpoint(os.path.join(out, "last"), sd, last)
        write_metrics_csv(os.path.join(out, "metrics.csv"), state.get("rows") or [])
        ckpt.repair_sidecar(os.path.join(out, "best"))
    return state, sd


#: what a run saved before a metadata key existed had (so its --resume still matches)
def _base_meta(args: argparse.Namespace, spec, loaders: Loaders, method: str, epochs: int, qcfg, dcfg,
               vcfg=None) -> dict:
    return {
        "model": args.model, "num_classes": loaders.num_classes, "input_size": list(spec.input_size),
        "mean": list(spec.mean), "std": list(spec.std), "interpolation": spec.interpolation,
        "crop_pct": spec.crop_pct, "class_names": loaders.class_names,
        "init_from": args.init_source.path if getattr(args, "init_source", None) else None,
        "method": method, "bits": qcfg.bits_summary() if qcfg is not None else None,
        "quant": qcfg.to_dict() if qcfg is not None else None, "distill": dcfg.to_dict() if dcfg is not None else None,
        "data": args.data, "holdout": args.holdout, "seed": args.seed, "epochs": epochs, "batch_size": args.batch_size,
        "vvtq": vcfg.to_dict() if vcfg is not None else None,
        "code_revision": code_revision(), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        **runconfig.stamp(args),
        **image_records(args),
    }


def _load_fp_weights(model: nn.Module, path: str, what: str, say: bool = True) -> None:
    """Local FP weights (our checkpoint, or a timm state dict remapped by timm's filter) into ``model``;
    a classifier of another size (e.g. ImageNet head, 10-class data) starts fresh, said in one line."""
    from train.init_weights import InitSource, load_into

    load_into(model, InitSource(path, None, "{} {}".format(what, path)), say=say)


def _new_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    from train.models import create_model

    return create_model(args.model, num_classes=num_classes)  # --pretrained arrives as args.init_source


def _fp_teacher(args, spec, loaders: Loaders, dinfo, device) -> Optional[str]:
    """Path of FP weights to start from: ``--teacher``/``--checkpoint``, ``--init-from``/``--pretrained`` weights
    whose classifier fits, or trained into ``out/teacher`` (from those weights when their classifier was reset).
    Returns None when there is nothing."""
    init = args.init_source
    if args.teacher:
        return args.teacher
    if args.checkpoint:
        return args.checkpoint
    if init is not None and not args.init_head_fresh:
        return init.path
    if not args.fp_epochs:
        return None
    out = os.path.join(args.out, "teacher")
    meta = _base_meta(args, spec, loaders, "fp", args.fp_epochs, None, None)
    state, sd = _resume_state_for(out, meta, dinfo.is_main) if args.resume else (None, None)
    best_path = os.path.join(out, "best.safetensors")
    if state is not None and state["epoch"] >= args.fp_epochs and os.path.isfile(best_path):
        say("fp-teacher: reusing {} (top-1 {:.2f})".format(best_path, state.get("best_top1", float("nan"))), dinfo)
        return best_path
    seed_everything(args.seed)
    model = _new_model(args, loaders.num_classes)
    if init is not None:  # fine-tune the new classifier (and the rest) from the given weights
        from train.init_weights import load_into

        load_into(model, init, say=False)
    model.to(device)
    if sd is not None:
        ckpt.load_state(model, sd, os.path.join(out, "last.state.pt"))
    phase = Phase("fp-teacher", out, args.fp_epochs, args.fp_lr)
    row = fit(args, phase, model, Supervised(model, args.smoothing), loaders, meta, dinfo, device, state)
    if row.get("stopped"):
        return "stopped"
    return os.path.join(out, "best.safetensors")


def _vvtq_configs(args: argparse.Namespace) -> tuple[dict, dict, object]:
    """(QuantConfig fields, DistillConfig fields, VvtqConfig | None) of the VVTQ switches (train/vvtq.py)."""
    from train.config import VvtqConfig

    quant = {k: getattr(args, k) for k in ("module_scales", "weight_scale") if getattr(args, k, None) is not None}
    vcfg = VvtqConfig.for_method(args.method, obr=args.obr, obr_lambda=args.obr_lambda, obr_start=args.obr_start,
                                 multicrop_kd=args.multicrop_kd, osc_momentum=args.osc_momentum,
                                 osc_threshold=args.osc_threshold)
    distill = {"ce_weight": 0.0} if args.multicrop_kd else {}  # multi-crop KD: the soft labels are the only target
    if args.multicrop_kd:
        from train.softlabels import read_store_manifest

        read_store_manifest(args.multicrop_kd)  # a typo or an unfinished store must not wait for the FP teacher
    return quant, distill, vcfg


def _check_run_folder(args: argparse.Namespace) -> None:
    """Before any work: --out must be writable, and an earlier run there is continued or replaced, never
    silently overwritten."""
    check_out_dir(args.out, "--out", files=ckpt.RUN_OUTPUTS)
    if args.resume and not os.path.isdir(args.out):
        raise UserError("--resume: {} does not exist; drop --resume to start a new run".format(args.out))
    if args.resume:
        for note in runconfig.check_folder(args.out, args):
            sys.stderr.write(note + "\n")
    earlier = ckpt.run_files(args.out)
    if earlier and not (args.resume or args.force):
        last = ckpt.read_meta(os.path.join(args.out, "last.json")) or {}
        at = " (epoch {}/{})".format(last["epoch"], last.get("epochs")) if last.get("epoch") else ""
        raise UserError("--out {} already holds a run{} ({}): continue it with --resume, replace it with --force, "
                        "or pick a new --out".format(args.out, at, ", ".join(earlier[:3])))
    if args.force and earlier:
        out = os.path.realpath(args.out)
        for flag in ("checkpoint", "teacher"):
            p = getattr(args, flag)
            if p and os.path.realpath(p).startswith(out + os.sep):
                raise UserError("--{} {} lies inside --out {}, which --force would delete: copy it elsewhere or "
                                "pick a new --out".format(flag, p, args.out))


def _open_run_folder(args: argparse.Namespace) -> None:
    """Create --out (rank 0, after the data loaded); --force removes the earlier run, leftovers of a
    killed save are cleaned."""
    hold_folder(args.out, "--out")  # one writer per run folder, until run() ends (or the process dies)
    if args.force:
        removed = ckpt.remove_run(args.out)
        if removed:
            sys.stderr.write("note: --force: removed the earlier run in {} ({})\n".format(args.out, ", ".join(removed)))
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise output_error(args.out, e) from None
    for d in (args.out, os.path.join(args.out, "teacher")):
        for name in remove_stale_temps(d):
            sys.stderr.write("note: removed {}, left by an interrupted save\n".format(os.path.join(d, name)))


def _init_source(args: argparse.Namespace, spec):
    """Resolve ``--init-from`` / ``--pretrained`` (``args.init_source``) and return ``spec`` with the weights'
    preprocessing (their pretrained_cfg) where it fits the model's input."""
    from train import init_weights

    args.init_source, args.init_head_fresh = None, False
    if getattr(args, "init_from", None):
        args.init_source = init_weights.resolve(args.init_from)
    elif args.pretrained:
        args.init_source = init_weights.pretrained(spec.timm_name)
    return init_weights.with_preprocessing(spec, args.init_source.cfg if args.init_source else None)


def _check_init(args: argparse.Namespace, num_classes: int, dcfg, dinfo) -> None:
    """Load the given weights into this run's model once: a head reset is said in one line (rank 0), any other
    difference is one error line -- before the run folder is touched and before the first step."""
    if args.init_source is None:
        return
    from train.init_weights import load_into

    args.init_head_fresh = bool(load_into(_new_model(args, num_classes), args.init_source, say=dinfo.is_main))
    if args.init_head_fresh and dcfg is not None and not (args.teacher or args.checkpoint or args.fp_epochs):
        raise UserError("{}: its classifier starts fresh, so the FP teacher must be fine-tuned first: give "
                        "--fp-epochs N (N > 0) or --teacher CKPT".format(args.init_source.what))


def _configs(args: argparse.Namespace):
    """(model spec, QuantConfig | None, DistillConfig | None, VvtqConfig | None) of a command line, refused
    before any work."""
    from train.config import DistillConfig, QuantConfig, variant_overrides
    from train.models import create_model, model_spec

    spec = model_spec(args.model)  # unknown model -> UserError before any data is read
    spec = _init_source(args, spec)
    mixed = mixed_settings(args)
    w_bits, a_bits = resolve_bits(nominal_bits(mixed["budget"]) if mixed else args.bits, args.w_bits, args.a_bits)
    _check_run_folder(args)
    overrides = getattr(args, "quant_override", None) or {}
    if overrides and QuantConfig.for_method(args.method, w_bits) is None:
        raise UserError("--quant-override needs a quantized --method (not {})".format(args.method))
    vq, vd, vcfg = _vvtq_configs(args)
    q_over, d_over = variant_overrides(args)
    qcfg = QuantConfig.for_method(args.method, w_bits, a_bits=a_bits, granularity=args.granularity,
                                  overrides=overrides, mixed=mixed, **vq, **q_over)
    dcfg = DistillConfig.for_method(args.method, **vd, **d_over)
    if dcfg is not None and not (args.teacher or args.checkpoint or args.init_from or args.pretrained
                                 or args.fp_epochs):
        raise UserError("--method {} distils from a full-precision teacher: pass --teacher CKPT, --checkpoint CKPT, "
                        "--init-from PATH, --pretrained, or --fp-epochs N (N > 0) to train one first".format(
                            args.method))
    if qcfg is not None and qcfg.overrides:
        from train.quant import check_overrides

        check_overrides(create_model(args.model), qcfg)  # a pattern typo must not wait for the FP teacher
    return spec, qcfg, dcfg, vcfg


def _student(args, spec, loaders: Loaders, dinfo, device, fp_path, qcfg, dcfg, vcfg=None):
    """(model, objective, meta, resume state) of this run: FP weights, teacher copy, quantizers; the
    objective gains the terms and step hooks of the run's parts (train.qat.objective)."""
    seed_everything(args.seed)
    model = _new_model(args, loaders.num_classes)
    init_path = args.checkpoint or fp_path
    if init_path and args.init_source is not None and init_path == args.init_source.path:
        from train.init_weights import load_into

        load_into(model, args.init_source, say=False)  # said once, before training started
    elif init_path:
        _load_fp_weights(model, init_path, "--checkpoint" if args.checkpoint else "teacher")
    elif args.init_source is not None:  # --method fp from the given weights
        from train.init_weights import load_into

        load_into(model, args.init_source, say=False)
    model.to(device)
    meta = dict(_base_meta(args, spec, loaders, args.method, args.epochs, qcfg, dcfg, vcfg), teacher=fp_path,
                ancestors=ancestors(args, fp_path))
    state, sd = (None, None)
    if args.resume:
        state, sd = _resume_state_for(args.out, meta, dinfo.is_main)
        if state is None and dinfo.is_main:  # e.g. interrupted before its first epoch ended
            sys.stderr.write("note: --resume: no training state in {} yet; starting this phase from its "
                             "beginning\n".format(args.out))
    teacher = None
    if dcfg is not None:
        from train.distill import make_teacher

        teacher = make_teacher(model)
        if args.teacher and args.checkpoint:  # different weights for teacher and student init
            _load_fp_weights(teacher, args.teacher, "--teacher")
    if qcfg is not None:
        from train.qat import prepare
        from train.quant import calibrate

        prepare(model, qcfg)
        if sd is None:
            calibrate(model, _calibration_batches(loaders, args.calib_batches, device))
    if sd is not None:
        ckpt.load_state(model, sd, os.path.join(args.out, "last.safetensors"))
    objective = Supervised(model, args.smoothing)
    if dcfg is not None:
        from train.distill import Distiller

        objective = Distiller(teacher, model, dcfg, label_smoothing=args.smoothing)
    if qcfg is not None:  # the terms and step hooks of the run's parts (train.qat): BitOPs, OBR, oscillation
        from train.qat import QATConfig
        from train.qat import objective as with_parts

        objective = with_parts(objective, model, QATConfig(qcfg, dcfg, vcfg), log=lambda msg: say(msg, dinfo))
    return model, objective, meta, state


def run(args: argparse.Namespace) -> dict:
    """The whole recipe for one command line; returns the final epoch's metrics row."""
    spec, qcfg, dcfg, vcfg = _configs(args)
    check_sources(args)
    dinfo = dist.setup("cuda" if args.device.startswith("cuda") or
                       (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        device = resolve_device(args.device, dinfo)
        if getattr(args, "compile", "off") == "on":  # refused before the data loads
            from train.fastqat import require

            require(device)
        loaders = build_loaders(args.data, spec.input_size, spec.mean, spec.std, args.batch_size,
                                data_dir=args.data_dir, workers=args.workers, seed=args.seed, rank=dinfo.rank,
                                world_size=dinfo.world_size, pin_memory=device.type == "cuda", holdout=args.holdout,
                                resize={"interpolation": spec.interpolation, "crop_pct": spec.crop_pct})
        _check_init(args, loaders.num_classes, dcfg, dinfo)  # the weights fit, or one error line; before any file
        if dinfo.is_main:  # after the data loaded: a typo in --data-dir leaves no empty run folder
            _open_run_folder(args)
        say("{} {} on {} ({} train / {} val images, {} classes, world size {}) -> {}".format(
            args.model, qcfg.tag if qcfg else "fp32", args.data, len(loaders.train.dataset),
            len(loaders.val.dataset) * dinfo.world_size if dinfo.enabled else len(loaders.val.dataset),
            loaders.num_classes, dinfo.world_size, args.out), dinfo)
        # 1. full-precision weights: given, from the hub, or trained here (Fashion-MNIST has none)
        fp_path = None
        # a quantized run starts from FP weights and distils from them (--method fp --init-from: the student
        # loads them itself)
        if qcfg is not None or args.checkpoint:
            fp_path = _fp_teacher(args, spec, loaders, dinfo, device) if qcfg is not None else args.checkpoint
        if fp_path == "stopped":
            return {"stopped": True}
        dist.barrier()  # rank 0 has written the teacher before anyone reads it
        qat_loaders = loaders
        if vcfg is not None and vcfg.multicrop_kd:  # the store must fit this data and this teacher
            qat_loaders = _store_loaders(args, spec, loaders, vcfg, fp_path, dinfo)
        # 2. this run's model, teacher copy and quantizers; 3. train
        model, objective, meta, state = _student(args, spec, loaders, dinfo, device, fp_path, qcfg, dcfg, vcfg)
        if state is not None and state["epoch"] >= args.epochs:
            say("{}: already finished ({} epochs); nothing to do".format(args.out, state["epoch"]), dinfo)
            return {"epoch": state["epoch"], "finished": True}
        row = fit(args, Phase("qat" if qcfg is not None else "fp", args.out, args.epochs, args.lr), model, objective,
                  qat_loaders, meta, dinfo, device, state)
        if dinfo.is_main and not row.get("stopped"):
            objective_hook(objective, "finish", args.out, row)  # e.g. the learned-bit report
        if dinfo.is_main and not row.get("stopped"):
            best = ckpt.read_meta(os.path.join(args.out, "best.json")) or {}
            say("done: best top-1 {:.2f} -> {}".format(best.get("metrics", {}).get("top1", float("nan")),
                                                     os.path.join(args.out, "best.safetensors")), dinfo)
        return row
    finally:
        release_folder(args.out)
        dist.cleanup()


def _store_loaders(args, spec, loaders: Loaders, vcfg, fp_path: Optional[str], dinfo) -> Loaders:
    """Training batches from the soft-label store (checked against this data and teacher); records its digest."""
    from train.softlabels import store_loaders

    qat, store = store_loaders(loaders, vcfg.multicrop_kd, fp_path, spec.input_size, spec.mean, spec.std,
                               args.batch_size, args.seed, dinfo.rank, dinfo.world_size)
    vcfg.store_digest = store.digest
    say("multi-crop KD: {} ({} crops per image, top-{}), {} images per step".format(
        vcfg.multicrop_kd, store.manifest["crops"], store.manifest["topk"], qat.train.batch_size), dinfo)
    return qat


def _calibration_batches(loaders: Loaders, n: int, device: torch.device) -> list[torch.Tensor]:
    """A few un-augmented-order training batches (the sampler's epoch-0 order) for quantizer init."""
    loaders.sampler.set_epoch(0)
    out = []
    for i, (x, _) in enumerate(loaders.train):
        if i >= max(1, n):
            break
        out.append(x.to(device))
    return out
