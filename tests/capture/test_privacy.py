"""DP-SGD with Opacus: the audit attacks the released gradient, and ε is reported without disturbing it."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from opacus import PrivacyEngine
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from leak_audit import LeakageAudit, read_audit_log
from leak_audit.gate.policy import GatePolicy, MetricRule
from leak_audit.results.records import CANARY_RECORD, LOWER_BOUND
from leak_audit.capture.privacy import DPState, epsilon_for, find_accountant, find_dp_optimizer, privacy_report
from tests.conftest import small_bert
from tests.test_callback import Recorder, fit, loader

QUERY0 = "model.bert.encoder.layer.0.attention.self.query.weight"


class DPClassifier(L.LightningModule):
    """A small BERT trained with Opacus DP-SGD, hooks mode (``wrap_model=False``), as the example does."""

    def __init__(self, tokenizer, data, sigma=0.5, clip=1.0, accountant="prv", noise_seed=0, expose_engine=True):
        super().__init__()
        self.model = small_bert(dropout=0.0)
        self.tokenizer = tokenizer
        self.data = data
        self.sigma, self.clip, self.accountant_kind, self.noise_seed = sigma, clip, accountant, noise_seed
        self.expose_engine = expose_engine
        self.engine: PrivacyEngine | None = None

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        b, n = ids.shape  # Opacus needs per-sample position/token-type ids (HF broadcasts them otherwise)
        return self.model(
            input_ids=ids, attention_mask=batch["attention_mask"], token_type_ids=torch.zeros_like(ids),
            position_ids=torch.arange(n).expand(b, n), labels=batch["labels"],
        ).loss

    def configure_optimizers(self):
        self.model.train()
        engine = PrivacyEngine(accountant=self.accountant_kind)
        _, opt, _ = engine.make_private(
            module=self.model, optimizer=torch.optim.SGD(self.model.parameters(), lr=0.05), data_loader=self.data,
            noise_multiplier=self.sigma, max_grad_norm=self.clip, poisson_sampling=False, wrap_model=False,
            noise_generator=torch.Generator().manual_seed(self.noise_seed),
        )
        self.engine = engine
        if self.expose_engine:
            self.privacy_engine = engine
        return opt


class GradProbe(L.Callback):
    """The tapped gradient before DP (``on_before_optimizer_step``) and ``p.grad`` after the step."""

    def __init__(self):
        self.pre, self.post = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append(pl_module.model.bert.encoder.layer[0].attention.self.query.weight.grad.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.post.append(pl_module.model.bert.encoder.layer[0].attention.self.query.weight.grad.clone())


def dp_fit(tokenizer, tmp_path, callbacks, max_steps=3, **kwargs):
    L.seed_everything(0, verbose=False)
    data = loader(tokenizer, n=32, batch_size=4)
    module = DPClassifier(tokenizer, data, **kwargs)
    trainer = fit(module, tmp_path, callbacks, max_steps=max_steps, train_dataloaders=data, log_every_n_steps=1,
                  loggers=[CSVLogger(tmp_path, name="csv")])
    return module, trainer


def test_the_audited_gradient_is_the_released_one(tokenizer, tmp_path):
    recorder = Recorder({QUERY0}, set())
    probe = GradProbe()
    audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", attacks=[recorder, "span_check"],
                         every_n_steps=1, log_dir=tmp_path / "audit", max_pending=8)
    dp_fit(tokenizer, tmp_path, [audit, probe], max_steps=3)

    assert len(recorder.seen) == 3
    for (grads, _, _), pre, post in zip(recorder.seen, probe.pre, probe.post, strict=True):
        torch.testing.assert_close(grads[QUERY0], post, rtol=0, atol=0)  # bitwise the released gradient
        # and not the non-private one: noise std sigma*C/B = 0.125 per coordinate dwarfs the signal
        assert (grads[QUERY0] - pre).std() > 0.1
        assert pre.norm() < 0.01 * grads[QUERY0].norm()
    records = read_audit_log(audit.log_path)
    assert {r.attack for r in records} == {"recorder", "span_check"}
    assert not any(LOWER_BOUND in r.info for r in records)  # sigma 0.5: a low reading is a measurement there
    privacy = records[0].privacy
    assert privacy is not None
    assert privacy["noise_multiplier"] == 0.5 and privacy["max_grad_norm"] == 1.0
    assert privacy["noise_std"] == pytest.approx(0.5 * 1.0 / 4)
    assert privacy["accountant"] == "prv"


def _history_and_eps(tokenizer, tmp_path, callbacks):
    module, _ = dp_fit(tokenizer, tmp_path, callbacks, max_steps=4)
    assert module.engine is not None
    return list(module.engine.accountant.history), module.engine.get_epsilon(1e-5)


def test_epsilon_is_unchanged_by_the_callback_and_grows_with_steps(tokenizer, tmp_path):
    audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", attacks=["span_check"],
                         every_n_steps=1, log_dir=tmp_path / "audit", max_pending=8, delta=1e-5)
    with_cb = _history_and_eps(tokenizer, tmp_path / "a", [audit])
    without = _history_and_eps(tokenizer, tmp_path / "b", [])
    assert with_cb == without
    assert with_cb[0] == [(0.5, 0.125, 4)]

    records = [r for r in read_audit_log(audit.log_path) if r.attack == "span_check"]
    assert [r.step for r in records] == [0, 1, 2, 3]
    eps = [r.privacy["epsilon"] for r in records]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False)), eps
    assert eps[-1] == pytest.approx(with_cb[1], rel=1e-9)


def test_logged_epsilon_equals_the_accountant_at_that_step(tokenizer, tmp_path):
    audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", attacks=["span_check"],
                         every_n_steps=2, log_dir=tmp_path / "audit", max_pending=8, delta=1e-4)
    _, trainer = dp_fit(tokenizer, tmp_path, [audit], max_steps=4, accountant="rdp")
    with open(Path(trainer.loggers[0].log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("privacy/epsilon")]
    assert [int(r["step"]) for r in rows] == [0, 2]
    for r in rows:
        step = int(r["step"])
        acc = RDPAccountant()
        acc.history = [(0.5, 0.125, step + 1)]  # the audited step's own noise is already released
        assert float(r["privacy/epsilon"]) == pytest.approx(acc.get_epsilon(1e-4), rel=1e-6)
        assert float(r["privacy/delta"]) == 1e-4
        assert float(r["privacy/noise_multiplier"]) == 0.5
        assert float(r["privacy/max_grad_norm"]) == 1.0
        assert float(r["privacy/sample_rate"]) == 0.125
        assert float(r["privacy/steps"]) == step + 1
    assert all(r.privacy["accountant"] == "rdp" for r in read_audit_log(audit.log_path))


def test_accountant_found_inside_the_optimizer_hook_and_default_delta(tokenizer, tmp_path):
    """No privacy_engine attribute: the accountant is read from the DPOptimizer's step hook; δ = 1/N."""
    audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", attacks=["span_check"],
                         every_n_steps=1, log_dir=tmp_path / "audit")
    module, _ = dp_fit(tokenizer, tmp_path, [audit], max_steps=1, expose_engine=False)
    (record,) = read_audit_log(audit.log_path)
    assert record.privacy["accountant"] == "prv"
    assert record.privacy["delta"] == 1 / 32
    assert record.privacy["epsilon"] == pytest.approx(module.engine.get_epsilon(1 / 32), rel=1e-9)


