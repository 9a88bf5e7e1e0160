"""The model facts the runtime needs (input size, normalisation, class names, tensor names).

They come from the exporter's sidecar beside ``<stem>.onnx``; an engine's sidecar carries
a copy (:data:`PREPROCESS_KEYS`) so bench and demo need only the engine file on the
device.  Validated once here so every consumer can trust the shapes.  Python 3.6-compatible.
"""

import os

from qformat import SIDECAR_KEYS, FormatError, check_format_version, files
from qformat.errors import UserError
from qformat.formats import artifact_label
from qformat.io import read_json, sha256_file, sidecar_path

#: Sidecar keys copied into an engine's sidecar (everything bench/demo read).
PREPROCESS_KEYS = ("model", "format", "target", "bits", "input_size", "mean", "std", "class_names",
                   "input_name", "output_name")
#: Preprocessing keys of the model's pretrained_cfg (sidecars before issue #23 lack them: bilinear, no crop).
OPTIONAL_PREPROCESS_KEYS = ("interpolation", "crop_pct")


def validate(meta, where):
    """Check the keys the runtime relies on; raise a UserError naming the file otherwise."""
    missing = [k for k in PREPROCESS_KEYS if k not in meta]
    if missing:
        raise UserError("{} lacks {}: re-export the model (python3 -m export ...) to regenerate it".format(
            where, ", ".join(missing)))
    size = meta["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(int(v) > 0 for v in size)):
        raise UserError("{}: input_size must be [C, H, W], got {!r}".format(where, size))
    c = int(size[0])
    for key in ("mean", "std"):
        if len(meta[key]) not in (1, c):
            raise UserError("{}: {} has {} values for {} channels".format(where, key, len(meta[key]), c))
    if any(float(s) == 0.0 for s in meta["std"]):
        raise UserError("{}: std contains 0".format(where))
    return meta


def load_onnx_meta(onnx_path):
    """The exporter sidecar of ``onnx_path`` (all of :data:`qformat.SIDECAR_KEYS` expected)."""
    if not os.path.isfile(onnx_path):
        raise UserError("ONNX file not found: {} (export one with `make export`)".format(onnx_path))
    files.require(onnx_path, files.ONNX)  # a text or empty file is named as such, before its sidecar is looked for
    path = sidecar_path(onnx_path)
    if not os.path.isfile(path):
        raise UserError("{} has no sidecar {}: export with `python3 -m export` (it writes both)".format(
            onnx_path, path))
    meta = read_json(path, "model sidecar")
    validate(meta, path)
    if meta.get("onnx_sha256") and meta["onnx_sha256"] != sha256_file(onnx_path):
        raise UserError("{} does not match its sidecar {} (sha256 differs: the file was truncated, replaced, or "
                        "an export was interrupted before its sidecar): re-export the model".format(onnx_path, path))
    if "format_version" in meta:  # version 1 and 2 sidecars are read alike; a newer one is refused
        try:
            check_format_version(meta["format_version"], path)
        except FormatError as e:
            raise UserError(str(e)) from None
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:  # only the preprocessing keys are required; the rest is provenance
        meta.setdefault("_warnings", []).append("sidecar lacks " + ", ".join(missing))
    return meta


def _shape_text(dims):
    return "[{}]".format(", ".join("N" if i == 0 and d == -1 else ("?" if d == -1 else str(d))
                                   for i, d in enumerate(dims)))


def check_input_shape(meta, dims, where, sidecar="its sidecar"):
    """The model's input ``dims`` (``[N, C, H, W]``; -1, None or a name where dynamic) must match the
    sidecar's ``input_size``; otherwise one line naming both shapes."""
    got = [d if isinstance(d, int) and d > 0 else -1 for d in dims]
    want = [int(v) for v in meta["input_size"]]
    if len(got) != 4 or any(g != -1 and g != w for g, w in zip(got[1:], want)):
        raise UserError("{} takes input {!r} of shape {} but {} says input_size {} (N, {}): they belong to "
                        "different models; re-export the model so both match".format(
                            where, meta.get("input_name"), _shape_text(got), sidecar, want,
                            ", ".join(str(w) for w in want)))
    return got


def onnx_input_dims(meta, info, onnx_path):
    """The dims of the sidecar's ``input_name`` in an :func:`runtime.onnx_info.inspect` result, checked
    against ``input_size`` (None when the ``onnx`` package is absent and the graph was not parsed)."""
    if not info.get("exact"):
        return None
    inputs = dict(info["inputs"])
    if meta["input_name"] not in inputs:
        raise UserError("sidecar input_name {!r} is not an input of {} (inputs: {}); re-export the model".format(
            meta["input_name"], onnx_path, ", ".join(inputs) or "none"))
    return check_input_shape(meta, inputs[meta["input_name"]], onnx_path, sidecar_path(onnx_path))


def preprocess_subset(meta):
    """The part of a model sidecar copied into an engine sidecar."""
    return dict((k, meta[k]) for k in PREPROCESS_KEYS + OPTIONAL_PREPROCESS_KEYS if k in meta)


def label(meta, path=None):
    """``deit_s w4a4 qdq`` (a learned allocation: ``deit_s mp3 qdq``) -- how results and logs name a model."""
    bits = meta.get("bits")
    return artifact_label(meta.get("model") or (os.path.basename(path) if path else "model"),
                          bits if isinstance(bits, dict) else None, meta.get("format", ""))
