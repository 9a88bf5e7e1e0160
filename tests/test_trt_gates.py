"""The C++ TensorRT version gates of runtime/cuda agree with qformat/targets.py (TRT_FEATURES, TRT_MIN, and
each TensorRT row's plugin front-end), so the library and the Python side pick the same thing for a version.

Generic on purpose: every ``#if``/``#elif`` that tests NV_TENSORRT_MAJOR/MINOR in runtime/cuda is parsed and
evaluated over a grid of versions; it must be the minimum-version refusal (``#error``) at TRT_MIN, or the
exact gate of one TRT_FEATURES entry.  A new gate or a new row is checked without editing this test.
"""

import glob
import os
import re

import pytest

from qformat import targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(p for ext in ("h", "cpp", "cu") for p in glob.glob(os.path.join(ROOT, "runtime", "cuda", "*." + ext)))
GRID = [(major, minor) for major in range(7, 14) for minor in range(0, 12)]


def _condition(expr):
    """A version predicate from a preprocessor expression on NV_TENSORRT_MAJOR / NV_TENSORRT_MINOR."""
    py = expr.split("//")[0].strip()
    py = py.replace("NV_TENSORRT_MAJOR", "v[0]").replace("NV_TENSORRT_MINOR", "v[1]")
    py = py.replace("||", " or ").replace("&&", " and ")
    py = re.sub(r"!(?!=)", " not ", py)
    if re.search(r"[A-Za-z_]\w*", re.sub(r"\b(v|or|and|not)\b", "", py)):
        raise ValueError("cannot evaluate {!r}".format(expr))
    code = compile(py.strip(), "<gate>", "eval")
    return lambda v: bool(eval(code, {"__builtins__": {}}, {"v": v}))  # noqa: S307 -- our own header, parsed


def gates():
    """``(file, line, expression, predicate, body)`` of every version gate; ``body``: the lines up to the next
    directive at that nesting level."""
    out = []
    for path in SOURCES:
        lines = open(path).read().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"\s*#\s*(?:el)?if\s+(.*)$", line)
            if not m or "NV_TENSORRT_M" not in m.group(1) or "defined(" in m.group(1):
                continue
            body = []
            for nxt in lines[i + 1:]:
                if re.match(r"\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b", nxt):
                    break
                body.append(nxt.strip())
            out.append((os.path.basename(path), i + 1, m.group(1), _condition(m.group(1)), body))
    return out


def _same(pred, ref):
    return all(pred(v) == ref(v) for v in GRID)


def test_the_header_has_gates_to_check():
    names = {g[0] for g in gates()}
    assert "qvit_trt_compat.h" in names
    assert any(body and body[0].startswith("#error") for *_, body in gates())


@pytest.mark.parametrize("gate", gates(), ids=lambda g: "{}:{}".format(g[0], g[1]))
def test_every_gate_is_the_minimum_or_a_feature_of_the_targets_table(gate):
    name, line, expr, pred, body = gate
    if body and body[0].startswith("#error"):  # the refusal below the oldest TensorRT any target builds with
        assert _same(pred, lambda v: v < targets.TRT_MIN), (name, line, expr, targets.TRT_MIN)
        return
    feats = [f for f in targets.TRT_FEATURES if _same(pred, lambda v, f=f: targets.trt_has(f, v))]
    assert feats, "{}:{} `#if {}` matches no qformat.targets.TRT_FEATURES gate {}".format(
        name, line, expr, targets.TRT_FEATURES)


def test_plugin_front_end_gate_matches_every_tensorrt_row():
    v3 = [pred for _, _, _, pred, body in gates() if any(re.match(r"#define QVIT_PLUGIN_V3 1\b", b) for b in body)]
    assert len(v3) == 1, "one gate defines QVIT_PLUGIN_V3 1"
    assert _same(v3[0], lambda v: targets.trt_has("plugin_v3", v))
    rows = [t for t in targets.TARGETS if t.tensorrt]
    assert rows
    for t in rows:
        for end in t.trt:  # both ends of the row's TensorRT range build the front-end the row names
            assert ("V3" if v3[0](end) else "V2") == t.plugin_front_end, (t.name, end)
        assert t.trt[0] >= targets.TRT_MIN


def test_parser_refuses_what_it_cannot_read():
    with pytest.raises(ValueError):
        _condition("NV_TENSORRT_MAJOR >= 10 && SOMETHING_ELSE")
    assert _condition("NV_TENSORRT_MAJOR < 8 || (NV_TENSORRT_MAJOR == 8 && NV_TENSORRT_MINOR < 2)")((8, 1))
    assert not _condition("!(NV_TENSORRT_MAJOR >= 10)")((10, 0))
