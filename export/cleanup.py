"""Skeleton clean-up (onnx-graphsurgeon) and names that say which block and tensor a node is.

Runs on the traced skeleton *before* the marker rewrite, so constant folding can never
fold a weight DequantizeLinear back into float weights (the rewrite adds them afterwards).
"""

from __future__ import annotations

import warnings

import onnx
import onnx_graphsurgeon as gs


def fold_and_clean(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold shape arithmetic, drop dead nodes, topologically sort (graphsurgeon)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = gs.import_onnx(model)
        try:
            graph.fold_constants(error_ok=True)
        except Exception:  # noqa: BLE001 - folding is an optimisation; the unfolded graph is still valid
            pass
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    return out


def module_path(scope_name: str) -> str:
    """``/layers/layers.0/blocks/blocks.0/norm1/Act`` -> ``layers.0.blocks.0.norm1`` (tracer scopes)."""
    parts = [p for p in scope_name.split("/") if p][:-1]
    keep = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    # the tracer repeats the parent path in each child scope: "layers", "layers.0" -> keep the last segment
    path: list[str] = []
    for p in keep:
        if path and p.startswith(".".join(path) + "."):
            path = [p]
        else:
            path.append(p)
    return ".".join(path)


def rename_nodes(model: onnx.ModelProto) -> None:
    """Tracer scope names -> ``<module path>/<Op>`` (unique), e.g. ``blocks.3.attn/Softmax``."""
    seen: dict[str, int] = {}
    for n in model.graph.node:
        if not n.name.startswith("/"):
            continue
        path = module_path(n.name)
        op = n.name.rsplit("/", 1)[-1]
        name = f"{path}/{op}" if path else op
        k = seen.get(name, 0)
        seen[name] = k + 1
        n.name = name if k == 0 else f"{name}_{k}"


def fp32_layers(model: onnx.ModelProto, norms: list[str]) -> list[str]:
    """Names of the nodes computing the modules ``norms`` (LayerNorm / IRM; decomposed below opset 17):
    keep them FP32 in TensorRT.

    FP16 LayerNorm overflows in the variance on ViT activations; TensorRT 8.2 has no
    LayerNormalization op, so the builder pins these layers to FP32 by name.
    """
    out = []
    for n in model.graph.node:
        path = n.name.rsplit("/", 1)[0] if "/" in n.name else ""
        if any(path == p or path.startswith(p + ".") for p in norms) and n.op_type not in ("Constant",):
            out.append(n.name)
    return out
