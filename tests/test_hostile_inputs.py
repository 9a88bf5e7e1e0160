"""Hostile numbers on every CLI: each numeric flag gets values outside its range (and junk) from hypothesis.

Every one must end the same way: exit code 2, exactly one line on stderr that starts with ``error:`` and
names the flag, no traceback, nothing on stdout, and no file created, changed or removed in the output
folder.  The CLIs run in-process (their ``main(argv)``), so a sweep costs milliseconds per example.
"""

import contextlib
import hashlib
import io
import os

import pytest
from conftest import make_toy_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JUNK = ["", "abc", "1.5x", "0x10", "--", " ", "1e999", "nan", "inf", "-inf"]


def _ints(lo=None, hi=None):
    parts = [st.sampled_from(JUNK + ["2.0", "1.5"])]
    if lo is not None:
        parts.append(st.integers(max_value=lo - 1).map(str))
    if hi is not None:
        parts.append(st.integers(min_value=hi + 1).map(str))
    return st.one_of(parts)


def _floats(lo=None, hi=None, lo_open=False, hi_open=False):
    parts = [st.sampled_from(JUNK)]
    if lo is not None:
        parts.append(st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False).map(repr))
    if hi is not None:
        parts.append(st.floats(min_value=hi, exclude_min=not hi_open, allow_nan=False).map(repr))
    return st.one_of(parts)


POS, NONNEG, SEED, BITS = _ints(1), _ints(0), _ints(0, 2 ** 32 - 1), _ints(2, 8)
POSF, NONNEGF, FRACTION = _floats(0.0, lo_open=True), _floats(0.0), _floats(0.0, 1.0)
BATCHES = st.one_of(st.sampled_from(["", "0", "-1", "1,0", "4,-2", "a", "1;2", "1.5", ","]),
                    st.integers(max_value=0).map(str))
BIT_LISTS = st.one_of(st.sampled_from(["", ",", "4,1", "9", "a,b", "3.5"]), st.integers(max_value=1).map(str))

# cli -> (module, function, base argv with {out} / {onnx}, the folder that must not change, {flag: bad values})
CLIS = {
    "train": ("train.__main__", "main", ["--data", "synthetic", "--out", "{out}/run"], "{out}", {
        "--calib-batches": POS, "--fp-epochs": NONNEG, "--fp-lr": POSF, "--epochs": POS, "--batch-size": POS,
        "--lr": POSF, "--quant-lr": POSF, "--weight-decay": NONNEGF, "--quant-weight-decay": NONNEGF,
        "--warmup-epochs": NONNEGF, "--clip-grad": NONNEGF, "--smoothing": _floats(0.0, 1.0, hi_open=True),
        "--seed": SEED, "--workers": NONNEG, "--max-train-batches": POS, "--max-eval-batches": POS,
        "--stop-after-epochs": POS, "--bits": BITS, "--w-bits": BITS, "--a-bits": BITS,
        "--holdout": NONNEG, "--dgd-weight": NONNEGF, "--irm-blend-steps": NONNEG,
        "--bitops-budget": _floats(2.0, 8.0), "--search-ratio": _floats(0.0, 1.0, lo_open=True),
        "--bitops-weight": NONNEGF, "--bit-lr": POSF, "--obr-lambda": NONNEGF,
        "--obr-start": _floats(0.0, 1.0, hi_open=True), "--osc-momentum": _floats(0.0, 1.0, lo_open=True),
        "--osc-threshold": FRACTION}),
    "export": ("export.cli", "main", ["--model", "vit_fmnist", "--bits", "4", "--out", "{out}/art"], "{out}", {
        "--bits": BITS, "--opset": _ints(13, 21), "--parity-n": NONNEG, "--atol": NONNEGF, "--rtol": NONNEGF,
        "--min-agree": FRACTION}),
    "build": ("runtime.build", "main", ["--onnx", "{onnx}"], "{models}", {
        "--batch": POS, "--max-batch": POS, "--workspace": POS, "--useDLACore": NONNEG}),
    "bench": ("runtime.bench", "main", ["--onnx", "{onnx}", "--json", "{out}/b.json"], "{out}", {
        "--iters": POS, "--duration": POSF, "--warmup": NONNEG, "--threads": NONNEG, "--seed": SEED,
        "--batch": BATCHES}),
    "demo": ("runtime.demo", "main", ["--onnx", "{onnx}", "--headless", "--source", "{out}/src", "--out",
                                      "{out}/shots"], "{out}", {
        "--topk": POS, "--max-frames": NONNEG, "--width": POS, "--height": POS, "--fps": POS, "--retries": NONNEG,
        "--threads": NONNEG}),
    "ablation": ("experiments.ablation", "main", ["--budget", "tiny", "--out", "{out}/abl"], "{out}", {
        "--seed": SEED, "--fp-lr": POSF, "--bits": BIT_LISTS}),
    "study": ("experiments.study", "main", ["--data", "synthetic", "--results", "{out}/res", "--work", "{out}/work"],
              "{out}", {
        "--budget": POS, "--choose-at": POS, "--time-limit": POSF, "--max-runs": NONNEG, "--threads": POS,
        "--jobs": POS, "--hard-limit": POSF,
        "--holdout": POS, "--teacher-epochs": POS, "--batch-size": POS, "--chunk": POS, "--max-eval-batches": POS,
        "--bits": BIT_LISTS, "--seeds": st.sampled_from(["", ",", "a", "1.5", "-1", "0,-2", str(2 ** 32)])}),
    "bench_matrix": ("jetson.bench_matrix", "main", ["--models", "vit_fmnist", "--bits", "4", "--backend", "ort",
                                                     "--artifacts", "{models}", "--out", "{out}/m"], "{out}", {
        "--bits": BITS, "--iters": POS, "--warmup": NONNEG, "--batch": BATCHES}),
    "tegrastats": ("jetson.tegrastats", "main", [], "{out}", {"--seconds": POSF, "--interval": POS}),
    "bench_qat": ("experiments.bench_qat", "main", ["--quick", "--out", "{out}/bq"], "{out}", {
        "--batch": POS, "--rounds": POS, "--steps": POS, "--bits": BIT_LISTS}),
}
CASES = [(cli, flag) for cli, spec in CLIS.items() for flag in spec[4]]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    (out / "keep.txt").write_text("an earlier result")
    (out / "src").mkdir()
    models = tmp_path_factory.mktemp("models")
    return {"out": str(out), "models": str(models), "onnx": make_toy_model(str(models), "toy_w4a4.qdq")}


