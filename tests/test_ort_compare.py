"""The ONNX Runtime speed comparison (experiments.ort_compare): its table, ratios and verdicts on tiny graphs.

Nothing here asserts a speed: the figures live in the benchmark's printed table (make bench-ort).
"""

import pytest
from conftest import make_toy_model

from experiments import ort_compare


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("ortcmp")
    return d, [make_toy_model(d, "toy_w4a4." + f, fmt=f) for f in ("fp32", "qdq", "lowbit")]


def test_one_run_gives_every_row_with_ratios_sizes_and_fusions(toy):
    d, (fp32, qdq, lowbit) = toy
    logs = []
    res = ort_compare.compare_files(fp32, [qdq, lowbit], batches=(1, 2), rounds=2, iters=1, warmup=1, threads=1,
                                    work_dir=str(d), log=logs.append)
    labels = [r["label"] for r in res["rows"]]
    assert labels == ["fp32", "ort quantize_static", "ort quantize_dynamic", "ours qdq", "ours lowbit"]
    fp = res["rows"][0]
    assert fp["vs_fp32"] == {1: 1.0, 2: 1.0}
    for r in res["rows"]:
        assert all(v > 0 for v in r["img_per_s"].values()) and r["mb"] > 0 and r["load_s"] > 0
        for b in (1, 2):
            assert r["vs_fp32"][b] == pytest.approx(r["img_per_s"][b] / fp["img_per_s"][b])
    static = res["rows"][1]
    assert static["fusion"]["int_kernels"] >= 1  # ORT's quantizer made integer kernels of the toy's Conv/Gemm
    assert fp["fusion"]["int_kernels"] == 0 and fp["fusion"]["float_kernels"] >= 2
    lines = ort_compare.table(res["rows"], res["batches"])
    assert len(lines) == 2 + len(labels)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    # batch 8 was not measured: only the batch-1 verdicts (qdq vs static, lowbit vs fp32, qdq vs dynamic)
    assert len(res["verdicts"]) == 3 and all(" at batch 1 " in v for v in res["verdicts"])
    assert res["machine"]["cores"] >= 1 and res["rounds"] == 2


def _rows(speeds):
    """Rows as ratio_rows makes them, from {label: (role, {batch: img/s})}."""
    graphs = [ort_compare.Graph(label, __file__, role) for label, (role, _) in speeds.items()]
    speed = {label: {b: {"img_per_s": v} for b, v in s.items()} for label, (_, s) in speeds.items()}
    return ort_compare.ratio_rows(graphs, speed, [1, 8])


def test_verdicts_compare_the_right_rows():
    rows = _rows({"fp32": ("fp32", {1: 10.0, 8: 20.0}),
                  "ort quantize_static": ("reference", {1: 12.0, 8: 30.0}),
                  "ort quantize_dynamic": ("reference", {1: 16.0, 8: 40.0}),
                  "ours qdq": ("ours", {1: 13.0, 8: 29.0}),
                  "ours lowbit": ("ours", {1: 9.0, 8: 25.0})})
    v = ort_compare.verdicts(rows, [1, 8])
    assert v[0].startswith("met:") and "1.08x ort quantize_static at batch 1" in v[0]
    assert v[1].startswith("missed:") and "0.97x ort quantize_static at batch 8" in v[1]
    assert v[2].startswith("missed:") and "ours lowbit 0.90x fp32 at batch 1" in v[2]
    assert [x.split()[0] for x in v[3:]] == ["missed:", "missed:"]  # vs quantize_dynamic
    assert rows[3]["vs_fp32"] == {1: pytest.approx(1.3), 8: pytest.approx(1.45)}


def test_bad_input_is_one_line(tmp_path, expect_error):
    expect_error(ort_compare.main, ["--fp32", str(tmp_path / "missing.onnx")], "no such ONNX file")
    expect_error(ort_compare.main, ["--fp32", "x.onnx", "--rounds", "0"], "--rounds")
    expect_error(ort_compare.main, ["--fp32", "x.onnx", "--batch", "a"], "--batch takes a comma list")


def test_two_graphs_of_one_format_keep_their_own_rows(toy):
    d, (fp32, qdq, _) = toy
    res = ort_compare.compare_files(fp32, [qdq, qdq], batches=(1,), rounds=1, iters=1, warmup=1, threads=1,
                                    references=False, log=lambda s: None)
    assert [r["label"] for r in res["rows"]] == ["fp32", "ours qdq", "toy_w4a4.qdq.onnx"]
