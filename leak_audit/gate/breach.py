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

from dataclasses import dataclass

from leak_audit.gate.policy import GateReport, RuleResult

__all__ = ["BREACH_ACTIONS", "Breach", "LeakageThresholdExceeded", "find_breaches"]

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
    """The rules of ``report`` that fail on a measured value (missing evidence is not a breach here)."""
    return [_breach(r, step) for r in report.measured().breaches()]


def _breach(result: RuleResult, step: int) -> Breach:
    rule = result.rule
    assert result.value is not None
    return Breach(rule.name, rule.metric, float(result.value), rule.threshold, rule.direction, step, result.message)
