"""Converted model -> checked ONNX graph (qdq | lowbit | fp32) -> parity -> atomic files.

:func:`build_graph` is the pure part (model in, ``onnx.ModelProto`` out, nothing written);
:func:`export` adds parity and writes ``<model>_w<b>a<b>.<format>.onnx`` + sidecar JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import onnx
import torch
from torch import nn

import qformat
from qformat.errors import UserError
from qformat.io import atomic_write, sha256_bytes, sidecar_path, write_json

from . import cleanup, graph, qdq, rules, targets, trace
from .functions import lowbit_function
from .parity import Parity, load_images, run_parity

#: IR version per opset (the lowest that carries it; ORT and TensorRT parsers read it).
_IR = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}

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


@dataclass
class Result:
    path: str
    sidecar: str
    parity: Parity | None
    graphs: Graphs


def bits_of(model: nn.Module) -> dict:
    cfg = getattr(model, "qvit_quant_config", None)
    if not cfg:
        raise UserError("the model is not quantized (no quant config): export needs a converted qvit model")
    from train.config import QuantConfig

    return QuantConfig.from_dict(cfg).bits_summary()


def stem(model_name: str, bits: dict, fmt: str) -> str:
    return f"{model_name}_w{bits['weight']}a{bits['act']}.{fmt}"


def build_graph(model: nn.Module, input_size, fmt: str, target: str, opset: int | None = None,
                function: bool | None = None, log: Log = _stderr, int4: bool = True) -> Graphs:
    """Trace, rewrite, clean and check; raise UserError on anything a target cannot build."""
    tgt = targets.get_target(target)
    op = targets.resolve_opset(tgt, opset, fmt)
    if not getattr(model, "qvit_converted", False):
        raise UserError("export needs a converted model (train.quant.convert) or a checkpoint from python -m train")
    sites = trace.collect_sites(model)
    unsigned_max = max([int(s.module.int_bounds()[1].max()) for s in sites
                        if s.kind == "act" and not s.module.signed] or [0])
    if fmt != "fp32":
        targets.check_model_fits(tgt, op, bits_of(model), unsigned_max)
    t0 = time.time()
    example = torch.zeros((2,) + tuple(int(v) for v in input_size))
    sk = trace.skeleton(model, sites, example, op)
    graph.remove_identities(sk.graph)
    sk = cleanup.fold_and_clean(sk)
    cleanup.rename_nodes(sk)
    log(f"  traced {len(sites)} quantized sites, {len(sk.graph.node)} skeleton nodes ({time.time() - t0:.1f}s)")
    opts = qdq.Options(fmt=fmt, opset=op, int4=int4 and targets.use_int4(tgt, op), allow_uint8=not tgt.tensorrt)
    rw = qdq.Rewriter(sk, sites, opts)
    m = rw.run()
    graph.remove_identities(m.graph)
    graph.eliminate_dead(m.graph)
    del m.graph.value_info[:]
    opsets = [onnx.helper.make_opsetid("", op)]
    if rw.lowbit_nodes:
        opsets.append(onnx.helper.make_opsetid(qformat.LOWBIT_DOMAIN, qformat.LOWBIT_OPSET))
    del m.opset_import[:]
    m.opset_import.extend(opsets)
    m.ir_version = _IR[op]
    m.producer_name, m.producer_version = "qvit-edge export", str(qformat.FORMAT_VERSION)
    fp32 = cleanup.fp32_layers(m, model)
    _set_meta(m, {"qvit.format": fmt, "qvit.target": target, "qvit.fp32_layers": json.dumps(fp32)})
    if rw.lowbit_nodes:
        m.functions.append(lowbit_function(op))
    try:
        onnx.checker.check_model(m, full_check=True)
        m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RuntimeError(f"exported graph fails onnx.checker/shape inference: {e}") from e
    bad = rules.violations(m, tgt) if tgt.tensorrt and fmt != "fp32" else []
    if bad:
        raise UserError(f"the {fmt} graph breaks {tgt.runtime} rules: {bad[0]}" +
                        (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""))
    deploy = m
    keep_fn = (not tgt.tensorrt) if function is None else function
    if rw.lowbit_nodes and not keep_fn:
        deploy = onnx.ModelProto()
        deploy.CopyFrom(m)
        del deploy.functions[:]  # TensorRT's parser then looks QvitLowBitLinear up in the plugin registry
        onnx.checker.check_model(deploy)
    log(f"  {fmt} graph: opset {op}, {len(m.graph.node)} nodes, {rw.lowbit_nodes} packed low-bit Linear nodes"
        f"{' (plugin variant, no function body)' if deploy is not m else ''}")
    return Graphs(m, deploy, fp32, rw.lowbit_nodes)


def _set_meta(m: onnx.ModelProto, kv: dict) -> None:
    for k, v in kv.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v


def export(model: nn.Module, meta: dict, fmt: str, target: str, out_dir: str, opset: int | None = None,
           parity_n: int = 32, atol: float = 1e-3, rtol: float = 1e-3, min_agree: float = 0.99,
           calib_dir: str | None = None,
           function: bool | None = None, log: Log = _stderr, int4: bool = True) -> Result:
    """Export, prove parity in ONNX Runtime, then write the graph and its sidecar atomically."""
    t0 = time.time()
    bits = bits_of(model)
    name = stem(meta["model"], bits, fmt)
    log(f"export {name} for {target}")
    g = build_graph(model, meta["input_size"], fmt, target, opset, function, log, int4)
    par = None
    if parity_n > 0:
        x = load_images(parity_n, meta, calib_dir)
        sites = trace.collect_sites(model)
        ref = (lambda xb: trace.float_reference(model, sites, xb)) if fmt == "fp32" else model
        t1 = time.time()
        par = run_parity(ref, g.ort, x, atol, rtol, min_agree)
        log(f"  {par.line()} ({time.time() - t1:.1f}s)")
    path = os.path.join(out_dir, name + ".onnx")
    if par is not None and not par.passed:
        bad = os.path.join(out_dir, name + ".parity-failed.onnx")
        atomic_write(bad, g.ort.SerializeToString())
        why = (f"{par.mismatches} activation codes differ from PyTorch away from float ties" if par.mismatches else
               f"logits differ by {par.aligned_max_abs if par.aligned else par.max_abs:.3g} (atol {atol:g} + rtol "
               f"{rtol:g} x max|logit|), top-1 agreement "
               f"{100 * (par.aligned_top1_agree if par.aligned else par.top1_agree):.1f}% (min {100 * min_agree:g}%)")
        raise ParityError(f"parity check failed for {name}: {why}; graph kept at {bad} for inspection, "
                          f"not written as {path}")
    blob = g.deploy.SerializeToString()
    atomic_write(path, blob)
    side = sidecar_path(path)
    opset_used = next(o.version for o in g.deploy.opset_import if o.domain == "")
    from train.checkpoint import code_revision

    sidecar = {
        "format_version": qformat.FORMAT_VERSION, "model": meta["model"], "format": fmt, "target": target,
        "opset": opset_used, "bits": bits, "input_size": list(meta["input_size"]), "mean": list(meta["mean"]),
        "std": list(meta["std"]), "class_names": list(meta.get("class_names") or []),
        "input_name": trace.INPUT_NAME, "output_name": trace.OUTPUT_NAME, "metrics": dict(meta.get("metrics") or {}),
        "exporter_revision": code_revision(), "quant": meta.get("quant") or getattr(model, "qvit_quant_config", {}),
        "fp32_layers": g.fp32_layers, "lowbit_nodes": g.lowbit_nodes,
        "int4_weights": any(t.data_type == onnx.TensorProto.INT4 for t in g.deploy.graph.initializer),
        "plugin": ({"op": qformat.LOWBIT_OP, "domain": qformat.LOWBIT_DOMAIN, "version": qformat.LOWBIT_PLUGIN_VERSION,
                    "namespace": qformat.LOWBIT_PLUGIN_NAMESPACE, "function_body": len(g.deploy.functions) > 0}
                   if g.lowbit_nodes else None),
        "parity": par.to_dict() if par else None, "source_checkpoint": meta.get("checkpoint"),
        "onnx_sha256": sha256_bytes(blob),  # the runtime refuses a sidecar left from another export
    }
    write_json(side, sidecar)  # last: a kill before it leaves a graph whose old sidecar no longer matches
    log(f"  wrote {path} and {side} ({time.time() - t0:.1f}s)")
    return Result(path, side, par, g)


class ParityError(UserError):
    """Parity past tolerance: exit code 1 (distinct from bad input, 2)."""