def test_small_noise_warns_of_missing_gradient_matching_and_a_lower_bound(tokenizer, tmp_path):
    audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", attacks=["span_check"],
                         every_n_steps=1, log_dir=tmp_path / "audit")
    with pytest.warns(UserWarning) as seen:
        dp_fit(tokenizer, tmp_path, [audit], max_steps=1, sigma=0.001)
    messages = [str(w.message) for w in seen]
    assert any(re.search(r"noise multiplier 0.001 < 0.01.*'gradient_matching'", m) for m in messages)
    assert any(re.search(r"noise multiplier 0.001 < 0.1: .*lower bound", m) for m in messages)
    (record,) = read_audit_log(audit.log_path)
    # PRV is not run at this sigma: RDP stands in, and says so
    assert record.privacy["epsilon_accountant"] == "rdp" and record.privacy["epsilon"] > 100
    # the record says its text metrics are lower bounds, and the release gate does not pass on them
    assert record.status == "ok" and record.metrics["rouge1"] < 0.5, record.metrics
    assert record.info[LOWER_BOUND].startswith("DP-SGD below noise multiplier 0.1: the released gradient"), record.info
    (result,) = GatePolicy((MetricRule(metric="rouge1", max=0.5),)).evaluate([record]).results
    assert result.status == "fail" and result.value is None, result
    assert "lower bounds only, never evidence of a pass: span_check" in result.message


