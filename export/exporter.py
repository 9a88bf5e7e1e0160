"""Converted model -> checked ONNX graph (one emitter per format) -> parity -> atomic files.

:func:`build_graph` is the pure part (a :class:`train.deploy.Deployable` in, ``onnx.ModelProto``
out, nothing written); :func:`export` adds parity and writes ``<model>_w<b>a<b>.<format>.onnx``
+ sidecar JSON.  Everything about the quantizers comes from the deployable's
:class:`qformat.SiteSpec` records; everything about the target from :mod:`qformat.targets`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import torch

import qformat
from qformat import formats, targets
from qformat.errors import UserError
from qformat.io import atomic_write, code_revision, sha256_bytes, sidecar_path, write_json
from qformat.spec import allocation

from . import cleanup, graph, rules, trace, typed
from .emitters import Options, Tap, emitter_class
from .functions import lowbit_function
from .guard import add_nonfinite_guard
from .parity import Parity, compare, load_images, run_graph, run_parity
from .rewrite import Rewriter

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


@dataclass
class Graphs:
    """``ort``: runnable in ONNX Runtime (function bodies included); ``deploy``: what is written."""

    ort: onnx.ModelProto
    deploy: onnx.ModelProto
    fp32_layers: list[str] = field(default_factory=list)
    lowbit_nodes: int = 0
    taps: dict[str, Tap] = field(default_factory=dict)  # the emitter's parity taps
    sites: list[trace.Site] = field(default_factory=list)
    typing: str = "weak"  # "strong": FP16 tensors, FP32 LayerNorm/IRM/Softmax islands (export.typed)
    typed_info: dict = field(default_factory=dict)


@dataclass
class Result:
    path: str
    sidecar: str
    parity: Parity | None
    graphs: Graphs


@dataclass
class ParityOptions:
    """How an export is checked against PyTorch before it is written (``n`` = 0: not checked)."""

    n: int = 32  # images
    atol: float | None = None  # None: PARITY_TOL of the graph's typing
    rtol: float | None = None  # relative to the largest |logit|
    min_agree: float = 0.99  # minimum top-1 agreement (tie-aligned)
    calib_dir: str | None = None  # an image folder instead of the Fashion-MNIST test set


@dataclass
class ExportOptions:
    """What :func:`export` writes: the format and target, and how (the ``python -m export`` flags)."""

    fmt: str = "qdq"
    target: str = "ort"
    opset: int | None = None  # None: the target's default
    typing: str | None = None  # weak / strong / None: the target's default
    function: bool | None = None  # lowbit: embed QvitLowBitLinear's function body (None: for non-TensorRT targets)
    int4: bool = True  # 4-bit weights as ONNX INT4 where the target and opset have it
    parity: ParityOptions = field(default_factory=ParityOptions)
    guard: bool = True  # qdq/lowbit: a non-finite input gives non-finite logits (export/guard.py)


def _check_fits(dep: Any, tgt: targets.Target, fmt: str) -> None:
    """Refuse quantizer settings the target cannot represent (before any tracing).  Only a graph that
    quantizes activations has an activation quantizer to fit: ``woq`` and ``fp32`` keep them float."""
    if not emitter_class(fmt, tgt.emitter).quantizes_activations or tgt.uint8:
        return
    for s in dep.specs:
        hi = int(np.max(s.input.bounds()[1]))
        if s.input.needs_uint8:
            raise UserError(f"{s.name}: the {s.input.max_bits}-bit unsigned quantizer has bounds [0, {hi}] which do "
                            f"not fit INT8, and {tgt.runtime} has no UINT8 Q/DQ: retrain with attn_bits <= 7 or "
                            "export --target ort")


def _rewrite(dep: Any, fmt: str, tgt: targets.Target, op: int, int4: bool, log: Log) -> tuple[onnx.ModelProto,
                                                                                              Rewriter]:
    """Trace with markers, clean the skeleton, let the format's emitter replace the markers."""
    sites = trace.collect_sites(dep.model, dep.specs)
    t0 = time.time()
    example = torch.zeros((2,) + tuple(int(v) for v in dep.meta["input_size"]))
    sk = trace.skeleton(dep.model, sites, example, op)
    graph.remove_identities(sk.graph)
    sk = cleanup.fold_and_clean(sk)
    cleanup.rename_nodes(sk)
    log(f"  traced {len(sites)} quantized sites, {len(sk.graph.node)} skeleton nodes ({time.time() - t0:.1f}s)")
    opts = Options(opset=op, int4=int4 and targets.use_int4(tgt, op), uint8=tgt.uint8, pair_sum_max=tgt.pair_sum_max)
    rw = Rewriter(sk, sites, fmt, opts, tgt.emitter)
    m = rw.run()
    graph.remove_identities(m.graph)
    graph.eliminate_dead(m.graph)
    if not rules.parser_has(tgt, "Mod"):  # TensorRT 8.2: shape arithmetic without Mod
        cleanup.lower_mod(m)
    del m.graph.value_info[:]
    return m, rw


