"""Output locations are checked before any work, and every write failure is one ``error:`` line.

Read-only folders: a real read-only bind mount where ``mount`` is allowed (root in a container),
and everywhere the same check with the probe write made to fail with EROFS.
"""

import errno
import os
import subprocess
import sys

import pytest

from qformat import io as qio
from qformat import paths
from qformat.errors import OutputError, UserError, main_guard

LONG = "n" * 250  # a legal name (<= 255 bytes) whose old temp sibling "." + name + ".XXXXXXXX.tmp" was not
TOO_LONG = "n" * 256


@pytest.fixture
def ro_dir(tmp_path):
    """A real read-only folder (bind mount) holding one file; skips where mounting is not permitted."""
    d = tmp_path / "ro"
    d.mkdir()
    (d / "keep.txt").write_text("keep")
    ok = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(d)], capture_output=True).returncode != 0:
        subprocess.run(["umount", str(d)], capture_output=True)
        ok = False
    if not ok:
        pytest.skip("cannot bind-mount read-only here (not root / no CAP_SYS_ADMIN)")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


@pytest.fixture
def erofs(monkeypatch):
    """Make every probe write fail as on a read-only filesystem (the check itself, no mount needed)."""
    monkeypatch.setattr(paths, "_probe_writable", lambda d: OSError(errno.EROFS, os.strerror(errno.EROFS)))


def test_out_dir_checks(tmp_path, erofs):
    with pytest.raises(UserError, match=r"--out .*/run is not writable .*: Read-only file system"):
        paths.check_out_dir(str(tmp_path / "run"), "--out")


def test_out_dir_file_in_the_way_and_long_names(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UserError, match="is an existing file, not a folder"):
        paths.check_out_dir(str(f))
    with pytest.raises(UserError, match=r"afile is a file, not a folder"):
        paths.check_out_dir(str(f / "sub" / "run"))
    with pytest.raises(UserError, match="is 256 bytes, over this filesystem's limit of 255"):
        paths.check_out_dir(str(tmp_path / TOO_LONG / "run"))
    with pytest.raises(UserError, match="is 256 bytes"):
        paths.check_out_file(str(tmp_path / TOO_LONG), "--json")
    with pytest.raises(UserError, match="--json .* is a folder: give a file name"):
        paths.check_out_file(str(tmp_path), "--json")
    with pytest.raises(UserError, match="longer than this system's limit"):
        paths.check_out_dir("/" + "/".join(["d" * 200] * 25))
    paths.check_out_dir(str(tmp_path / LONG / "run"))  # legal: nothing raised, nothing created
    paths.check_out_file(str(tmp_path / LONG), "--json")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_real_read_only_mount(ro_dir):
    for check in (lambda: paths.check_out_dir(str(ro_dir)), lambda: paths.check_out_dir(str(ro_dir / "new")),
                  lambda: paths.check_out_file(str(ro_dir / "r.json"), "--json")):
        with pytest.raises(UserError, match="Read-only file system"):
            check()
    with pytest.raises(OutputError, match=r"cannot write .*/x.json: Read-only file system"):
        qio.write_json(str(ro_dir / "x.json"), {})
    assert os.listdir(ro_dir) == ["keep.txt"]


def test_atomic_write_temp_name_is_bounded_and_errors_are_one_line(tmp_path, monkeypatch):
    seen = []
    qio.WRITE_HOOKS.append(lambda event, path: seen.extend(os.listdir(tmp_path)) if event == "written" else None)
    try:
        qio.atomic_write(str(tmp_path / LONG), b"data")  # the temp sibling of a 250-byte name still fits
    finally:
        qio.WRITE_HOOKS.clear()
    tmp = [n for n in seen if n.endswith(".tmp")]
    assert len(tmp) == 1 and len(tmp[0].encode()) < 100 and (tmp_path / LONG).read_bytes() == b"data"
    with pytest.raises(OutputError, match=r"cannot write .*: File name too long$"):
        qio.atomic_write(str(tmp_path / TOO_LONG), b"x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*/file/a.json: .*/file is a file, not a folder"):
        qio.write_json(str(tmp_path / "file" / "a.json"), {})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device") as e:
        qio.atomic_write(str(tmp_path / "b.bin"), b"x")
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == sorted(["file", LONG])  # no temp file left behind


def test_main_guard_turns_any_oserror_into_one_line(capsys):
    @main_guard
    def main():
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where")

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: Permission denied (/some/where)\n"