def test_recompute_eval_is_refused_under_dp(tokenizer, tmp_path):
    audit = LeakageAudit(recompute="eval", attacks=["span_check"], every_n_steps=1, log_dir=tmp_path / "audit")
    with pytest.raises(ValueError, match="recompute='observed'"):
        dp_fit(tokenizer, tmp_path, [audit], max_steps=1)


def test_non_dp_runs_have_no_privacy_fields(tokenizer, tmp_path):
    from tests.test_callback import Classifier

    audit = LeakageAudit(attacks=["span_check"], every_n_steps=1, log_dir=tmp_path / "audit")
    fit(Classifier(tokenizer), tmp_path, [audit], max_steps=2)
    assert audit._dp is None
    assert all(r.privacy is None for r in read_audit_log(audit.log_path))
    assert '"privacy"' not in audit.log_path.read_text()


def test_canaries_log_the_empirical_epsilon_next_to_the_accountants_and_leave_it_unchanged(tokenizer, tmp_path):
    audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", attacks=["span_check"],
                         every_n_steps=2, log_dir=tmp_path / "audit", max_pending=8, delta=1e-5, canaries=500)
    with_canaries = _history_and_eps(tokenizer, tmp_path / "a", [audit])
    without = _history_and_eps(tokenizer, tmp_path / "b", [])
    assert with_canaries == without  # the accountant never sees the canaries
    records = [r for r in read_audit_log(audit.log_path) if r.status == "ok"]
    assert [(r.step, r.attack) for r in records] == [(0, "span_check"), (2, "span_check"), (4, CANARY_RECORD)]
    closing = records[-1]  # over every step, written after the audits: what the gate's DP-fault check reads
    assert closing.metrics == {} and closing.info["private_steps"] == 4
    assert closing.privacy["epsilon"] == pytest.approx(with_canaries[1])  # the accountant's after the last step
    for r in records:
        p = r.privacy
        assert p["canaries"] == 500 and 4.5 < p["epsilon_empirical_ceiling"] < 5.5
        assert 0.0 <= p["epsilon_empirical"] <= p["epsilon_empirical_ceiling"] and p["epsilon_empirical_gdp"] >= 0.0
    (metrics,) = (tmp_path / "a").glob("csv/version_*/metrics.csv")
    with open(metrics) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("privacy/epsilon_empirical")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]  # every audit, and the end of training
    assert all(float(r["privacy/canaries"]) == 500 for r in rows)
    assert audit._canary_state is not None and audit._canary_state["steps"] == 4  # kept for a resumed run


def test_canaries_resume_from_a_checkpoint(tokenizer, tmp_path):
    def audit():
        return LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", attacks=["span_check"],
                            every_n_steps=2, log_dir=tmp_path / "audit", max_pending=8, delta=1e-5, canaries=300)

    first = audit()
    _, trainer = dp_fit(tokenizer, tmp_path, [first], max_steps=3)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    state = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if "LeakageAudit" in k)
    assert state["canaries"]["steps"] == 3
    resumed = audit()
    L.seed_everything(0, verbose=False)
    data = loader(tokenizer, n=32, batch_size=4)
    trainer = L.Trainer(max_steps=5, callbacks=[resumed], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        default_root_dir=tmp_path)
    trainer.fit(DPClassifier(tokenizer, data), data, ckpt_path=ckpt)
    assert resumed._canary_state["steps"] == 5  # the scores went on from step 3, not from zero
    assert torch.equal(resumed._canary_state["included"], state["canaries"]["included"])