def _finish(m: onnx.ModelProto, op: int, fmt: str, target: str, rw: Rewriter, fp32: list[str],
            typing: str = "weak") -> tuple[onnx.ModelProto, dict]:
    """Opsets, IR version, metadata, the low-bit function body, FP16 typing (``strong``); then onnx.checker and
    shape inference.  Returns the model and the typing summary."""
    opsets = [onnx.helper.make_opsetid("", op)]
    if rw.lowbit_nodes:
        opsets.append(onnx.helper.make_opsetid(qformat.LOWBIT_DOMAIN, qformat.LOWBIT_OPSET))
    del m.opset_import[:]
    m.opset_import.extend(opsets)
    m.ir_version = targets.ir_version(op)
    m.producer_name, m.producer_version = "qvit-edge export", str(qformat.FORMAT_VERSION)
    for k, v in {"qvit.format": fmt, "qvit.target": target, "qvit.fp32_layers": json.dumps(fp32),
                 "qvit.typing": typing}.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    if rw.lowbit_nodes:
        m.functions.append(lowbit_function(op))
    info: dict = {}
    try:
        onnx.checker.check_model(m, full_check=True)
        m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
        if typing == "strong":
            m, info = typed.to_strongly_typed(m, fp32)
            onnx.checker.check_model(m, full_check=True)
            m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
        return m, info
    except ValueError as e:  # a constant that FP16 cannot hold
        raise UserError(f"cannot type the graph FP16 ({e}); export with --typing weak") from None
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RuntimeError(f"exported graph fails onnx.checker/shape inference: {e}") from e


def build_graph(dep: Any, fmt: str, target: str, opset: int | None = None, function: bool | None = None,
                log: Log = _stderr, int4: bool = True, typing: str | None = None, guard: bool = True) -> Graphs:
    """Trace, rewrite, clean and check ``dep`` (a train.deploy.Deployable); raise UserError on
    anything the target cannot build.  ``typing``: ``weak`` / ``strong`` / None (the target's default)."""
    tgt = targets.get_target(target)
    emitter_class(fmt, tgt.emitter).check_target(tgt)  # unknown format / one the target cannot run: one line first
    op = targets.resolve_opset(tgt, opset)
    typing = targets.resolve_typing(tgt, typing, op)
    if not dep.quantized or not getattr(dep.model, "qvit_converted", False):
        raise UserError("export needs a converted model (train.qat.convert) or a checkpoint from python -m train")
    _check_fits(dep, tgt, fmt)
    m, rw = _rewrite(dep, fmt, tgt, op, int4, log)
    fp32 = cleanup.fp32_layers(m, dep.float_modules)
    m, typed_info = _finish(m, op, fmt, target, rw, fp32, typing)
    bad = rules.violations(m, tgt) if tgt.tensorrt else []
    if typing == "strong":
        bad += typed.typed_violations(m, fp32)
    if bad:
        raise UserError(f"the {fmt} graph breaks {tgt.runtime} rules: {bad[0]}" +
                        (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""))
    if guard and emitter_class(fmt).quantizes_activations:  # NaN/Inf in -> NaN out (export/guard.py)
        m = add_nonfinite_guard(m, op)
    deploy = m
    keep_fn = (not tgt.tensorrt) if function is None else function
    if rw.lowbit_nodes and not keep_fn:
        deploy = onnx.ModelProto()
        deploy.CopyFrom(m)
        del deploy.functions[:]  # TensorRT's parser then looks QvitLowBitLinear up in the plugin registry
        onnx.checker.check_model(deploy)
    log(f"  {fmt} graph: opset {op}, {len(m.graph.node)} nodes, {rw.lowbit_nodes} packed low-bit Linear nodes"
        f"{' (plugin variant, no function body)' if deploy is not m else ''}" +
        (f"; strongly typed FP16 with {typed_info['fp32_islands']} FP32 islands, {typed_info['casts']} Casts"
         if typing == "strong" else ""))
    return Graphs(m, deploy, fp32, rw.lowbit_nodes, dict(rw.taps), trace.collect_sites(dep.model, dep.specs),
                  typing, typed_info)


