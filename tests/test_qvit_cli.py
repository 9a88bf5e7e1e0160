"""One command (``qvit``) over every stage, experiment and tool; the Makefile and the Docker images use it;
the old ``python -m`` entry points still work."""

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from qvit.cli import COMMANDS, SECTIONS, STAGES, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _run(args, cwd=ROOT, timeout=120):
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_qvit_is_a_project_script():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"] == {"qvit": "qvit.cli:main"}


def test_help_lists_every_command_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert [name for name, _, _ in STAGES] == ["train", "softlabels", "export", "build", "bench", "demo"]
    for title, _ in SECTIONS:
        assert f"\n{title}:\n" in out
    names = [name for name, _, _ in COMMANDS]
    assert len(set(names)) == len(names)
    assert out.isascii()  # JetPack 4.6's Python 3.6 in a container writes ASCII to stdout (no UTF-8 locale)
    for name, _, text in COMMANDS:
        assert "\n" not in text and re.search(rf"^  {re.escape(name)} +{re.escape(text)}$", out, re.M), name


#: modules with a main() that are no command of their own, and why
NOT_COMMANDS = {"runtime.torchtools.sanitize_cases": "the kernel cases gpu-check runs under compute-sanitizer"}
#: the packages whose mains qvit must reach: the stages, the experiments on top, and the device tools
REACHABLE = ("train", "export", "runtime", "jetson", "experiments")


def _mains():
    out = set()
    for pkg in REACHABLE:
        for path in glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True):
            tree = ast.parse(open(path).read())
            if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
                out.add(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
    return out


def test_every_stage_and_experiment_main_is_a_qvit_command():
    mains = _mains()
    assert {"train.cli", "export.cli", "runtime.bench", "experiments.ablation", "experiments.ort_compare"} <= mains
    reached = {module for _, module, _ in COMMANDS}
    assert sorted(mains - reached - set(NOT_COMMANDS)) == []
    assert set(NOT_COMMANDS) <= mains  # an exemption of a main that is gone is stale


@pytest.mark.parametrize("name,module", [(n, m) for n, m, _ in COMMANDS if m.startswith(("experiments", "jetson"))]
                         + [("roofline", "runtime.roofline"), ("gpu-check", "runtime.torchtools.gpu_check")])
def test_each_command_answers_help_under_its_qvit_name(name, module, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: qvit {name}")


def test_a_command_whose_module_cannot_be_imported_is_one_line(tmp_path):
    code = ("import sys, qvit.cli as c; c.COMMANDS = c.COMMANDS + (('x', 'no_such_pkg.cli', 't'),); "
            "sys.exit(c.main(['x']))")
    r = _run([sys.executable, "-c", code])
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: qvit x cannot run here"), r.stderr


@pytest.mark.parametrize("argv,needle", [
    (["nope"], "unknown command 'nope'"),
    (["ablation", "--bits", "4,9"], "--bits"),
    (["ort-compare", "--fp32", "x.onnx", "--rounds", "0"], "--rounds"),
    (["train", "--bits", "9"], "argument --bits: must be in [2, 8]"),
    (["study", "--seeds", "a", "--plan"], "--seeds"),
    (["export", "--format", "int2"], "invalid choice"),
    (["bench", "--batch", "0", "--onnx", "x.onnx"], "must be >= 1"),
    (["build"], "the following arguments are required: --onnx"),
    (["softlabels", "--out", "s"], "the following arguments are required: --teacher"),
    (["demo", "--onnx", "m.onnx", "--headless"], "--headless needs --out"),
    (["bench-qat", "--modes", "jit"], "--modes takes"),
])
def test_each_stage_refuses_bad_flags_in_one_line(argv, needle):
    r = _run([sys.executable, "-m", "qvit"] + argv)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr


@pytest.mark.parametrize("argv", [
    ["-m", "train", "--help"], ["-m", "export", "--help"], ["-m", "runtime.build", "--help"],
    ["runtime/bench.py", "--help"], ["runtime/demo.py", "--help"], ["-m", "qvit", "train", "--help"],
])
def test_old_entry_points_still_work(argv):
    r = _run([sys.executable] + argv)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_scripts_do_not_edit_sys_path():
    sources = []
    for d in ("qformat", "train", "export", "runtime", "jetson", "experiments", "qvit"):
        sources += glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)
    assert len(sources) > 40
    assert [s for s in sources if "sys.path" in open(s).read()] == []


def test_script_outside_an_install_says_how_to_fix_it(tmp_path):
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "runtime", "bench.py"), "--help"], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot import qformat") and "PYTHONPATH" in r.stderr


