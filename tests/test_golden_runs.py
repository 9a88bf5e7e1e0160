"""Not one number moves: every training method's golden run (tests/golden.py) against tests/golden_runs.json.

Everywhere: the checkpoint's configs and the exported graphs' op lists exactly, every tensor's float64 sum
and abs-sum within ``golden.RTOL``.  On the platform that recorded them (torch version + CPU ISA): the
sha256 of every tensor and of each exported graph.  Re-record after an intended change (another issue)
with ``python -m tests.golden --record --force``.
"""

import golden
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs():
    return golden.golden_runs()


@pytest.fixture(scope="module")
def rec():
    return golden.load_record()


def test_every_method_has_a_golden_run(rec):
    from train.cli import build_parser

    methods = next(a.choices for a in build_parser()._actions if a.dest == "method")
    recorded = {r["exact"]["meta"]["method"] for r in rec["runs"].values()}
    assert set(methods) <= recorded
    assert set(rec["runs"]) == set(golden.RUNS)


@pytest.mark.parametrize("name", list(golden.RUNS))
def test_golden_run_is_unchanged(name, runs, rec):
    problems = golden.compare_free(rec["runs"][name], runs[name])
    assert not problems, f"{name}: " + "; ".join(problems[:8])
    key = golden.platform_key()
    if key not in rec["platforms"]:
        pytest.skip(f"no exact hashes recorded for {key!r} (python -m tests.golden --record adds them)")
    problems = golden.compare_exact(rec["platforms"][key]["sha"][name], runs[name]["sha"])
    assert not problems, f"{name}: " + "; ".join(problems[:8])


def test_compare_catches_a_moved_number(rec):
    """The comparison is not vacuous: a sum off by 1 % and one flipped hash are reported."""
    name = "qvit"
    got = {"exact": rec["runs"][name]["exact"], "coarse": dict(rec["runs"][name]["coarse"])}
    k = next(k for k, (_, a) in got["coarse"].items() if a > 1.0)
    s, a = got["coarse"][k]
    got["coarse"][k] = [s + 0.01 * a, a]
    assert [p for p in golden.compare_free(rec["runs"][name], got) if p.startswith(k)]
    sha = next(iter(rec["platforms"].values()))["sha"][name]
    flipped = dict(sha, **{k: "0" * golden.SHA_CHARS})
    assert golden.compare_exact(sha, flipped) == [f"{k}: sha256 differs"]