#: Parity tolerances per typing: (atol, rtol x max|logit|) of the tie-aligned logits.  ``weak``: FP32 graph vs
#: FP32 PyTorch, the same arithmetic up to summation order.  ``strong``: FP16 graph vs the FP16 PyTorch model
#: (export.typed.half_reference); 5e-3 is ~10 FP16 unit roundoffs of the largest logit (measured: 3.6e-4).
PARITY_TOL = {"weak": (1e-3, 1e-3), "strong": (1e-3, 5e-3)}
#: Typed graphs: a code that differs by one is an FP16 tie when ``x/s`` lies within ``TIE_EPS + TYPED_TIE * |x/s|``
#: of the rounding boundary.  PyTorch rounds ``x/s`` to FP16 before rounding it to an integer, ONNX Runtime
#: divides in FP32, and the residual stream -- never re-quantized -- carries each side's own FP16 roundings
#: through every block: measured on vit_fmnist (4 blocks), differing codes lie up to 0.8% of |x/s| (16 unit
#: roundoffs) from the boundary; 64 (3.1%) leaves room for 12-block models.  A wrong scale or clip still shows:
#: codes differing by more than one always fail, and so does a tie rate above TYPED_MAX_TIES (measured 0.11%).
TYPED_TIE = 64 * 2.0 ** -11
TYPED_MAX_TIES = 0.01


def _reference(dep: Any, g: Graphs, fmt: str, model: Any):
    if emitter_class(fmt).quantizes_activations:
        return model
    sites = trace.collect_sites(model, dep.specs)
    return lambda xb: trace.float_reference(model, sites, xb)


def check_parity(dep: Any, g: Graphs, fmt: str, opts: ParityOptions, log: Log = _stderr) -> Parity:
    """The converted model (fp32/woq: without activation quantizers) vs ONNX Runtime on ``opts.n`` real images;
    for a strongly typed graph, the same model in FP16 with FP32 norms and softmax (export.typed)."""
    x = load_images(opts.n, dep, opts.calib_dir)
    d_atol, d_rtol = PARITY_TOL[g.typing]
    atol = d_atol if opts.atol is None else opts.atol
    rtol = d_rtol if opts.rtol is None else opts.rtol
    min_agree = opts.min_agree
    t1 = time.time()
    kw = dict(taps=g.taps, sites=[s.spec for s in g.sites])
    if g.typing == "strong":
        with typed.half_reference(dep.model, dep.float_modules) as half:
            par = run_parity(_reference(dep, g, fmt, half), g.ort, x, atol, rtol, min_agree, dtype=torch.float16,
                             tie_rel=TYPED_TIE, max_ties=TYPED_MAX_TIES, **kw)
        fp32 = compare(_reference(dep, g, fmt, dep.model)(x).float().numpy(), run_graph(g.ort, x), 0, 0)
        par.vs_fp32 = {"max_abs": fp32.max_abs, "max_rel": fp32.max_rel, "top1_agree": fp32.top1_agree}
    else:
        par = run_parity(_reference(dep, g, fmt, dep.model), g.ort, x, atol, rtol, min_agree, **kw)
    log(f"  {par.line()} ({time.time() - t1:.1f}s)")
    return par


