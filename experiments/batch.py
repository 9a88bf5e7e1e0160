"""Several study runs at once: ``qvit study --jobs N`` (two 1-thread runs on a 2-core CPU; or a whole batch of
``--device cuda`` trainers sharing one GPU within a lent machine's few minutes).

The runs a sitting may start are the study's pending ones in its usual order (stage by stage, seed-major), and
the list is recomputed whenever a run ends, so groups that a finished choice declares join the same sitting.
Each trainer is its own ``python -m train`` subprocess, checkpointed every chunk: ``--time-limit`` stops new
starts, ``--hard-limit`` terminates the trainers still running (they resume from their last chunk at the next
sitting), and every finished run is written as its JSON the moment it ends; ``--copy-to`` copies what the
sitting wrote (test numbers included) to a GPU call's ``$OUT``.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Optional

from experiments import runner as st
from qformat.errors import UserError


def pending(study: st.Study, plans: list) -> list:
    """(cfg, bits, seed, steps) of every run the plans still need, in the order a sitting runs them."""
    out, seen = [], set()
    for plan in plans:
        if plan.stage == "budget" and (not st.budget_needed(study, plan) or _budget_blocked(study, plan)):
            continue
        for bits in plan.bits:
            for g in study.grid(plan.stage, plan.choices(study)):
                for seed in plan.seeds:
                    for cfg in g.configs:
                        key = (st.slug(cfg), bits, seed, plan.steps)
                        if key in seen or not study.wanted(cfg) or st.load_run(study, cfg, bits, seed, plan.steps):
                            continue
                        seen.add(key)
                        out.append((cfg, bits, seed, plan.steps))
    return out


def _budget_blocked(study: st.Study, plan) -> bool:
    """A budget waits until the baseline has finished every seed at the budget before it (which may show
    the curve flat, so that this budget is not needed)."""
    i = st.BUDGETS.index(plan.steps) if plan.steps in st.BUDGETS else 0
    if i == 0:
        return False
    prev = st.BUDGETS[i - 1]
    return any(st.load_run(study, st.BASELINE, b, s, prev) is None for b in plan.bits for s in plan.seeds)


def _teachers(study: st.Study, runs: list) -> None:
    """Every FP teacher (and soft-label store) the runs need, made one at a time before any run starts."""
    for cfg in {(cfg.get("model"), cfg.get("crops")): cfg for cfg, *_ in runs}.values():
        st.ensure_inputs(study, cfg)


class _Clock:
    """Terminates the running trainers at the hard limit (they resume from their last chunk)."""

    def __init__(self, hard: float):
        self.hard, self.fired = hard, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            if time.time() >= self.hard:
                self.fired = True
                n = st.stop_live()
                if n:
                    print(f"[study] --hard-limit reached: stopped {n} running trainer(s); they resume next sitting",
                          flush=True)

    def close(self) -> None:
        self._stop.set()


def run_batch(study: st.Study, plans: list, jobs: int, hard_limit: Optional[float] = None) -> list:
    """Run the pending runs ``jobs`` at a time until none is left or the sitting is over. Returns the
    JSON paths written in this sitting (finished or failed runs; a run stopped at the limit writes none)."""
    runs = pending(study, plans)
    if not runs:
        return []
    _teachers(study, runs)
    written, errors, running = [], [], {}
    clock = _Clock(hard_limit) if hard_limit is not None else None
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while True:
                busy = {(st.slug(c), b, s, n) for c, b, s, n in running.values()}
                todo = [r for r in pending(study, plans) if (st.slug(r[0]),) + tuple(r[1:]) not in busy]
                while todo and len(running) < jobs and not (clock and clock.fired):
                    why = st._sitting_over(study)
                    if why:
                        print(f"[study] {why}: no new run starts; rerun the same command to continue", flush=True)
                        todo = []
                        break
                    cfg, bits, seed, steps = todo.pop(0)
                    study.started += 1
                    fut = pool.submit(st.run_one, study, cfg, bits, seed, steps)
                    running[fut] = (cfg, bits, seed, steps)
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    cfg, bits, seed, steps = running.pop(fut)
                    try:
                        if fut.result() is not None:
                            written.append(study.json_path(cfg, bits, seed, steps))
                    except UserError as e:  # stopped at the hard limit, or a crash: the others go on
                        errors.append(str(e))
    finally:
        if clock:
            clock.close()
    for e in errors:
        print(f"[study] not finished: {e}", file=sys.stderr, flush=True)
    return written


def copy_runs(study: st.Study, since: float, dest: str) -> int:
    """Copy the run JSONs written or updated since ``since`` (a time stamp) and the teachers' records under
    ``dest``, with their layout below ``--results``; how many files."""
    n = 0
    for sub in ("runs", "teachers"):
        for d, _, files in os.walk(os.path.join(study.results, sub)):
            for f in files:
                p = os.path.join(d, f)
                if f.endswith(".json") and (sub == "teachers" or os.path.getmtime(p) >= since):
                    target = os.path.join(dest, os.path.relpath(p, study.results))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy2(p, target)
                    n += 1
    return n
