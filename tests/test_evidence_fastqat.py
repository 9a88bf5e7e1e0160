"""The README's fused-vs-eager accuracy sentence is recomputed from its committed runs (docs/fastqat)."""

import json
import os
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "docs", "fastqat", "equivalence_250.json")


def _top1(doc, mode):
    return [r["val_top1"] for r in sorted(doc["runs"], key=lambda r: r["seed"]) if r["mode"] == mode]


def test_readme_fused_accuracy_comes_from_the_committed_runs():
    doc = json.load(open(RUNS))
    eager, fused = _top1(doc, "eager"), _top1(doc, "fused")
    assert len(eager) == len(fused) >= 3
    readme = open(os.path.join(ROOT, "README.md")).read()
    for mode, v in (("eager", eager), ("fused", fused)):
        assert f"{mode} {statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" in readme, mode
    diffs = " / ".join(f"{f - e:.2f}".replace("-0.00", "0.00") for e, f in zip(eager, fused))
    assert f"paired differences {diffs}" in readme
    assert f"({min(eager):.2f}-{max(eager):.2f})" in readme


def test_the_fused_runs_ran_fused_with_one_graph():
    doc = json.load(open(RUNS))
    for r in doc["runs"]:
        assert r["fused"] is (r["mode"] == "fused"), r
        if r["mode"] == "fused":
            assert r["compiled_graphs"] == 1, r


def test_readme_bench_qat_table_is_the_committed_run():
    from experiments import bench_qat

    res = json.load(open(os.path.join(ROOT, "docs", "bench_qat", "bench_qat.json")))
    assert not res["void"]  # taken at a load average under 2
    table = bench_qat.markdown(res)
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == len(res["rows"]) + 1
    for line in rows:
        assert line in readme, line
    for r in res["rows"]:
        if r["mode"] == "fused":
            assert r["graphs"] == 1, r  # every fused configuration really ran compiled
