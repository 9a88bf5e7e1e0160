"""``qvit bench-qat`` (experiments/bench_qat.py): the shape of its JSON and table on a tiny model, and
its refusals.  Speed is not checked here (the integrator runs it on an idle machine)."""

import json
import os

import pytest

from experiments import bench_qat
from qvit.cli import main as qvit_main


def test_quick_run_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench"
    assert qvit_main(["bench-qat", "--quick", "--modes", "eager", "--bits", "4", "--out", str(out)]) == 0
    res = json.loads((out / "bench_qat.json").read_text())
    table = (out / "bench_qat.md").read_text()
    assert table == capsys.readouterr().out
    configs = [r["config"] for r in res["rows"]]
    assert configs == ["FP"] + ["{} W4A4".format(m) for m in bench_qat.METHODS]
    for r in res["rows"]:
        assert r["mode"] == "eager" and len(r["rounds_s"]) == 1 and r["step_s"] > 0
        assert r["img_per_s"] == pytest.approx(res["options"]["batch"] / r["step_s"])
        assert r["ratio_fp_eager"] == pytest.approx(r["step_s"] / res["rows"][0]["step_s"])
        assert r["compile_s"] is None and r["graphs"] is None
    assert res["teacher_full_s"] > 0 and res["teacher_dgd_only_s"] > 0
    assert {"cpu", "cores", "threads", "torch"} <= set(res["machine"])
    assert len(res["load_before"]) == 3 and len(res["load_after"]) == 3 and isinstance(res["void"], bool)
    assert table.count("\n| ") == len(configs) + 1  # header + one row per configuration
    for c in configs:
        assert "| {} | eager |".format(c) in table


@pytest.mark.parametrize("argv, msg", [
    (["--methods", "baseline,lsq"], "--methods"),
    (["--modes", "compiled"], "--modes"),
    (["--bits", "4,9"], "--bits"),
    (["--batch", "0"], "--batch"),
])
def test_bad_flags_are_one_line_errors_before_work(argv, msg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_qat.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]
    assert not os.path.exists(tmp_path / "o")
