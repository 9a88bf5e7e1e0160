"""``qvit bench-qat`` / ``make bench-qat``: how much slower than FP training is each method's QAT step?

Times one optimizer step (forward, loss, backward, gradient clipping, AdamW, the method's per-step
hooks) of the FP model and of each method's QAT student -- baseline (LSQ+ with KD), qvit (IRM +
DGD + KD), mp (learned head-wise bits, BitOPs penalty), vvtq (module scales, OBR, oscillation
tracking) -- at each ``--bits``, eager and fused (train/fastqat.py), **interleaved**: every round
times every configuration once, in alternating order, so a load change hits all of them alike;
the table reports the median over rounds and the ratio to the FP step.

The teacher is timed on its own (a full forward, and the DGD-only forward that stops after the
last q/k): inside the student steps it is replayed from outputs computed once, so the ratios are
the student's cost, as the targets of the fast-QAT issue are stated.  Compilation time (the first
fused step) is reported separately and excluded from the medians.

The machine (CPU model, cores, threads, torch version, GPU) and its load average before and after
are recorded; a load average of 2 or more makes the numbers void (a warning and ``"void": true``).
Writes ``bench_qat.json`` and ``bench_qat.md`` under ``--out``.  ``--quick``: a one-block model, one
round of one step (tests check the shape of the outputs, not the speed).
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

METHODS = ("baseline", "qvit", "mp", "vvtq")
MODES = ("eager", "fused")
#: a load average from here on means other work shared the cores: the timings are void
VOID_LOAD = 2.0
#: --quick: a one-block model (the registry model's other settings kept)
QUICK_MODEL = {"depth": 1, "embed_dim": 24, "num_heads": 2}


@dataclass
class BenchOptions:
    model: str = "vit_fmnist"
    batch: int = 128
    bits: list = field(default_factory=lambda: [4, 2])
    methods: list = field(default_factory=lambda: list(METHODS))
    modes: list = field(default_factory=lambda: list(MODES))
    rounds: int = 5
    steps: int = 10
    device: str = "cpu"
    out: str = "docs/bench_qat"
    quick: bool = False


@dataclass
class Case:
    """One configuration: its model, objective and optimizer, ready to step."""

    label: str
    method: str  # "fp" or one of METHODS
    bits: Optional[int]
    mode: str
    model: Any
    objective: Any
    opt: Any
    scales: list
    bits_params: list
    fused: Any = None
    compile_s: float = 0.0
    times: list = field(default_factory=list)


def _parse(argv: Optional[list], prog: str) -> BenchOptions:
    from qformat.argtypes import int_list, positive_int
    from qformat.cli import parser

    p = parser(prog, __doc__.split("\n\n")[0], defaults_help=True)
    p.add_argument("--model", default="vit_fmnist", help="registry name (train.models)")
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--bits", default="4,2", help="comma list of uniform widths (W=A), 2..8")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--modes", default=",".join(MODES), help="comma list: eager, fused (train/fastqat.py)")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per configuration and round")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--out", default="docs/bench_qat", help="folder for bench_qat.json and bench_qat.md")
    p.add_argument("--quick", action="store_true", help="one-block model, one round of one step (tests)")
    a = p.parse_args(argv)
    from qformat import MAX_BITS, MIN_BITS
    from qformat.errors import UserError
    from qformat.paths import check_out_dir

    bits = int_list(a.bits, lo=MIN_BITS, what="--bits")
    if bits[-1] > MAX_BITS:
        raise UserError("--bits values must be <= {}, got {!r}".format(MAX_BITS, a.bits))
    methods, modes = _choices(a.methods, METHODS, "--methods"), _choices(a.modes, MODES, "--modes")
    check_out_dir(a.out, "--out")
    opts = BenchOptions(a.model, a.batch, sorted(bits, reverse=True), methods, modes, a.rounds, a.steps, a.device,
                        a.out, a.quick)
    if a.quick:
        opts.batch, opts.rounds, opts.steps = min(opts.batch, 4), 1, 1
    return opts


def _choices(text: str, allowed: tuple, flag: str) -> list:
    from qformat.errors import UserError

    got = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in got if v not in allowed]
    if not got or bad:
        raise UserError("{} takes a comma list of {}, got {!r}".format(flag, ", ".join(allowed), text))
    return list(dict.fromkeys(got))


def machine(device) -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------- configurations

class _Replay:
    """Stands in for the teacher inside a timed step: returns logits computed once and hands DGD the
    q/k recorded with them (the teacher's cost is timed on its own)."""

    def __init__(self, distiller, images) -> None:
        self.rec = distiller.teacher_recorder
        logits = distiller.run_teacher(images)
        self.logits = logits
        self.q, self.k = (list(self.rec.q), list(self.rec.k)) if self.rec is not None else ([], [])

    def __call__(self, images):
        if self.rec is not None:
            self.rec.q.extend(self.q)
            self.rec.k.extend(self.k)
        return self.logits


def _objective(method: str, bits: int, model, teacher, images):
    """(objective, distiller) of ``method`` on a prepared ``model``, composed as the trainer does (train.qat)."""
    from train.config import DistillConfig, VvtqConfig
    from train.distill import Distiller
    from train.qat import QATConfig, objective
    from train.vvtq import ObrPenalty

    dcfg = DistillConfig.for_method(method, **({"ce_weight": 0.0} if method == "vvtq" else {}))
    distiller = Distiller(teacher, model, dcfg)
    distiller.teacher[0] = _Replay(distiller, images)
    cfg = QATConfig(_quant_config(method, bits), dcfg, VvtqConfig.for_method(method))
    obj = objective(distiller, model, cfg, log=lambda msg: None)
    if obj is not distiller:
        obj.begin_fit(0, 1 << 30)
        obj.set_progress(0, 1 << 30)  # learned bits: searching, the bits stay learnable for the whole benchmark
        for term in obj.terms:
            if isinstance(term, ObrPenalty):
                term.step = term.total  # OBR at its full weight: the regulariser's cost is in the step
    return obj, distiller


def _quant_config(method: str, bits: int):
    from train.config import MixedBitsConfig, QuantConfig

    mixed = MixedBitsConfig(budget=float(bits)).to_dict() if method == "mp" else None
    return QuantConfig.for_method(method, bits, mixed=mixed)


def build_case(method: str, bits: Optional[int], mode: str, fp_model, teacher, images, device):
    """A ready-to-step :class:`Case` (``method`` "fp": the FP model with plain cross-entropy)."""
    import torch

    from train import fastqat
    from train.mixedbits import bit_widths
    from train.qat import prepare
    from train.quant import calibrate, scale_parameters
    from train.trainer import Supervised

    model = copy.deepcopy(fp_model).to(device).train()
    if method == "fp":
        obj = Supervised(model)
    else:
        prepare(model, _quant_config(method, bits))
        calibrate(model, [images])
        obj, _ = _objective(method, bits, model, teacher, images)
    fused = fastqat.enable(model, "on", device) if mode == "fused" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scales = list(scale_parameters(model)) if method != "fp" else []
    label = "FP" if method == "fp" else "{} W{}A{}".format(method, bits, bits)
    return Case(label, method, bits, mode, model, obj, opt, scales, bit_widths(model), fused)


def step(case: Case, images, labels) -> None:
    """One optimizer step as the trainer takes it (train.trainer._step without AMP)."""
    import torch

    from train.trainer import objective_hook

    loss, _, _ = case.objective(images, labels)
    case.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(case.model.parameters(), 1.0)
    case.opt.step()
    with torch.no_grad():
        for p in case.scales:
            p.clamp_(min=1e-8)
        for b in case.bits_params:
            b.project_()
    objective_hook(case.objective, "after_step")


# ----------------------------------------------------------------------------- timing

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, n: int, device) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def _warm_up(case: Case, images, labels, device) -> None:
    """Two untimed steps; the first fused one compiles (its time is the case's ``compile_s``)."""
    t = _timed(lambda: step(case, images, labels), 1, device)
    if case.fused is not None:
        case.compile_s = t
    step(case, images, labels)


