"""runtime/roofline.py: model shapes match DeiT's published size, bounds are consistent, the plot is written."""

import pytest

from runtime import roofline


@pytest.mark.parametrize("model,gmacs,mparams", [("deit_t", 1.3, 5.7), ("deit_s", 4.6, 22.1), ("deit_b", 17.6, 86.6)])
def test_model_size_matches_deit_paper(model, gmacs, mparams):
    macs, _, params = roofline.footprint(model, 8)
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.05
    assert abs(params / 1e6 - mparams) / mparams < 0.03


def test_bounds_are_consistent():
    rows = roofline.table()
    assert len(rows) == len(roofline.DEVICES) * len(roofline.MODELS) * len(roofline.BITS) * 2
    for r in rows:
        assert r["img_s"] <= min(r["compute_img_s"], r["weight_bw_img_s"]) * (1 + 1e-9)
    w = dict((r["bits"], r["weight_mb"]) for r in rows if r["device"] == "tx2" and r["model"] == "deit_s")
    assert w[8] > w[4] > w[3] > w[2] and w[8] / w[2] > 3  # 2-bit weights ~4x smaller than 8-bit
    md = roofline.markdown(rows)
    assert md.startswith("PROJECTION") and "| deit_b | 2 |" in md


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = roofline.plot(roofline.table(), str(tmp_path / "r.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
