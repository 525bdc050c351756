"""LeakageAudit(policy=..., on_breach=...) in real Trainer runs, and the W&B dashboard's calls."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from leak_audit import LeakageAudit, read_audit_log
from leak_audit.gate.breach import LeakageThresholdExceeded
from leak_audit.gate.policy import GatePolicy, PolicyError
from leak_audit.results.records import AuditRecord
from leak_audit.results.sinks import AuditLog
from leak_audit.results.wandb_dashboard import WandbDashboard, highlight_recovered
from tests.test_callback import Classifier, fit

LEAKY = {"rule": [{"metric": "token_recall", "max": 0.5}]}  # token_bag recovers every token: recall 1.0
SAFE = {"rule": [{"metric": "token_recall", "max": 1.0, "warn": 0.9}]}


class WaitForAudits(L.Callback):
    """Test-only: after each step, wait until the audit worker is idle, so the step at which a breach is
    known is deterministic (the callback itself never waits)."""

    def __init__(self, audit: LeakageAudit) -> None:
        self.audit = audit

    def on_train_batch_end(self, *args) -> None:
        deadline = time.time() + 60
        while self.audit._worker is not None and self.audit._worker.in_flight and time.time() < deadline:
            time.sleep(0.01)


def test_stop_ends_the_run_at_the_first_step_after_the_breaching_audit(tokenizer, tmp_path):
    audit = LeakageAudit(attacks=["token_bag"], every_n_steps=3, log_dir=tmp_path / "a", policy=LEAKY,
                         on_breach="stop")
    with pytest.warns(UserWarning, match="policy breached at step 0: token_recall = 1"):
        trainer = fit(Classifier(tokenizer), tmp_path, [audit, WaitForAudits(audit)], max_steps=30)
    # step 0 is audited at the end of batch 0; the result is drained at the end of batch 1: stop there
    assert trainer.global_step == 2
    assert audit.breach is not None and audit.breach.step == 0
    assert (audit.breach.metric, audit.breach.value, audit.breach.threshold) == ("token_recall", 1.0, 0.5)
    assert audit.verdict == "fail" and audit.state_dict()["breach"]["rule"] == "token_recall"
    assert [r.step for r in read_audit_log(audit.log_path)] == [0]


def test_a_policy_that_holds_lets_the_run_finish_and_logs_the_verdict(tokenizer, tmp_path):
    audit = LeakageAudit(attacks=["token_bag"], every_n_steps=3, log_dir=tmp_path / "a", policy=SAFE,
                         on_breach="stop", max_pending=8)
    logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(UserWarning, match="leakage warning at step 0: token_recall = 1 .* > warn 0.9"):
        trainer = fit(Classifier(tokenizer), tmp_path, [audit], max_steps=7, loggers=[logger])
    assert trainer.global_step == 7 and audit.breach is None and audit.verdict == "warn"
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        verdicts = {int(r["step"]): float(r["gate/verdict"]) for r in csv.DictReader(fh) if r.get("gate/verdict")}
    assert verdicts == {0: 1.0, 3: 1.0, 6: 1.0}  # 1 = warn


def test_raise_names_metric_value_and_threshold_and_keeps_the_log(tokenizer, tmp_path):
    audit = LeakageAudit(attacks=["token_bag"], every_n_steps=2, log_dir=tmp_path / "a", policy=LEAKY,
                         on_breach="raise")
    with pytest.raises(LeakageThresholdExceeded, match=r"token_recall = 1 .*> max 0.5") as info:
        fit(Classifier(tokenizer), tmp_path, [audit, WaitForAudits(audit)], max_steps=30)
    exc = info.value
    assert (exc.metric, exc.value, exc.threshold) == ("token_recall", 1.0, 0.5)
    records = read_audit_log(audit.log_path)
    assert [r.step for r in records] == [0] and records[0].status == "ok"


def test_warn_only_warns(tokenizer, tmp_path):
    audit = LeakageAudit(attacks=["token_bag"], every_n_steps=2, log_dir=tmp_path / "a", policy=LEAKY, max_pending=8)
    with pytest.warns(UserWarning, match="policy breached"):
        trainer = fit(Classifier(tokenizer), tmp_path, [audit], max_steps=5)
    assert trainer.global_step == 5 and audit.breach is not None and audit.verdict == "fail"


def test_policy_arguments_are_checked_eagerly(tmp_path):
    with pytest.raises(ValueError, match="on_breach must be one of 'warn', 'stop', 'raise', got 'halt'"):
        LeakageAudit(policy=LEAKY, on_breach="halt")
    with pytest.raises(ValueError, match="act on a policy: pass policy="):
        LeakageAudit(on_breach="stop")
    with pytest.raises(PolicyError, match="rouge_1"):
        LeakageAudit(policy={"rule": [{"metric": "rouge_1", "max": 0.5}]})
    path = tmp_path / "p.toml"
    path.write_text('[[rule]]\nmetric = "rouge1"\nmax = 0.5\n')
    assert LeakageAudit(policy=str(path)).policy == GatePolicy.from_toml(path)


def test_a_resumed_run_judges_the_whole_run(tokenizer, tmp_path):
    """mean_last_k over audits before and after a checkpoint: the earlier ones come back from the log."""
    policy = {"rule": [{"metric": "token_recall", "max": 0.5, "aggregation": "mean_last_k", "k": 3}]}
    earlier = AuditRecord(step=1, attack="token_bag", status="ok", metrics={"token_recall": 0.0}, run="another fit")
    AuditLog(tmp_path / "a" / "audit.jsonl").write([earlier])  # an earlier run in the same log: not this run's history
    first = LeakageAudit(attacks=["token_bag"], every_n_steps=2, log_dir=tmp_path / "a", policy=policy,
                         max_pending=8)
    with pytest.warns(UserWarning, match="policy breached at step 0"):
        fit(Classifier(tokenizer), tmp_path, [first], max_steps=3)
    resumed = LeakageAudit(attacks=["token_bag"], every_n_steps=2, log_dir=tmp_path / "a", policy=policy,
                           max_pending=8)
    resumed.load_state_dict(first.state_dict())
    with pytest.warns(UserWarning, match="mean of the last 3 of 3 audits, steps 0-4"):
        fit(Classifier(tokenizer), tmp_path, [resumed], max_steps=5)  # the schedule continues: step 4 only
    assert sorted({r.step for r in read_audit_log(resumed.log_path) if r.run == resumed.run_id}) == [0, 2, 4]


# ---------------------------------------------------------------------------- the W&B dashboard
class Recorder:
    """Stands in for a wandb run: records define_metric, log, summary and alert calls."""

    def __init__(self) -> None:
        self.defined: list[tuple] = []
        self.logged: list[dict] = []
        self.summary: dict = {}
        self.alerts: list[dict] = []

    def define_metric(self, name, **kw):
        self.defined.append((name, kw))

    def log(self, data):
        self.logged.append(data)

    def alert(self, **kw):
        self.alerts.append(kw)


def _rec(step, attack, rouge1, eps=None, samples=None):
    return AuditRecord(step=step, attack=attack, status="ok", metrics={"rouge1": rouge1, "token_recall": rouge1},
                       privacy={"epsilon": eps} if eps is not None else None, samples=samples)


def test_dashboard_defines_metrics_charts_and_worst_case_summary(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = Recorder()
    board = WandbDashboard(run, "text", alert=True)
    board.update([_rec(0, "span_check", 0.2, eps=1.0), _rec(0, "token_bag", 0.4, eps=1.0)], 0)
    board.update([_rec(10, "span_check", 0.9, eps=2.0), _rec(10, "token_bag", 0.3, eps=2.0)], 10)
    assert ("leak/*", {"step_metric": "trainer/global_step", "summary": "max"}) in run.defined
    assert any(name == "privacy/*" for name, _ in run.defined)
    last = run.logged[-1]
    assert last["trainer/global_step"] == 10
    assert {"charts/rouge1_per_attack", "charts/token_recall_per_attack",
            "charts/leakage_vs_epsilon"} <= last.keys()
    chart = last["charts/leakage_vs_epsilon"]
    assert chart.table.data == [[1.0, 0.4, 0], [2.0, 0.9, 10]]  # worst rouge1 over attacks vs epsilon
    assert run.summary["leak/worst/rouge1"] == 0.9 and run.summary["leak/worst/rouge1/at"] == "span_check@step 10"
    assert "leak/pick_worst/rouge1" not in run.summary and run.summary["audit/timeouts"] == 0
    assert "audit/run" not in run.summary  # records from before runs were named
    picked = _rec(20, "token_bag", 0.5)
    picked.info["attacker_pick"] = 1
    picked.run = "20261207T104500Z-a1b2c3"
    board.update([picked, AuditRecord(step=20, attack="span_check", status="timeout")], 20)
    assert run.summary["leak/pick_worst/rouge1"] == 0.5 and run.summary["leak/pick_worst/rouge1/at"] == "token_bag@step 20"
    assert run.summary["leak/worst/rouge1"] == 0.9 and run.summary["audit/timeouts"] == 1
    assert run.summary["audit/run"] == "20261207T104500Z-a1b2c3"  # ties the W&B run to its records in the log
    assert "samples/text" not in last  # samples are opt-in
    board.verdict("fail", {"rouge1": "fail"}, {"rouge1": "rouge1 = 0.9 > max 0.5"}, 10)
    board.verdict("fail", {"rouge1": "fail"}, {"rouge1": "rouge1 = 0.95 > max 0.5"}, 20)
    assert run.summary["gate/result"] == "fail" and run.summary["gate/rule/rouge1"] == "fail"
    assert len(run.alerts) == 1 and "step 10: rouge1 = 0.9 > max 0.5" in run.alerts[0]["text"]


def test_samples_table_highlights_recovered_words(monkeypatch):
    pytest.importorskip("wandb")
    run = Recorder()
    board = WandbDashboard(run, "text", log_samples=True)
    sample = {"reference": "the cat <sat>", "reconstruction": "the dog <sat>", "rouge1": 0.67}
    board.update([_rec(0, "span_check", 0.67, samples=[sample])], 0)
    table = run.logged[-1]["samples/text"]
    recon = table.data[0][3]
    assert "&lt;sat&gt;" in recon.html and "<sat>" not in recon.html  # escaped
    ref_html, rec_html = highlight_recovered("the cat sat", "the dog sat")
    assert rec_html.count("#c8f7c5") == 2 and rec_html.count("#f9c9c9") == 1  # 'the', 'sat' found; 'dog' not
    assert ref_html.count("#c8f7c5") == 2 and "cat" in ref_html


def test_image_panels_pair_originals_with_reconstructions(tmp_path):
    pytest.importorskip("wandb")
    import numpy as np

    rng = np.random.default_rng(0)
    (tmp_path / "samples").mkdir()
    np.savez_compressed(tmp_path / "samples" / "a.npz", originals=rng.random((2, 3, 8, 8), dtype=np.float32),
                        reconstructions=rng.random((2, 3, 8, 8), dtype=np.float32), psnr=np.array([31.5, 12.0]))
    run = Recorder()
    board = WandbDashboard(run, "image", log_samples=True, log_dir=tmp_path)
    rec = AuditRecord(step=5, attack="dlg", status="ok", metrics={"psnr": 31.5, "ssim": 0.9},
                      samples=[{"file": "samples/a.npz", "images": 2}])
    board.update([rec], 5)
    panels = run.logged[-1]["samples/images/dlg"]
    assert len(panels) == 2 and panels[0]._caption == "step 5 #0: original | reconstruction (PSNR 31.5 dB)"
    assert panels[0].image.size == (16, 8)  # original and reconstruction side by side
    assert "charts/psnr_per_attack" in run.logged[-1]
    quiet = Recorder()
    WandbDashboard(quiet, "image", log_dir=tmp_path).update([rec], 5)  # log_samples off: no pixels leave
    assert not any(k.startswith("samples/images") for k in quiet.logged[-1])


def _slow_token_bag():
    from leak_audit.attacks.text.token_bag import TokenBag

    class Slow(TokenBag):
        def run(self, inp):
            time.sleep(1.0)  # finishes after the last step: the breach is known only at the end of training
            return super().run(inp)

    return Slow()


def test_raise_on_a_breach_found_after_the_last_step(tokenizer, tmp_path):
    audit = LeakageAudit(attacks=[_slow_token_bag()], every_n_steps=1, log_dir=tmp_path / "a", policy=LEAKY,
                         on_breach="raise")
    with pytest.raises(LeakageThresholdExceeded, match="audit of step 0"):
        fit(Classifier(tokenizer), tmp_path, [audit], max_steps=1)
    assert [r.step for r in read_audit_log(audit.log_path)] == [0]


def test_rules_without_evidence_do_not_make_the_training_verdict_fail(tokenizer, tmp_path):
    """An epsilon rule in a run without DP-SGD has no value: the gate fails on it at release time, but during
    training the verdict (and gate/verdict) reflects only what was measured."""
    policy = {"rule": [{"metric": "token_recall", "max": 1.0}, {"metric": "epsilon", "max": 8.0}]}
    audit = LeakageAudit(attacks=["token_bag"], every_n_steps=2, log_dir=tmp_path / "a", policy=policy,
                         on_breach="stop", max_pending=8)
    trainer = fit(Classifier(tokenizer), tmp_path, [audit], max_steps=4)
    assert trainer.global_step == 4 and audit.verdict == "pass" and audit.breach is None
    report = GatePolicy.coerce(policy).evaluate(read_audit_log(audit.log_path))
    assert report.verdict == "fail" and "no record has a privacy field" in report.results[1].message


def test_the_breach_survives_a_checkpoint(tokenizer, tmp_path):
    audit = LeakageAudit(attacks=["token_bag"], every_n_steps=2, log_dir=tmp_path / "a", policy=LEAKY, max_pending=8)
    with pytest.warns(UserWarning, match="policy breached"):
        fit(Classifier(tokenizer), tmp_path, [audit], max_steps=1)
    resumed = LeakageAudit(attacks=["token_bag"], every_n_steps=2, log_dir=tmp_path / "a", policy=LEAKY)
    resumed.load_state_dict(audit.state_dict())
    assert resumed.breach == audit.breach and resumed.breach.step == 0 and resumed.verdict == "fail"


def test_image_panels_show_a_faint_reconstruction_faint():
    """Both halves are scaled on the originals' range: a near-constant reconstruction stays near-constant
    (scaled on its own range it would fill 0..255 and look like an image)."""
    pytest.importorskip("wandb")
    import numpy as np

    from leak_audit.metrics.scoring import display_images

    rng = np.random.default_rng(0)
    originals = rng.random((1, 3, 8, 8), dtype=np.float32)
    recons = 0.5 + 0.01 * rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    shown, rebuilt = display_images(originals, recons)
    assert shown.shape == rebuilt.shape == (1, 8, 8, 3)
    assert float(np.ptp(rebuilt)) < 0.1 and float(np.ptp(shown)) > 0.9
    assert display_images(originals[:, :1], recons[:, :1])[1].shape == (1, 8, 8)  # one channel: [N, H, W]


def test_dashboard_charts_the_promised_and_the_delivered_epsilon(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = Recorder()
    board = WandbDashboard(run, "text")
    for step, eps, low in ((0, 0.5, 0.0), (10, 2.0, 0.7)):
        rec = _rec(step, "span_check", 0.1, eps=eps)
        rec.privacy.update(epsilon_empirical=low, canaries=1000)
        board.update([rec], step)
    chart = run.logged[-1]["charts/epsilon_accountant_vs_empirical"]
    low = "empirical (canaries, 95% lower bound)"
    assert sorted(tuple(r) for r in chart.table.data) == sorted(  # (step, line, epsilon) over the audited steps
        [(0, "accountant", 0.5), (10, "accountant", 2.0), (0, low, 0.0), (10, low, 0.7)])


def test_a_lower_bound_breaches_while_training_only_beyond_the_limit():
    """The monitor keeps a record's lower-bound mark (``info["lower_bound"]``) in its light history: a lower bound
    below a max limit is no breach, one beyond it is a breach that says so."""
    from leak_audit.gate.breach import BreachMonitor
    from leak_audit.gate.policy import GatePolicy, MetricRule
    from leak_audit.results.records import AuditRecord

    warned = []
    monitor = BreachMonitor(GatePolicy((MetricRule(metric="rouge1", max=0.5),)), "warn", lambda k, m: warned.append(m))

    def record(step: int, value: float) -> AuditRecord:
        return AuditRecord(step=step, attack="span_check", status="ok", metrics={"rouge1": value},
                           info={"lower_bound": "LoRA adapters at B > 1", "rank": 16})

    judgement = monitor([record(0, 0.4)], 0)
    assert monitor.breach is None and not warned
    assert monitor.history[0].info == {"lower_bound": "LoRA adapters at B > 1"}
    # the release gate fails a rule with lower bounds only, so the run logs that, without acting on it
    assert (judgement.verdict, judgement.code, judgement.rules, judgement.breaches) == (
        "fail", 2, {"rouge1": "lower bounds only"}, {})
    assert monitor.verdict == "fail"
    monitor([record(2, 0.6)], 2)
    assert monitor.breach is not None and monitor.breach.value == 0.6
    assert "a lower bound" in monitor.breach.message and len(warned) == 1
