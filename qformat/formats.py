"""What each export format's graph holds, and how its files are named and labelled.

Both are facts every stage needs -- export writes them, the runtime's builder and bench and the Jetson
matrix read them -- and the runtime's device core cannot import export's emitters (they need onnx and
torch), so they live in the contract.  export's emitter registry takes ``quantizes_activations`` from
:data:`FORMAT_FACTS` (a test checks every registered emitter against it).  numpy-free, Python 3.6.
"""

import collections
import os

from .grid import FORMATS

#: ``activations``: the graph quantizes activations (Q/DQ pairs, or a low-bit node's own quantizer), so
#: its codes are checked against the converted model and an 8-bit unsigned input needs a UINT8-capable
#: target.  ``weights``: the graph stores integer weights.  ``woq`` (weight-only) is integer weights with
#: float activations; ``fp32`` is the float architecture (dequantized weights, no quantizer).
FormatFacts = collections.namedtuple("FormatFacts", ["activations", "weights", "about"])

FORMAT_FACTS = collections.OrderedDict([
    ("qdq", FormatFacts(True, True, "Q/DQ pairs: INT8 (INT4) weights and activations")),
    ("lowbit", FormatFacts(True, True, "packed 2/3/4-bit weights in QvitLowBitLinear nodes, quantized inputs")),
    ("fp32", FormatFacts(False, False, "float weights and activations (the FP baseline)")),
    ("woq", FormatFacts(False, True, "integer weights through DequantizeLinear, float activations")),
])
assert tuple(FORMAT_FACTS) == tuple(FORMATS), "one row per qformat.FORMATS entry"


def facts(fmt):
    # type: (str) -> FormatFacts
    if fmt not in FORMAT_FACTS:
        raise ValueError("unknown format {!r}: use one of {}".format(fmt, ", ".join(FORMAT_FACTS)))
    return FORMAT_FACTS[fmt]


def quantizes_activations(fmt):
    # type: (str) -> bool
    return facts(fmt).activations


def weight_only(fmt):
    # type: (str) -> bool
    """Integer weights, float activations (``woq``); False for a format this version does not know."""
    f = FORMAT_FACTS.get(fmt)
    return bool(f is not None and f.weights and not f.activations)


def bits_tag(bits):
    # type: (object) -> str
    """``w4a4`` from a sidecar's ``bits`` (``{"weight": 4, "act": 4, ...}``); a learned allocation is named by
    its BitOPs budget: ``mp3`` (its weight/act entries are only nominal widths); an int 4 is ``w4a4``."""
    if isinstance(bits, dict):
        if bits.get("budget") is not None:
            return "mp{:g}".format(float(bits["budget"]))
        if bits.get("weight") is None:
            return ""
        return "w{}a{}".format(bits["weight"], bits.get("act", bits["weight"]))
    if bits is None:
        return ""
    return "w{0}a{0}".format(int(bits))


def artifact_stem(model, bits, fmt):
    # type: (str, object, str) -> str
    """``deit_s_w4a4.qdq`` / ``deit_s_mp3.lowbit``: an export's file name without ``.onnx``."""
    return "{}_{}.{}".format(model, bits_tag(bits), fmt)


def artifact_path(folder, model, bits, fmt):
    # type: (str, str, object, str) -> str
    return os.path.join(folder, artifact_stem(model, bits, fmt) + ".onnx")


def sibling_path(path, fmt, other):
    # type: (str, str, str) -> str
    """The export of the same checkpoint in format ``other`` beside ``path`` (an export in format ``fmt``),
    or None when ``path`` is not named as exports are."""
    suffix = ".{}.onnx".format(fmt)
    if not path.endswith(suffix):
        return None
    return path[:-len(suffix)] + ".{}.onnx".format(other)


def artifact_label(model, bits, fmt):
    # type: (str, object, str) -> str
    """``deit_s w4a4 qdq`` / ``deit_s mp3 qdq``: how tables and logs name an export."""
    return " ".join(p for p in (str(model), bits_tag(bits), str(fmt or "")) if p)