def _sidecar(dep: Any, g: Graphs, fmt: str, target: str, bits: dict, par: Parity | None, blob: bytes) -> dict:
    meta = dep.meta
    opset_used = next(o.version for o in g.deploy.opset_import if o.domain == "")
    return {
        "format_version": qformat.FORMAT_VERSION, "model": meta["model"], "format": fmt, "target": target,
        "opset": opset_used, "bits": bits, "input_size": list(meta["input_size"]), "mean": list(meta["mean"]),
        "std": list(meta["std"]), "interpolation": meta.get("interpolation", "bilinear"),
        "crop_pct": float(meta.get("crop_pct", 1.0)), "class_names": list(meta.get("class_names") or []),
        "input_name": trace.INPUT_NAME, "output_name": trace.OUTPUT_NAME, "metrics": dict(meta.get("metrics") or {}),
        "exporter_revision": code_revision(), "quant": meta.get("quant") or {},
        "sites": allocation(dep.specs), "fp32_layers": g.fp32_layers, "lowbit_nodes": g.lowbit_nodes,
        "int4_weights": any(t.data_type == onnx.TensorProto.INT4 for t in g.deploy.graph.initializer),
        "typing": g.typing, "typed": g.typed_info or None,
        "plugin": ({"op": qformat.LOWBIT_OP, "domain": qformat.LOWBIT_DOMAIN, "version": qformat.LOWBIT_PLUGIN_VERSION,
                    "namespace": qformat.LOWBIT_PLUGIN_NAMESPACE, "function_body": len(g.deploy.functions) > 0}
                   if g.lowbit_nodes else None),
        "parity": par.to_dict() if par else None, "source_checkpoint": meta.get("checkpoint"),
        "onnx_sha256": sha256_bytes(blob),  # the runtime refuses a sidecar left from another export
    }


def export(dep: Any, out_dir: str, opts: ExportOptions, log: Log = _stderr) -> Result:
    """Export, prove parity in ONNX Runtime, then write the graph and its sidecar atomically."""
    t0 = time.time()
    fmt, target, po = opts.fmt, opts.target, opts.parity
    bits = dep.bits()
    name = formats.artifact_stem(dep.meta["model"], bits, fmt)
    log(f"export {name} for {target}")
    g = build_graph(dep, fmt, target, opts.opset, opts.function, log, opts.int4, opts.typing,
                    opts.guard)
    par = check_parity(dep, g, fmt, po, log) if po.n > 0 else None
    path = os.path.join(out_dir, name + ".onnx")
    if par is not None and not par.passed:
        bad = os.path.join(out_dir, name + ".parity-failed.onnx")
        atomic_write(bad, g.ort.SerializeToString())
        why = (f"{par.mismatches} activation codes differ from PyTorch away from float ties" if par.mismatches else
               f"{par.ties} of {par.codes} activation codes differ at float ties (max {100 * par.max_ties:g}%)"
               if par.codes and par.ties > par.max_ties * par.codes else
               f"logits differ by {par.aligned_max_abs if par.aligned else par.max_abs:.3g} (atol {par.atol:g} + "
               f"rtol {par.rtol:g} x max|logit|), top-1 agreement "
               f"{100 * (par.aligned_top1_agree if par.aligned else par.top1_agree):.1f}% "
               f"(min {100 * po.min_agree:g}%)")
        raise ParityError(f"parity check failed for {name}: {why}; graph kept at {bad} for inspection, "
                          f"not written as {path}")
    blob = g.deploy.SerializeToString()
    atomic_write(path, blob)
    side = sidecar_path(path)
    write_json(side, _sidecar(dep, g, fmt, target, bits, par, blob))  # last: a kill before it leaves a
    # graph whose old sidecar no longer matches (onnx_sha256)
    log(f"  wrote {path} and {side} ({time.time() - t0:.1f}s)")
    return Result(path, side, par, g)


class ParityError(UserError):
    """Parity past tolerance: exit code 1 (distinct from bad input, 2)."""