def interleave(cases: list, images, labels, opts: BenchOptions, device) -> None:
    """``opts.rounds`` rounds, each timing every case for ``opts.steps`` steps, in alternating order."""
    for r in range(opts.rounds):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            case.times.append(_timed(lambda c=case: step(c, images, labels), opts.steps, device))


def teacher_times(teacher, images, opts: BenchOptions, device) -> dict:
    """Median seconds of the teacher's full forward and of its DGD-only forward (stops after the last q/k)."""
    from train.config import DistillConfig
    from train.distill import Distiller

    d = Distiller(teacher, copy.deepcopy(teacher), DistillConfig.for_method("dgd"))
    rec = d.teacher_recorder
    out = {}
    for name, need in (("teacher_full_s", True), ("teacher_dgd_only_s", False)):
        d.run_teacher(images, need)
        runs = []
        for _ in range(opts.rounds):
            runs.append(_timed(lambda n=need: (rec.clear(), d.run_teacher(images, n)), opts.steps, device))
        out[name] = statistics.median(runs)
    rec.remove()
    return out


# ----------------------------------------------------------------------------- the run and its report

def _rows(cases: list, batch: int) -> list:
    fp = {c.mode: statistics.median(c.times) for c in cases if c.method == "fp"}
    rows = []
    for c in cases:
        s = statistics.median(c.times)
        rows.append({"config": c.label, "method": c.method, "bits": c.bits, "mode": c.mode, "step_s": s,
                     "steps_per_s": 1.0 / s, "img_per_s": batch / s, "rounds_s": c.times,
                     "ratio_fp_same_mode": s / fp[c.mode] if c.mode in fp else None,
                     "ratio_fp_eager": s / fp["eager"] if "eager" in fp else None,
                     "compile_s": c.compile_s if c.fused is not None else None,
                     "graphs": c.fused.graphs if c.fused is not None else None})
    return rows


