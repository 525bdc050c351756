"""LeakageAudit inside real Lightning Trainer runs (a small random-init BERT, real tokenizer)."""

from __future__ import annotations

import copy
import csv
import time
from collections.abc import Collection
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from leak_audit import LeakageAudit, ModuleSelectionError, TextBatch, read_audit_log
from leak_audit.attacks import Attack, AttackInput, Reconstruction, Requirements
from leak_audit.callback import DEFAULT_ATTACKS
from leak_audit.demos.datasets import synthetic_pii_dataset
from leak_audit.models import TextModelSpec
from tests.conftest import small_bert

QUERY0 = "model.bert.encoder.layer.0.attention.self.query.weight"


class Classifier(L.LightningModule):
    def __init__(self, tokenizer, dropout: float = 0.1, train_mode: bool = True, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = small_bert(dropout=dropout)
        self.model.train(train_mode)
        self.tokenizer = tokenizer
        self.lr = lr

    def training_step(self, batch, batch_idx):
        if not isinstance(batch, dict):  # tuple batches, for the batch-adapter test
            ids, mask, labels = batch
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(tokenizer, n=32, batch_size=2, as_tuple=False):
    rows = synthetic_pii_dataset(n, seed=1)

    def collate(items):
        enc = tokenizer([s for s, _ in items], padding=True, truncation=True, max_length=12, return_tensors="pt")
        labels = torch.tensor([y for _, y in items])
        if as_tuple:
            return enc["input_ids"], enc["attention_mask"], labels
        return {**enc, "labels": labels}

    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate)


def fit(module, tmp_path: Path, callbacks=(), max_steps=6, loggers=False, train_dataloaders=None, **trainer_kwargs):
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders or loader(module.tokenizer))
    return trainer


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_audits_are_recorded_and_logged(tokenizer, tmp_path, worker):
    audit = LeakageAudit(every_n_steps=2, log_dir=tmp_path / "audit", max_pending=8, worker=worker)
    logger = CSVLogger(tmp_path, name="csv")
    fit(Classifier(tokenizer), tmp_path, [audit], max_steps=5, loggers=[logger], log_every_n_steps=1)

    records = read_audit_log(audit.log_path)
    assert sorted({r.step for r in records}) == [0, 2, 4]
    assert {(r.attack, r.status) for r in records} == {
        ("token_bag", "ok"), ("span_check", "ok"), ("span_attention", "ok"), ("labels", "ok"),
        ("span_cluster", "skipped"),  # span_attention certified the whole batch: nothing left for it
        ("position_match", "skipped"),  # B > 1: a position row sums the batch's sentences
    }
    bag = [r for r in records if r.attack == "token_bag"]
    assert all(r.metrics == {"token_precision": 1.0, "token_recall": 1.0} for r in bag)
    assert all(r.samples is None for r in records)  # private text stays out
    assert '"samples"' not in audit.log_path.read_text()

    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("leak/max/token_recall")]
    assert sorted(int(r["step"]) for r in logged) == [0, 2, 4]
    assert all(float(r["leak/max/token_recall"]) == 1.0 for r in logged)
    assert any(r.get("leak/span_check/position_recall") for r in rows)
    # every audit names the one reconstruction an attacker would keep, from its gradient residual alone
    for step in (0, 2, 4):
        mine = [r for r in records if r.step == step]
        picked = [r for r in mine if r.info.get("attacker_pick")]
        assert len(picked) == 1 and picked[0].info["gradient_residual"] == min(
            r.info["gradient_residual"] for r in mine if "gradient_residual" in r.info)
    assert sorted(int(r["step"]) for r in rows if r.get("leak/pick/rouge1")) == [0, 2, 4]


def _train_weights(tokenizer, tmp_path, callbacks):
    L.seed_everything(123, verbose=False)
    module = Classifier(tokenizer, dropout=0.1)
    fit(module, tmp_path, callbacks, max_steps=6)
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_final_weights_are_bitwise_identical_with_and_without_the_audit(tokenizer, tmp_path, worker):
    """Dropout on, an audit every step: the callback must not touch training's RNG or tensors (with the process
    worker too: the fork and the shared-memory copies of each snapshot must not change training)."""
    without = _train_weights(tokenizer, tmp_path / "a", [])
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path / "audit", max_pending=8, worker=worker)
    with_audit = _train_weights(tokenizer, tmp_path / "b", [audit])
    assert len(read_audit_log(audit.log_path)) == 6 * len(DEFAULT_ATTACKS)
    assert without.keys() == with_audit.keys()
    assert all(torch.equal(without[k], with_audit[k]) for k in without)


class Exploding(Attack):
    name = "exploding"

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        return Requirements(gradients=frozenset({QUERY0}))

    def run(self, inp: AttackInput) -> Reconstruction:
        raise RuntimeError("deliberate failure inside the attack")