def _snapshot(folder):
    snap = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(root, n)
            st_ = os.lstat(p)
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) else "dir"
            snap[os.path.relpath(p, folder)] = (st_.st_size, st_.st_mtime_ns, digest)
    return snap


def _run_cli(cli, argv):
    import importlib

    module, fn = CLIS[cli][:2]
    main = getattr(importlib.import_module(module), fn)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("cli,flag", CASES, ids=["{}{}".format(c, f) for c, f in CASES])
def test_bad_numbers_are_one_line_errors(cli, flag, places):
    _, _, base, folder, flags = CLIS[cli]
    base = [a.format(**places) for a in base]
    folder = folder.format(**places)
    before = _snapshot(folder)

    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(flags[flag])
    def sweep(value):
        code, out, err = _run_cli(cli, base + ["{}={}".format(flag, value)])
        lines = err.splitlines()
        assert code == 2, (value, code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (value, err)
        assert flag in lines[0], (value, lines[0])
        assert "Traceback" not in err and out == "", (value, out)
        assert _snapshot(folder) == before, value

    sweep()


def test_every_numeric_flag_is_swept(monkeypatch, places):
    """A numeric flag added to any CLI without a range, or without a row above, fails here."""
    from qformat import argtypes

    class Caught(Exception):
        pass

    def grab(self, args=None, namespace=None):
        raise Caught(self)

    monkeypatch.setattr(argtypes.ArgumentParser, "parse_known_args", grab)
    for cli, (module, fn, _base, _, flags) in CLIS.items():
        import importlib

        with pytest.raises(Caught) as e:
            getattr(importlib.import_module(module), fn)(["--help"])
        actions = [a for a in e.value.args[0]._actions if a.option_strings]
        bare = [a.option_strings[0] for a in actions if a.type in (int, float)]
        assert bare in ([], ["--bits", "--w-bits", "--a-bits"]), (cli, bare)  # train's bits: checked by qformat
        numeric = {a.option_strings[0] for a in actions
                   if a.type in (int, float) or getattr(a.type, "__name__", "") in ("integer", "number")}
        assert numeric <= set(flags), (cli, numeric - set(flags))