def test_remove_stale_temps_spares_live_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = qio.temp_prefix(str(tmp_path / "best.safetensors"))
    names = [".best.safetensors.{}-abc123.tmp".format(dead), mine + "xyz.tmp", ".best.json.{}-q.tmp".format(dead),
             "best.safetensors", ".hidden.tmp", "notes.tmp"]
    for n in names:
        (tmp_path / n).write_text("x")
    (tmp_path / ".clip.mp4.{}-d.tmp".format(dead)).mkdir()  # the demo's video temp folder
    removed = qio.remove_stale_temps(str(tmp_path))
    assert sorted(removed) == sorted([names[0], names[2], ".clip.mp4.{}-d.tmp".format(dead)])
    assert sorted(os.listdir(tmp_path)) == sorted([names[1], "best.safetensors", ".hidden.tmp", "notes.tmp"])


# ----------------------------------------------------------------------------- the CLIs, before any work


def one_line_error(capsys, *needles):
    """Assert that stderr holds exactly one line, ``error: ...`` containing every needle; return it."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _clis(d, onnx):
    from export.cli import main as export_main
    from runtime import bench, demo
    from train.__main__ import main as train_main

    tiny = ["--data", "synthetic", "--method", "fp", "--epochs", "1", "--batch-size", "8", "--no-tensorboard"]
    return [
        (train_main, tiny + ["--out", d + "/run"], "--out"),
        (export_main, ["--model", "vit_fmnist", "--bits", "4", "--out", d + "/art"], "--out"),
        (bench.main, ["--onnx", onnx, "--json", d + "/r.json"], "--json"),
        (demo.main, ["--onnx", onnx, "--headless", "--source", d, "--out", d + "/shots"], "--out"),
        (demo.main, ["--onnx", onnx, "--headless", "--source", d, "--out", d + "/a.mp4"], "--out"),
        (demo.main, ["--onnx", onnx, "--headless", "--source", d, "--screenshot", d + "/s.png"], "--screenshot"),
    ]


def _toy(tmp_path_factory):
    from conftest import make_toy_model

    return make_toy_model(tmp_path_factory.mktemp("toy"), "toy_w4a4.qdq")


def test_clis_refuse_read_only_outputs_before_work(tmp_path, tmp_path_factory, erofs, capsys, monkeypatch):
    from runtime import bench, demo

    def no_work(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(bench, "open_backend", no_work)
    monkeypatch.setattr(demo, "open_backend", no_work)
    for main, argv, flag in _clis(str(tmp_path), _toy(tmp_path_factory)):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        one_line_error(capsys, flag, "not writable", "Read-only file system")
    assert os.listdir(tmp_path) == []


def test_clis_refuse_real_read_only_mount(ro_dir, tmp_path_factory, capsys):
    for main, argv, flag in _clis(str(ro_dir), _toy(tmp_path_factory)):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        one_line_error(capsys, flag, "Read-only file system")
    assert os.listdir(ro_dir) == ["keep.txt"]


def test_clis_refuse_a_file_given_as_folder_and_overlong_names(tmp_path, tmp_path_factory, capsys):
    from export.cli import main as export_main
    from runtime import bench, build
    from train.__main__ import main as train_main

    onnx = _toy(tmp_path_factory)
    f = tmp_path / "results"
    f.write_text("not a folder")
    cases = [
        (train_main, ["--data", "synthetic", "--method", "fp", "--out", str(f)], "is an existing file, not a folder"),
        (export_main, ["--model", "vit_fmnist", "--bits", "4", "--out", str(f)], "is an existing file"),
        (bench.main, ["--onnx", onnx, "--json", str(tmp_path / TOO_LONG)], "is 256 bytes"),
        (bench.main, ["--onnx", onnx, "--json", str(f / "r.json")], "is a file, not a folder"),
        (build.main, ["--onnx", onnx, "--saveEngine", str(tmp_path / (TOO_LONG + ".engine"))], "is 263 bytes"),
    ]
    for main, argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        one_line_error(capsys, needle)
    assert os.listdir(tmp_path) == ["results"] and f.read_text() == "not a folder"


def test_bench_json_with_a_250_byte_name(tmp_path, tmp_path_factory):
    from runtime import bench

    out = tmp_path / LONG
    assert bench.main(["--onnx", _toy(tmp_path_factory), "--iters", "2", "--warmup", "0", "--json", str(out)]) == 0
    assert out.is_file() and os.listdir(tmp_path) == [LONG]


def test_disk_full_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    from train.__main__ import main

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        main(["--data", "synthetic", "--method", "fp", "--epochs", "1", "--max-train-batches", "1",
              "--max-eval-batches", "1", "--batch-size", "8", "--no-tensorboard", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err  # the (cleared) progress bar came first
    assert err.count("error:") == 1 and "Traceback" not in err and err.endswith("\n")
    last = err.splitlines()[-1]
    assert last.startswith("error: cannot write ") and "best.safetensors: No space left on device" in last
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]