def test_a_failing_attack_is_recorded_and_training_finishes(tokenizer, tmp_path):
    audit = LeakageAudit(
        attacks=["token_bag", Exploding()], every_n_steps=2, log_dir=tmp_path / "audit", max_pending=8
    )
    with pytest.warns(UserWarning, match="deliberate failure"):
        trainer = fit(Classifier(tokenizer), tmp_path, [audit], max_steps=4)
    assert trainer.global_step == 4
    records = read_audit_log(audit.log_path)
    failed = [r for r in records if r.attack == "exploding"]
    assert [r.status for r in failed] == ["failed", "failed"]
    assert failed[0].error == "RuntimeError: deliberate failure inside the attack"
    assert all(r.status == "ok" for r in records if r.attack == "token_bag")
    assert audit.failed == 2


class Recorder(Attack):
    """Keeps what it was given, to check the capture."""

    name = "recorder"

    def __init__(self, grads: Collection[str], params: Collection[str]) -> None:
        self.grads, self.params, self.seen = frozenset(grads), frozenset(params), []

    def requirements(self, spec, tapped):
        return Requirements(gradients=self.grads, params=self.params)

    def run(self, inp):
        self.seen.append(({k: v.clone() for k, v in inp.gradients.items()}, dict(inp.params), inp.batch_size))
        return Reconstruction(self.name)


def test_capture_is_the_applied_gradient_after_accumulation_and_clipping(tokenizer, tmp_path):
    L.seed_everything(0, verbose=False)
    module = Classifier(tokenizer, train_mode=False)  # dropout off: gradients are reproducible
    initial = copy.deepcopy(module.model)
    cls = "model.classifier.weight"
    recorder = Recorder({QUERY0, cls}, {QUERY0})
    audit = LeakageAudit(
        modules=["bert.encoder.layer.0.attention.self.query", "classifier"], attacks=[recorder],
        every_n_steps=3, log_dir=tmp_path / "audit",
    )
    fit(module, tmp_path, [audit], max_steps=2, accumulate_grad_batches=2, gradient_clip_val=0.05)

    grads, params, batch_size = recorder.seen[0]
    assert batch_size == 4  # both micro-batches of the accumulation window
    # Expected: the mean of the two micro-batch losses' gradients, clipped by total norm, at the initial weights.
    micro = list(loader(tokenizer))[:2]
    initial.zero_grad()
    for b in micro:
        (initial(**b).loss / 2).backward()
    torch.nn.utils.clip_grad_norm_(initial.parameters(), 0.05)
    expected = dict(initial.named_parameters())
    torch.testing.assert_close(grads[QUERY0], expected["bert.encoder.layer.0.attention.self.query.weight"].grad)
    torch.testing.assert_close(grads[cls], expected["classifier.weight"].grad)
    # parameters are the values the gradient was computed at, not the updated ones
    assert torch.equal(params[QUERY0], expected["bert.encoder.layer.0.attention.self.query.weight"].detach())
    assert not torch.equal(params[QUERY0], module.model.bert.encoder.layer[0].attention.self.query.weight)


def test_unknown_module_fails_at_setup_with_suggestions(tokenizer, tmp_path):
    audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.qurey", log_dir=tmp_path)
    with pytest.raises(ModuleSelectionError, match=r"Closest module names: model\.bert\.encoder\.layer\.0\.attention\.self\.query"):
        fit(Classifier(tokenizer), tmp_path, [audit], max_steps=1)


def test_view_with_no_usable_attack_fails_at_setup(tokenizer, tmp_path):
    audit = LeakageAudit(modules="bert.encoder.layer.1.output.dense", attacks=["token_bag"], log_dir=tmp_path)
    with pytest.raises(ValueError, match="no attack can use the tapped modules.*word embeddings"):
        fit(Classifier(tokenizer), tmp_path, [audit], max_steps=1)


def test_custom_batch_adapter_reads_tuple_batches(tokenizer, tmp_path):
    def adapter(batch):
        ids, mask, labels = batch
        return TextBatch(input_ids=ids, attention_mask=mask, labels=labels)

    audit = LeakageAudit(batch_adapter=adapter, every_n_steps=2, log_dir=tmp_path / "a", max_pending=8)
    module = Classifier(tokenizer)
    fit(module, tmp_path, [audit], max_steps=3, train_dataloaders=loader(tokenizer, as_tuple=True))
    skipping = {"span_cluster", "position_match"}  # nothing left after span_attention; B > 1
    assert {r.status for r in read_audit_log(audit.log_path) if r.attack not in skipping} == {"ok"}

    # without the adapter the audit fails with a clear message, and training goes on
    audit2 = LeakageAudit(every_n_steps=2, log_dir=tmp_path / "b")
    with pytest.warns(UserWarning, match="Pass LeakageAudit\\(batch_adapter=fn\\)"):
        trainer = fit(Classifier(tokenizer), tmp_path, [audit2], max_steps=3, train_dataloaders=loader(tokenizer, as_tuple=True))
    assert trainer.global_step == 3
    assert {r.status for r in read_audit_log(audit2.log_path)} == {"failed"}


