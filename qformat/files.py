"""One door for the files a user hands a tool: what kind of file it is, refused in one line when it is not
the kind asked for.

Every reader of a user-supplied model file -- ONNX (bench, build, demo, ort_compare), TensorRT engine
(bench, demo) and checkpoint (export --checkpoint, train --checkpoint/--teacher, the torch backend) --
first calls :func:`require`, which looks at the first bytes only: an empty file, a text file (notes, a
JSON sidecar, a shell script), a checkpoint passed as ONNX or an ONNX passed as a checkpoint are named
for what they are. Whether the bytes then parse is the kind's own loader's job (``runtime.onnx_info``,
``train.checkpoint``), which turns its library's error into one line too. Python 3.6-compatible, no torch.
"""

import os
import struct

from .errors import UserError

ONNX, ENGINE, CHECKPOINT = "ONNX model", "TensorRT engine", "checkpoint"

#: how to make each kind, for the error line
_MAKE = {ONNX: "export one with python3 -m export", ENGINE: "build one with python3 -m runtime.build",
         CHECKPOINT: "train one with python -m train (its best.safetensors)"}


def _is_text(head):
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head[:-3].decode("utf-8", "ignore")  # a multi-byte character cut at the end of the sample
        if len(text.encode("utf-8")) < len(head) - 3:
            return False
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)


def _is_safetensors(head):
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n < (100 << 20) and head[8:9] == b"{"


def kind_of(path, head=None):
    """What ``path`` looks like from its first bytes: ``"empty"``, ``"text"``, ``"JSON"``, ONNX, checkpoint
    (safetensors or a torch zip/pickle), or ``None`` when unknown (an engine has no stable magic)."""
    if head is None:
        with open(path, "rb") as f:
            head = f.read(512)
    if not head:
        return "empty"
    if _is_safetensors(head):
        return CHECKPOINT
    if head[:4] == b"PK\x03\x04":
        return CHECKPOINT  # a torch.save zip archive (.pth, .pt)
    if _is_text(head):
        return "JSON" if head.lstrip()[:1] in (b"{", b"[") else "text"
    if head[:1] == b"\x08":  # ModelProto field 1 (ir_version), a varint: every ONNX file starts with it
        return ONNX
    return None


def _what(kind):
    named = {"empty": "an empty file", "text": "a text file", "JSON": "a JSON file", ONNX: "an ONNX model"}
    return named.get(kind, "a " + str(kind))


def require(path, want, flag=None):
    """Refuse ``path`` in one line unless it exists and may be a ``want`` (ONNX / ENGINE / CHECKPOINT)."""
    path = os.fspath(path)
    name = "{} {}".format(flag, path) if flag else path
    if not os.path.exists(path):
        raise UserError("{} file not found: {} ({})".format(want.replace(" model", ""), name, _MAKE[want]))
    if os.path.isdir(path):
        raise UserError("{} is a folder, not {}; give the file".format(name, _what(want)))
    try:
        kind = kind_of(path)
    except OSError as e:
        raise UserError("cannot read {}: {}".format(name, e.strerror or e)) from None
    if kind == want or kind is None:
        return
    raise UserError("{} is not a readable {}: it is {}{}; {}".format(
        name, want, _what(kind), " (an interrupted copy?)" if kind == "empty" else "", _MAKE[want]))