def test_runtime_scripts_share_one_import_guard():
    """The four runtime scripts run as files import runtime/script_guard.py, and only they do."""
    scripts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "runtime", "*.py"))
                     if re.search(r"^    import script_guard\b", open(p).read(), re.M))
    assert scripts == ["bench.py", "build.py", "demo.py", "roofline.py"]
    for p in glob.glob(os.path.join(ROOT, "runtime", "*.py")):
        assert "cannot import qformat" not in open(p).read() or p.endswith("script_guard.py"), p


def _recipes():
    """``(target, command)`` for every recipe line of the Makefile."""
    out, target = [], None
    for line in open(os.path.join(ROOT, "Makefile")).read().splitlines():
        m = re.match(r"^([\w.-]+):", line)
        if m:
            target = m.group(1)
        elif line.startswith("\t") and target:
            out.append((target, line.strip().lstrip("@")))
    return out


def test_every_make_target_runs_python_through_qvit():
    names = {n for n, _, _ in COMMANDS}
    used = set()
    for target, cmd in _recipes():
        if cmd.startswith("echo "):
            continue
        if "$(PY)" in cmd:  # the interpreter itself only installs packages and runs pytest
            assert re.search(r"\$\(PY\) -m (pip|pytest)\b", cmd), (target, cmd)
        for name in re.findall(r"\$\(QVIT\) ([\w-]+)", cmd):
            assert name in names, (target, name)
            used.add(name)
        assert not re.search(r"python3? |\.py\b", cmd) or "vermin" in cmd, (target, cmd)
    assert {"train", "export", "build", "bench", "demo", "study", "ablation", "bench-ort", "gpu-check"} <= used


@pytest.mark.parametrize("name", ["Dockerfile.jetson", "Dockerfile.x86"])
def test_docker_images_run_qvit(name):
    text = open(os.path.join(ROOT, "docker", name)).read()
    cmd = re.findall(r"^CMD (.*)$", text, re.M)
    assert cmd == ['["qvit", "--help"]']
    assert 'exec python3 -m qvit "$@"' in text and "/usr/local/bin/qvit" in text
    assert not re.search(r"runtime/\w+\.py", "\n".join(line for line in text.splitlines() if not line.startswith("#")))


@pytest.mark.slow
def test_make_export_without_a_checkpoint_says_so_first(tmp_path):
    """`make export MODEL=.. BITS=..` exports runs/<model>_w<bits>/best.safetensors when it exists;
    otherwise its first line says the weights are random and how to train them."""
    make = ["make", "-s", "-f", os.path.join(ROOT, "Makefile"), "-o", "install"]
    r = subprocess.run(make + ["export", "MODEL=vit_fmnist", "BITS=4", "OUT=out", "FORMAT=fp32", "TARGET=ort"],
                       cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("note: no checkpoint") and "RANDOM weights" in first
    assert "make train MODEL=vit_fmnist BITS=4" in first
    (tmp_path / "runs" / "vit_fmnist_w4").mkdir(parents=True)
    (tmp_path / "runs" / "vit_fmnist_w4" / "best.safetensors").write_bytes(b"")
    dry = subprocess.run(make + ["-n", "export", "MODEL=vit_fmnist", "BITS=4"], cwd=str(tmp_path), env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert "--checkpoint runs/vit_fmnist_w4/best.safetensors" in dry.stdout