def test_canaries_need_dp_sgd_and_say_why(tokenizer, tmp_path):
    from leak_audit import CanaryError
    from tests.test_callback import Classifier

    audit = LeakageAudit(attacks=["span_check"], every_n_steps=1, log_dir=tmp_path / "audit", canaries=10)
    with pytest.raises(CanaryError, match=r"canaries=10\) audits DP-SGD, but this run has no Opacus DPOptimizer"):
        fit(Classifier(tokenizer), tmp_path, [audit], max_steps=1)
    with pytest.raises(ValueError, match="canaries must be an int >= 0"):
        LeakageAudit(canaries=-1)


# ------------------------------------------------------------------------------ accounting edge cases


@pytest.mark.parametrize("cls", [PRVAccountant, RDPAccountant, GaussianAccountant])
def test_epsilon_of_an_empty_history_is_zero(cls):
    assert epsilon_for(cls(), 1e-5) == (0.0, None)


def test_epsilon_edge_cases():
    acc = RDPAccountant()
    acc.history = [(0.0, 0.1, 10)]
    assert epsilon_for(acc, 1e-5) == (math.inf, None)
    state = DPState(0.0, 1.0, 8, 0.0, "rdp", ((0.0, 0.1, 10),), 0.1)
    report = state.report(1e-5)
    assert report.epsilon == math.inf
    assert report.to_dict()["epsilon"] is None and "noise multiplier 0" in report.to_dict()["error"]

    class Broken(RDPAccountant):
        def get_epsilon(self, delta, **kwargs):
            raise RuntimeError("numerical trouble")

    broken = Broken()
    broken.history = [(1.0, 0.1, 10)]
    eps, error = epsilon_for(broken, 1e-5)
    assert math.isnan(eps) and error == "RuntimeError: numerical trouble"
    with pytest.raises(ValueError, match="delta must be in \\(0, 1\\), got 0"):
        epsilon_for(acc, 0)
    with pytest.raises(ValueError, match="delta must be in \\(0, 1\\) or None, got 2"):
        LeakageAudit(delta=2)


def test_finders_without_dp():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert find_dp_optimizer([opt]) is None
    engine = PrivacyEngine(accountant="gdp")
    model = torch.nn.Linear(2, 2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 2)), batch_size=2)
    _, dp, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   data_loader=data, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    assert find_dp_optimizer([opt, dp]) is dp
    assert find_accountant(dp, None, engine) == (engine.accountant, 0.25)
    report = privacy_report(dp, engine.accountant, 1e-5, 0.25)
    assert (report.epsilon, report.steps, report.accountant) == (0.0, 0, "gdp")  # GDP before the first step


def test_rdp_stands_in_when_the_accountant_cannot_answer():
    # GDP's root finder fails on this short history (a real Opacus failure, not a mock)
    history = ((0.01, 0.01, 3),)
    report = DPState(0.01, 1.0, 8, 0.00125, "gdp", history, 0.01).report(1e-5)
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert report.epsilon == pytest.approx(rdp.get_epsilon(1e-5))
    assert report.accountant == "gdp" and report.epsilon_accountant == "rdp"
    assert report.error.startswith("gdp failed (ValueError") and "upper bound" in report.error
    assert report.to_dict()["epsilon_accountant"] == "rdp"


def test_prv_is_not_run_at_small_sigma():
    # PRV at sigma 0.01 takes minutes and ~18 GB (PRV_MIN_NOISE_MULTIPLIER); this must return at once
    history = ((0.01, 0.001, 10),)
    report = DPState(0.01, 1.0, 8, 0.00125, "prv", history, 0.001).report(1e-5)
    assert report.epsilon_accountant == "rdp" and "prv skipped (sigma below" in report.error
    assert math.isfinite(report.epsilon) and report.epsilon > 1e4
    ok = DPState(1.0, 1.0, 8, 0.125, "prv", ((1.0, 0.01, 10),), 0.01).report(1e-5)
    assert (ok.epsilon_accountant, ok.error) == ("prv", None) and 0 < ok.epsilon < 1