class Slow(Attack):
    """Sleeps 2 s per audit and notes when it ran (monotonic clock)."""

    name = "slow"

    def __init__(self) -> None:
        self.ran: list[tuple[float, float]] = []

    def requirements(self, spec, tapped):
        return Requirements(gradients=frozenset({QUERY0}))

    def run(self, inp):
        start = time.monotonic()
        time.sleep(2.0)  # long enough to stay busy across steps even on a loaded machine
        self.ran.append((start, time.monotonic()))
        return Reconstruction(self.name)


class StepEnds(L.Callback):
    """Notes when each step ended, and makes each step last at least 50 ms: six bare steps of the tiny classifier
    take ~80 ms, less than the worker may take to start its first audit (seen once: 66 ms after the first step)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        time.sleep(0.05)
        self.ends.append(time.monotonic())


def test_busy_worker_skips_audits_instead_of_queueing(tokenizer, tmp_path):
    slow = Slow()
    audit = LeakageAudit(attacks=[slow], every_n_steps=1, log_dir=tmp_path / "a")
    steps = StepEnds()  # listed after the audit: its end hook runs after the audit's dispatch
    fit(Classifier(tokenizer), tmp_path, [audit, steps], max_steps=6)
    # training went on while the attacks slept: steps ended inside an attack's run (a step that waited for its
    # audit would end only after the attack did), however slow the machine
    assert len(steps.ends) == 6 and slow.ran
    during = [t for t in steps.ends if any(start < t < end for start, end in slow.ran)]
    assert len(during) >= 2, (steps.ends, slow.ran)
    records = read_audit_log(audit.log_path)
    assert audit.skipped > 0
    assert sum(r.status == "skipped" for r in records) == audit.skipped
    assert all("busy" in (r.error or "") for r in records if r.status == "skipped")
    assert audit.state_dict()["skipped"] == audit.skipped


def test_recompute_eval_attacks_the_dropout_free_gradient(tokenizer, tmp_path):
    """Training in train mode (dropout on); recompute='eval' gives the worst-case exact span check."""
    audit = LeakageAudit(
        modules="bert.encoder.layer.0.attention.self.query", attacks=["span_check"], recompute="eval",
        every_n_steps=2, log_dir=tmp_path / "a", max_pending=8,
    )
    fit(Classifier(tokenizer, dropout=0.1), tmp_path, [audit], max_steps=3, train_dataloaders=loader(tokenizer, batch_size=1))
    records = read_audit_log(audit.log_path)
    assert [r.status for r in records] == ["ok", "ok"]
    assert all(r.metrics["exact_match"] == 1.0 and r.info["dropout_mode"] == 0 for r in records)


def test_wandb_offline_run_holds_the_logged_keys(tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="leak-audit-test", save_dir=str(tmp_path), offline=True)
    audit = LeakageAudit(every_n_steps=2, log_dir=tmp_path / "a", log_samples=True, max_pending=8,
                         policy={"rule": [{"metric": "token_recall", "max": 1.0}]})
    fit(Classifier(tokenizer), tmp_path, [audit], max_steps=3, loggers=[logger])
    import wandb

    wandb.finish()
    runs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    for key in (b"leak/max/token_recall", b"leak/span_check/rouge1", b"samples/text", b"audit/seconds",
                b"charts/rouge1_per_attack", b"charts/token_recall_per_attack", b"gate/verdict",
                b"leak/worst/token_recall", b"trainer/global_step"):
        assert key in data, key
    records = read_audit_log(audit.log_path)
    assert all(r.samples for r in records if r.attack == "span_check")


class _TouchFrozen(L.Callback):
    """Changes a frozen weight in place after the fork (a version bump), as a user's schedule might."""

    def __init__(self, name):
        self.name, self.ptrs = name, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        p = pl_module.get_parameter(self.name)
        if trainer.global_step == 1:
            with torch.no_grad():
                p.mul_(1.0001)
        self.ptrs.append(p.data_ptr())


def test_process_worker_sends_a_copy_of_a_frozen_weight_changed_after_the_fork(tokenizer, tmp_path):
    """A frozen weight changed after the fork is sent again; the queue moves what it sends into shared memory,
    so it must send a copy, never the live weight (whose storage would be swapped under training)."""
    name = "model.bert.embeddings.word_embeddings.weight"
    module = Classifier(tokenizer)
    module.get_parameter(name).requires_grad_(False)
    touch = _TouchFrozen(name)
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path / "audit", max_pending=8, worker="process",
                         attacks=("span_check",), modules="bert.encoder.layer.0")
    fit(module, tmp_path, [touch, audit], max_steps=4)
    weight = module.get_parameter(name)
    assert not weight.is_shared() and len(set(touch.ptrs)) == 1 and weight.data_ptr() == touch.ptrs[0]
    records = read_audit_log(audit.log_path)
    assert [r.status for r in records] == ["ok"] * 4
    assert {r.run for r in records} == {audit.run_id}  # the forked child writes under the run's name