def run(opts: BenchOptions) -> dict:
    import torch

    from train.distill import make_teacher
    from train.models import create_model, model_spec

    device = torch.device(opts.device)
    if "fused" in opts.modes:
        from train.fastqat import require

        require(device)
    spec = model_spec(opts.model)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    fp_model = create_model(opts.model, **(QUICK_MODEL if opts.quick else {}))
    teacher = make_teacher(fp_model).to(device)
    images = torch.randn(opts.batch, *spec.input_size, device=device)
    labels = torch.randint(0, spec.num_classes, (opts.batch,), device=device)
    configs = [("fp", None)] + [(m, b) for b in opts.bits for m in opts.methods]
    # every case compiles the same forward code: lift dynamo's per-code cache limit (8) above the case count,
    # or the later cases would silently run eager (a training process compiles one model, so it never hits it)
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 2 * len(configs) * len(opts.modes))
    cases = [build_case(m, b, mode, fp_model, teacher, images, device) for m, b in configs for mode in opts.modes]
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        _warm_up(case, images, labels, device)
        sys.stderr.write("[bench-qat] warm-up {}/{} {} {}: {:.0f} s\n".format(
            i + 1, len(cases), case.label, "fused" if case.fused is not None else "eager", time.perf_counter() - t0))
    interleave(cases, images, labels, opts, device)
    result = {"options": vars(opts), "machine": machine(device), "load_before": list(load_before),
              "rows": _rows(cases, opts.batch), **teacher_times(teacher, images, opts, device),
              "load_after": list(os.getloadavg())}
    result["void"] = max(result["load_before"][0], result["load_after"][0]) >= VOID_LOAD
    return result


def markdown(res: dict) -> str:
    m, o = res["machine"], res["options"]
    lines = ["# QAT step vs FP step ({}, batch {}, {})".format(o["model"] + (" quick" if o["quick"] else ""),
                                                            o["batch"], m["device"]), "",
             "Machine: {} ({} cores, {} threads), torch {}{}; load average {:.2f} before, {:.2f} after{}.".format(
                 m["cpu"], m["cores"], m["threads"], m["torch"], ", " + m["gpu"] if m.get("gpu") else "",
                 res["load_before"][0], res["load_after"][0],
                 " -- **VOID: the machine was loaded**" if res["void"] else ""),
             "Median of {} interleaved rounds of {} steps; the teacher's forward is excluded (below).".format(
                 o["rounds"], o["steps"]), "",
             "| config | path | steps/s | img/s | x FP (same path) | x FP eager | compile s | graphs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append("| {} | {} | {:.2f} | {:.0f} | {} | {} | {} | {} |".format(
            r["config"], r["mode"], r["steps_per_s"], r["img_per_s"], _x(r["ratio_fp_same_mode"]),
            _x(r["ratio_fp_eager"]), "–" if r["compile_s"] is None else "{:.0f}".format(r["compile_s"]),
            "–" if r["graphs"] is None else r["graphs"]))
    lines += ["", "Teacher forward (inference mode, eager): full {:.1f} ms, DGD-only (to the last q/k) {:.1f} ms "
              "per batch.".format(1e3 * res["teacher_full_s"], 1e3 * res["teacher_dgd_only_s"])]
    return "\n".join(lines) + "\n"


def _x(v) -> str:
    return "–" if v is None else "{:.2f}x".format(v)


def main(argv: Optional[list] = None, prog: str = "qvit bench-qat") -> int:
    from qformat.errors import main_guard

    return main_guard(_main)(sys.argv[1:] if argv is None else list(argv), prog)


def _main(argv: list, prog: str) -> int:
    from qformat.io import atomic_write, write_json

    opts = _parse(argv, prog)
    res = run(opts)
    table = markdown(res)
    os.makedirs(opts.out, exist_ok=True)
    write_json(os.path.join(opts.out, "bench_qat.json"), res)
    atomic_write(os.path.join(opts.out, "bench_qat.md"), table.encode())
    sys.stdout.write(table)
    if res["void"]:
        sys.stderr.write("warning: load average >= {:g} during the benchmark: these timings are void; rerun on an "
                         "idle machine\n".format(VOID_LOAD))
    return 0


if __name__ == "__main__":
    sys.exit(main())
