"""Finished audits on the Trainer's thread: the audit log, counters, worst values, every logger and W&B.

:class:`AuditReporter` is what :class:`~leak_audit.callback.LeakageAudit` hands finished audits to. It
owns the order in which a result reaches its sinks, which keeps the audit log durable first:

1. :meth:`~AuditReporter.persist` (the worker, as soon as an audit finishes): stamp the rank and, on rank
   zero, append to ``audit.jsonl`` (:class:`~leak_audit.results.sinks.AuditLog`, fsynced) before training
   even hears of it. :meth:`~AuditReporter.emit` does the same for audits recorded on the Trainer's thread
   (skipped, or failed before they started).
2. :meth:`~AuditReporter.collect` (the Trainer's thread): count failed and timed-out attacks, keep the
   worst value of every ``leak/*`` key, ask the ``judge`` (the policy while training,
   :class:`~leak_audit.gate.breach.BreachMonitor`) for a verdict, and send the scalars to every Lightning
   logger and the :class:`~leak_audit.results.wandb_dashboard.WandbDashboard`.

Under DDP with ``scope="local"`` every rank attacks its own gradient; the results are buffered and
:meth:`~AuditReporter.exchange` brings them to rank zero at steps every rank reaches (a collective,
:func:`~leak_audit.capture.distributed.gather_to_all`), where the other ranks' records are written to the
log and every audited step is reported once, over all ranks.

A sink that fails (a W&B error) is a warning, never an exception into training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from leak_audit.capture.distributed import gather_to_all
from leak_audit.results.records import LOWER_BOUND, AuditRecord
from leak_audit.results.sinks import AuditLog, flatten_metrics, log_to_loggers, note_earlier_runs, wandb_loggers
from leak_audit.results.wandb_dashboard import WandbDashboard

__all__ = ["AuditReporter", "Judgement"]


@dataclass(frozen=True)
class Judgement:
    """A policy's verdict on the run so far, as the reporter logs it.

    Attributes:
        verdict: ``"pass"``, ``"warn"`` or ``"fail"``.
        code: the verdict as logged under ``gate/verdict`` (0 pass, 1 warn, 2 fail).
        rules: each rule's name and status (``"pass"``, ``"warn"``, ``"fail"``, ``"lower bounds only"`` or
            ``"no data"``).
        breaches: each breached rule's name and verdict sentence.
    """

    verdict: str
    code: int
    rules: dict[str, str] = field(default_factory=dict)
    breaches: dict[str, str] = field(default_factory=dict)


Judge = Callable[[Sequence[AuditRecord], int], Judgement | None]
"""``judge(records, step)``: the verdict after one more finished audit, or ``None`` (nothing to judge)."""


class AuditReporter:
    """Counters, worst values and sinks of finished audits (one per :class:`~leak_audit.callback.LeakageAudit`).

    Args:
        modality: ``"text"`` or ``"image"`` (the W&B dashboard's charts and sample panels).
        log_samples: whether the dashboard may show reconstructions (the user's opt-in).
        log_dir: where image sample files are read from.
        wandb_alert: send a W&B alert per breached rule.

    Attributes:
        failed: audits with at least one failed attack.
        timeouts: attacks stopped by their time budget.
        worst: the largest value so far of every ``leak/*`` key (e.g. ``leak/max/rouge1``).
        skipped_elsewhere: other ranks' skipped audits (``scope="local"`` under DDP), by rank.
    """

    def __init__(self, modality: str = "text", *, log_samples: bool = False, log_dir: str | Path = ".",
                 wandb_alert: bool = False) -> None:
        self.modality = modality
        self.log_samples = log_samples
        self.log_dir = Path(log_dir)
        self.wandb_alert = wandb_alert
        self.failed = 0
        self.timeouts = 0
        self.worst: dict[str, float] = {}
        self.skipped_elsewhere: dict[int, int] = {}
        self.judge: Judge | None = None
        self.log: AuditLog | None = None  # rank zero only
        self.rank, self.world, self.scope = 0, 1, "global"
        self._buffer: list[list[AuditRecord]] = []  # results waiting for an exchange between ranks
        self._dashboards: list[WandbDashboard] | None = None
        self._warned: set[str] = set()

    def open(self, log: AuditLog | None, *, modality: str, rank: int, world: int, scope: str) -> None:
        """Start a run: the audit log (rank zero, else ``None``) and where this process sits."""
        self.log, self.modality, self.rank, self.world, self.scope = log, modality, rank, world, scope

    def start_run(self, run: str) -> None:
        """Name the records this run writes ``run`` (rank zero, before the first write and before a worker process
        forks), and warn when the log already holds records of other runs
        (:func:`~leak_audit.results.sinks.note_earlier_runs`)."""
        if self.log is not None:
            self.log.run = run
            note_earlier_runs(self.log.path, run)

    def close(self) -> None:
        """Close the audit log (everything written is already on disk)."""
        if self.log is not None:
            self.log.close()
            self.log = None

    @property
    def exchanging(self) -> bool:
        """Whether finished audits travel between ranks: ``scope="local"`` with several processes."""
        return self.scope == "local" and self.world > 1

    def warn_once(self, key: str, message: str) -> None:
        """``rank_zero_warn(message)`` the first time ``key`` is seen."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # ------------------------------------------------------------------ into the log
    def persist(self, records: list[AuditRecord]) -> list[AuditRecord]:
        """Stamp the rank and, on rank zero, append to the audit log now (called from the worker)."""
        self._stamp(records)
        if self.log is not None:
            self.log.write(records)
        return records

    def emit(self, trainer: Any, records: list[AuditRecord], *, skipped: int) -> None:
        """Records made on the Trainer's thread (skipped or failed audits): into the log now on rank zero,
        reported now, or into the next exchange between ranks."""
        self.persist(records)
        if self.exchanging:
            self._buffer.append(records)
        else:
            self.report(trainer, [records], log=True, skipped=skipped)

    def _stamp(self, records: Sequence[AuditRecord]) -> None:
        if self.world > 1:
            for r in records:
                r.info.setdefault("process_rank", self.rank)
                r.info.setdefault("scope", self.scope)

    # ------------------------------------------------------------------ to the sinks
    def collect(self, trainer: Any, results: Sequence[list[AuditRecord]], *, log: bool, skipped: int) -> None:
        """Results the worker finished (already in the log on rank zero): reported now, or buffered for the
        next exchange between ranks."""
        if self.exchanging:
            self._buffer.extend(results)
        else:
            self.report(trainer, results, log=log, skipped=skipped)

    def exchange(self, trainer: Any, *, log: bool, collective: bool, skipped: int) -> None:
        """Every rank's buffered results to rank zero, which writes the other ranks' records to the log and
        reports every audited step once, over all ranks.

        ``collective``: every rank calls this at the same point (a collective). Without it (after an
        exception) rank zero reports only its own results.
        """
        mine, self._buffer = self._buffer, []
        parts = gather_to_all((skipped, mine)) if collective else [(skipped, mine)]
        if not trainer.is_global_zero:
            return
        by_step: dict[int, list[AuditRecord]] = {}
        for rank, (their_skipped, results) in enumerate(parts):
            if rank != self.rank:
                self.skipped_elsewhere[rank] = int(their_skipped)
            for records in results:
                if rank != self.rank and self.log is not None:
                    self.log.write(records)
                if records:
                    by_step.setdefault(records[0].step, []).extend(records)
        self.report(trainer, [by_step[s] for s in sorted(by_step)], log=log, skipped=skipped)

    def report(self, trainer: Any, results: Sequence[list[AuditRecord]], *, log: bool, skipped: int) -> None:
        """Counters, worst values, the judge, loggers and W&B for finished audits (already in the log).

        Args:
            trainer: the Lightning ``Trainer`` (its ``loggers``).
            results: one list of records per audit.
            log: send to the loggers and W&B (``False`` after an exception: counters only).
            skipped: this rank's skipped audits, logged as ``audit/skipped`` with the other ranks'.
        """
        for records in results:
            if not records:
                continue
            self._count(records)
            metrics = flatten_metrics(records)
            for key, value in metrics.items():
                if key.startswith("leak/"):
                    self.worst[key] = max(self.worst.get(key, float("-inf")), value)
            metrics["audit/skipped"] = float(skipped + sum(self.skipped_elsewhere.values()))
            step = records[0].step
            judgement = self.judge(records, step) if self.judge is not None else None
            if judgement is not None:
                metrics["gate/verdict"] = float(judgement.code)
            if log:
                log_to_loggers(trainer.loggers, metrics, step=step)
                self._dashboard(trainer, records, step, judgement)

    def _count(self, records: Sequence[AuditRecord]) -> None:
        failed = [r for r in records if r.status == "failed"]
        if failed:
            self.warn_once("failed", f"LeakageAudit: attack {failed[0].attack!r} failed at step {failed[0].step}: "
                           f"{failed[0].error}")
        self.failed += bool(failed)
        timeout = [r for r in records if r.status == "timeout"]
        if timeout:
            self.warn_once(
                "timeout", f"LeakageAudit: attack {timeout[0].attack!r} ran out of time at step {timeout[0].step} "
                f"({timeout[0].error}); a timed-out attack is missing evidence, not a low value: raise "
                "max_seconds or audit less often"
            )
        self.timeouts += len(timeout)
        bound = [r for r in records if r.status == "ok" and r.info.get(LOWER_BOUND)]
        if bound:
            self.warn_once(
                "lower_bound", f"LeakageAudit: {bound[0].attack!r} at step {bound[0].step}: {bound[0].info[LOWER_BOUND]}; "
                "the gate counts such readings toward a breach, never toward a pass"
            )

    def _dashboard(self, trainer: Any, records: Sequence[AuditRecord], step: int, judgement: Judgement | None) -> None:
        try:
            if self._dashboards is None:  # one per WandbLogger, made at the first finished audit
                self._dashboards = [
                    WandbDashboard(lg.experiment, self.modality, log_samples=self.log_samples, log_dir=self.log_dir,
                                   alert=self.wandb_alert)
                    for lg in wandb_loggers(trainer.loggers)
                ]
            for dashboard in self._dashboards:
                dashboard.update(records, step)
                if judgement is not None:
                    dashboard.verdict(judgement.verdict, judgement.rules, judgement.breaches, step)
        except Exception as exc:  # noqa: BLE001 - a dashboard error must not stop training
            self.warn_once("wandb", f"LeakageAudit: the W&B dashboard failed at step {step}: {exc!r}")
