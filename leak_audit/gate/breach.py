"""What happens during training when the leakage policy is breached: ``LeakageAudit(on_breach=...)``.

The policy is the release gate's (:class:`~leak_audit.gate.policy.GatePolicy`), evaluated on rank zero over
the run's successful audits after every finished audit. During training a rule *breaches* only when its
metric was measured and crosses the limit: a rule with no evidence yet (the metric not reported so far)
is not a breach, unlike at the release gate, which fails on missing evidence.

Actions, as Lightning's ``EarlyStopping`` does it: the decision is reduced across ranks
(``strategy.reduce_boolean_decision``, any rank) at a point every rank reaches: every step with one
process, the audited steps under DDP.

* ``"warn"``: a warning per breached rule, training goes on.
* ``"stop"``: ``trainer.should_stop = True``; the run ends at the step boundary where the decision is
  taken (the first after the breaching audit finished; audits run in the background, so that is a few
  steps after the breaching step, never before it).
* ``"raise"``: :class:`LeakageThresholdExceeded` from the Trainer's hook, on every rank; the callback's
  ``on_exception`` closes the worker and the audit log keeps every audit written so far.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from leak_audit.gate.policy import VERDICTS, GateError, GatePolicy, GateReport, RuleResult
from leak_audit.results.records import LOWER_BOUND, AuditLogError, AuditRecord, read_audit_log
from leak_audit.results.reporter import Judgement

__all__ = ["BREACH_ACTIONS", "JUDGED_STATUSES", "Breach", "BreachMonitor", "LeakageThresholdExceeded", "find_breaches"]

BREACH_ACTIONS: tuple[str, ...] = ("warn", "stop", "raise")


@dataclass(frozen=True)
class Breach:
    """One rule that failed on a measured value.

    Attributes:
        rule: the rule's name (:attr:`~leak_audit.gate.policy.MetricRule.name`).
        metric: the metric (``rouge1``, ``psnr`` in dB, ``epsilon``, ...).
        value: the aggregated value that crossed the limit.
        threshold: the limit (``max`` or ``min`` of the rule).
        direction: ``"max"`` or ``"min"``.
        step: the latest audited optimizer step in the evaluated records.
        message: the rule's verdict sentence (value, aggregation, where, limit).
    """

    rule: str
    metric: str
    value: float
    threshold: float
    direction: str
    step: int
    message: str

    def to_dict(self) -> dict[str, object]:
        """The breach as a plain dict (for loggers and alerts)."""
        return dict(self.__dict__)


class LeakageThresholdExceeded(RuntimeError):
    """Raised by ``LeakageAudit(on_breach="raise")`` when a policy rule is breached during training.

    Attributes:
        breach: the first breached rule (``None`` on a rank other than zero under DDP, which only learns
            that rank zero found one: ``str(exc)`` then carries rank zero's message).
    """

    def __init__(self, message: str, breach: Breach | None = None) -> None:
        super().__init__(message)
        self.breach = breach
        self.metric = breach.metric if breach else None
        self.value = breach.value if breach else None
        self.threshold = breach.threshold if breach else None


def find_breaches(report: GateReport, step: int) -> list[Breach]:
    """The rules of ``report`` that fail on a measured value (missing evidence is not a breach here, nor is a rule
    whose only evidence is lower bounds below its limit: training is not stopped for what was not measured)."""
    return [_breach(r, step) for r in report.breaches() if r.value is not None]


def _breach(result: RuleResult, step: int) -> Breach:
    rule = result.rule
    assert result.value is not None
    return Breach(rule.name, rule.metric, float(result.value), rule.threshold, rule.direction, step, result.message)


JUDGED_STATUSES: tuple[str, ...] = ("ok", "timeout")
"""Statuses the policy reads while training: measured values, and timed-out attacks (missing evidence, or
a partial value that already proves a breach)."""


class BreachMonitor:
    """The leakage policy while training: judged after every finished audit, acted on at safe points.

    Args:
        policy: the release gate's policy.
        on_breach: ``"warn"``, ``"stop"`` or ``"raise"`` (:data:`BREACH_ACTIONS`).
        warn: ``warn(key, message)``, warning once per key (the reporter's
            :meth:`~leak_audit.results.reporter.AuditReporter.warn_once`).

    Attributes:
        verdict: the latest verdict over measured rules (``"pass"``, ``"warn"``, ``"fail"``), ``None`` before
            the first rule with evidence. A rule whose only evidence is lower bounds counts as ``"fail"`` here, as
            the release gate fails it, but it is no :attr:`breach`: ``on_breach`` does not act on it. Until some rule
            has evidence there is no verdict (``None``): nothing is logged as a pass on nothing.
        breach: the first breached rule of the run, if any.
        history: the run's judged records so far, without samples (:meth:`resume` reads a resumed run's).
    """

    def __init__(self, policy: GatePolicy, on_breach: str, warn: Callable[[str, str], None]) -> None:
        if on_breach not in BREACH_ACTIONS:
            raise ValueError(f"on_breach must be one of {', '.join(map(repr, BREACH_ACTIONS))}, got {on_breach!r}")
        self.policy = policy
        self.on_breach = on_breach
        self.warn = warn
        self.verdict: str | None = None
        self.breach: Breach | None = None
        self.history: list[AuditRecord] = []

    def resume(self, log_path: Path, last_step: int, run: str = "") -> None:
        """Read a resumed run's earlier judged audits (its own records, ``run``, at steps ``<= last_step``) from
        its audit log, so the policy sees the whole run and no other. An unreadable log is a warning: the policy
        then starts afresh."""
        if self.history or not log_path.is_file():
            return
        try:
            records = read_audit_log(log_path)
        except AuditLogError as exc:
            rank_zero_warn(f"LeakageAudit: the policy starts without the earlier audits: {exc}")
            return
        self.history = [_light(r) for r in records
                        if r.status in JUDGED_STATUSES and r.step <= last_step and r.run == run]

    def __call__(self, records: Sequence[AuditRecord], step: int) -> Judgement | None:
        """Judge the run after ``records`` (one audit, at optimizer step ``step``): note the first breach and
        warn once per warned or breached rule. ``None`` when there is nothing to judge yet (no rule has a
        measured value or lower bounds), or the policy cannot be evaluated (a warning: it must not stop training)."""
        self.history.extend(_light(r) for r in records if r.status in JUDGED_STATUSES)
        try:
            report = self.policy.evaluate(self.history)
        except GateError:  # no successful audit yet: nothing to judge
            return None
        except Exception as exc:  # noqa: BLE001 - a policy that cannot be evaluated must not stop training
            self.warn("policy", f"LeakageAudit: the policy could not be evaluated at step {step}: {exc!r}")
            return None
        measured = report.measured()
        if not measured.results:  # no rule has evidence yet: no verdict yet, never a "pass" on nothing
            return None
        self.verdict = measured.verdict
        for result in report.results:
            if result.status == "warn":
                self.warn(f"policy-warn:{result.rule.name}", f"LeakageAudit: leakage warning at step {step}: "
                          f"{result.message}")
        breaches = find_breaches(report, step)
        for breach in breaches:
            if self.breach is None:
                self.breach = breach
            self.warn(f"policy-fail:{breach.rule}", f"LeakageAudit: leakage policy breached at step {step}: "
                      f"{breach.message}" + ("" if self.on_breach == "warn" else f" (on_breach={self.on_breach!r})"))
        return Judgement(
            self.verdict, VERDICTS.index(self.verdict),
            {r.rule.name: _rule_status(r) for r in report.results},
            {b.rule: b.message for b in breaches},
        )

    def decide(self, trainer: Any, *, collective: bool) -> None:
        """Act on a breach (``on_breach`` ``"stop"`` or ``"raise"``), the decision reduced across ranks.

        ``collective``: every rank calls this at the same point (``reduce_boolean_decision`` and
        ``broadcast`` are collectives).

        Raises:
            LeakageThresholdExceeded: ``on_breach="raise"`` and a rank found a breach.
        """
        found = self.breach is not None
        if collective:
            found = bool(trainer.strategy.reduce_boolean_decision(found, all=False))
        if not found:
            return
        message = self.breach.message if self.breach is not None else ""
        if collective:  # the other ranks learn rank zero's message
            message = trainer.strategy.broadcast(message, src=0)
        if self.on_breach == "stop":
            if not trainer.should_stop:
                rank_zero_info(f"LeakageAudit: stopping training at step {trainer.global_step}: {message}")
            trainer.should_stop = True
        elif self.on_breach == "raise":
            step = self.breach.step if self.breach is not None else trainer.global_step
            raise LeakageThresholdExceeded(f"leakage policy breached (audit of step {step}): {message}", self.breach)


def _rule_status(result: RuleResult) -> str:
    """A rule's status as the run logs it: ``pass``, ``warn``, ``fail``, ``"lower bounds only"`` (a fail on
    missing evidence) or ``"no data"`` (no evidence yet)."""
    if result.value is not None:
        return result.status
    return "lower bounds only" if result.only_lower_bounds else "no data"


def _light(record: AuditRecord) -> AuditRecord:
    """What the policy reads of a record (no samples; of ``info`` only partial values and the lower-bound mark), so
    the run's history stays small."""
    return dataclasses.replace(record, samples=None, info={k: v for k, v in record.info.items()
                                                           if k.startswith("partial_") or k == LOWER_BOUND})
