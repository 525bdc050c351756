"""The leakage policy: rules a run's audit log must satisfy, and their evaluation (the release gate).

A policy is a list of rules. Each rule bounds one metric, either a record metric (``rouge1``,
``token_recall``, ``psnr``, ... see :data:`KNOWN_METRICS`) or ``epsilon``, the DP-SGD ε the record's
``privacy`` field reports. A rule has a hard limit, ``max`` (fail when the value is above it) or ``min``
(fail when below), an optional ``warn`` level on the same side, an aggregation over the audited steps,
and an optional scope (attacks, module patterns, a step range). Written as TOML::

    [[rule]]
    metric = "rouge1"
    max = 0.5                  # fail above 0.5
    warn = 0.3                 # warn above 0.3 (warn <= max; for a min rule warn >= min)
    aggregation = "max"        # max | min | last | mean_last_k (default: max for a max rule, min for a min rule)
    # k = 3                    # mean_last_k only: the number of last audited steps to average (default 5)
    # attacks = ["span_check"]                  # only these attacks' records (default: all)
    # modules = ["*.attention.self.query"]      # fnmatch patterns against each record's modules (default: all)
    # step_min = 100                            # inclusive step range, either end optional
    # step_max = 1000
    # name = "rouge1 (query layers)"            # label in reports (default: the metric plus the scope)

    [[rule]]
    metric = "epsilon"
    max = 8.0

Evaluation of one rule (:meth:`GatePolicy.evaluate`): take the records with ``status == "ok"`` in the
rule's scope that report the metric (for ``epsilon``: a numeric ``privacy["epsilon"]``). Group them by
run and step and keep, per step, the worst value in the rule's direction (the largest for a max rule, the smallest
for a min rule) across attacks, modules and ranks. Then aggregate over steps: ``max``/``min`` of the
per-step values, ``last`` the value at the largest step, ``mean_last_k`` the mean of the last ``k`` steps'
values (all of them when fewer). Records of several training runs (their ``run`` field: fits appended to one log)
are kept apart: ``max``/``min`` range over every run's steps, and ``last``/``mean_last_k`` aggregate each run on
its own and take the worst run, so a later, cleaner run never hides an earlier breach. The rule fails when the
aggregate is beyond its limit, warns when it is only beyond ``warn``, and fails when no record in scope reports
the metric: a gate must not pass on missing evidence.

An attack stopped by its time budget (``status == "timeout"``) is missing evidence, never a measured low
value: it does not count, and the rule's message says how many timed-out attacks in scope were left out.
One exception makes a breach certain: a timed-out attack's partial value (``info["partial_<metric>"]``) is
a lower bound on what it would have found, so a ``max`` rule aggregated by ``max`` fails when a partial
value is already beyond the limit. A successful record marked ``info["lower_bound"]`` (an attack run where it is
measured to read far less than published attacks, :mod:`leak_audit.attacks.gaps`) counts the same way: its
value never makes a rule pass, and it fails a ``max`` rule aggregated by ``max`` when it is already beyond the
limit. The gate's verdict is ``fail`` if any rule fails, else ``warn`` if any warns, else
``pass``; only ``fail`` fails the gate (:attr:`GateReport.exit_code` 1).

Every metric grows with leakage, so the usual rule is a ``max``; a ``min`` rule bounds from below, e.g. a
canary that an attack known to work on the run still recovers the labels (``label_accuracy``).

This module is one contract and stays one module (about 700 lines): the TOML format, its validation
messages, the evaluation and the report documents (JSON, JUnit) change together. The console rendering is
:mod:`leak_audit.gate.render`, the ``--max`` form :mod:`leak_audit.gate.thresholds`.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from leak_audit.metrics.names import RECORD_METRICS
from leak_audit.results.records import LOWER_BOUND, AuditRecord

__all__ = [
    "AGGREGATIONS",
    "DP_FAULT_NAME",
    "KNOWN_METRICS",
    "GateError",
    "GatePolicy",
    "GateReport",
    "MetricRule",
    "PolicyError",
    "RuleResult",
    "VERDICTS",
    "VERDICT_WORDS",
]

KNOWN_METRICS: tuple[str, ...] = RECORD_METRICS
"""Text metrics and the image ones that grow with leakage (``psnr`` in dB, ``ssim``); LPIPS is a distance
and is never a record metric (:data:`leak_audit.metrics.names.RECORD_METRICS`)."""

PRIVACY_METRICS: tuple[str, ...] = ("epsilon", "epsilon_empirical", "epsilon_empirical_gdp", "epsilon_excess")
"""Metrics read from a record's ``privacy`` field rather than its ``metrics``: the accountant's ε, the canaries'
empirical lower bound on it and its GDP-model estimate (:mod:`leak_audit.metrics.epsilon`), and
``epsilon_excess = epsilon_empirical − epsilon``, which is above 0 only when DP-SGD leaks more than its
accountant says (checked on every gate with canaries: :data:`DP_FAULT_NAME`)."""

DP_FAULT_NAME = "DP fault: empirical epsilon > accountant's"

RULE_METRICS: tuple[str, ...] = KNOWN_METRICS + PRIVACY_METRICS
"""Every metric a rule may bound."""

AGGREGATIONS: tuple[str, ...] = ("max", "min", "last", "mean_last_k")

VERDICTS: tuple[str, ...] = ("pass", "warn", "fail")
"""A rule's status and a report's verdict, from best to worst (``gate/verdict`` logs the index). Not to be
confused with a record's status (:data:`leak_audit.results.records.STATUSES`)."""

VERDICT_WORDS: dict[str, str] = {"pass": "PASS", "warn": "WARN", "fail": "BREACH"}
"""How a verdict is shown to people (``leak-audit gate``'s last line, the report's banner)."""

_RULE_KEYS = ("metric", "max", "min", "warn", "aggregation", "k", "attacks", "modules", "step_min", "step_max", "name")
_TOP_KEYS = ("rule",)


class GateError(ValueError):
    """Bad gate input: an unknown metric, a malformed threshold or policy, or no successful record."""


class PolicyError(GateError):
    """A malformed policy; the message names the bad key or value and what is valid."""


def _hint(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.4)
    return f" Did you mean {', '.join(close)}?" if close else ""


def check_metric(name: object) -> None:
    """Raise :class:`PolicyError` unless ``name`` is a metric a rule may bound (with the closest names)."""
    if not isinstance(name, str):
        raise PolicyError(f"metric must be a string, got {name!r}. Known metrics: {', '.join(RULE_METRICS)}")
    if name not in RULE_METRICS:
        raise PolicyError(f"unknown metric {name!r}.{_hint(name, RULE_METRICS)} Known metrics: {', '.join(RULE_METRICS)}")


def _g(x: float) -> str:
    """A threshold as written: ``0.5``, ``8``, or the full repr when ``:g`` would round it."""
    s = f"{x:g}"
    return s if float(s) == x else repr(float(x))


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fmt(v: float, *refs: float | None) -> str:
    """``v`` with 4 significant digits, or more when 4 would hide how it compares with one of ``refs``."""
    for digits in range(4, 18):
        s = f"{v:.{digits}g}"
        r = float(s)
        if all(ref is None or (r > ref) == (v > ref) and (r < ref) == (v < ref) for ref in refs):
            return s
    return repr(v)


@dataclass(frozen=True)
class MetricRule:
    """One bound on one metric (see the module docstring).

    After construction ``aggregation`` is never ``None`` (``"max"`` for a max rule, ``"min"`` for a min
    rule), ``attacks``/``modules`` are tuples and ``name`` is set (default: the metric plus its scope).

    Raises:
        PolicyError: unknown metric or aggregation (with the closest names), both or neither of
            ``max``/``min``, a non-finite or non-numeric limit, ``warn`` on the wrong side, ``k < 1``, a bad
            step range, or a malformed scope.
    """

    metric: str
    max: float | None = None
    min: float | None = None
    warn: float | None = None
    aggregation: str | None = None
    k: int = 5
    attacks: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    steps: tuple[int | None, int | None] = (None, None)
    name: str = ""

    def __post_init__(self) -> None:
        check_metric(self.metric)
        m = self.metric
        if (self.max is None) == (self.min is None):
            both = "both" if self.max is not None else "neither"
            raise PolicyError(f"rule for {m!r}: give exactly one of max (fail above) or min (fail below), got {both}")
        for key in ("max", "min", "warn"):
            v = getattr(self, key)
            if v is not None and (not _is_number(v) or not math.isfinite(v)):
                raise PolicyError(f"rule for {m!r}: {key} must be a finite number, got {v!r}")
        if self.warn is not None:
            if self.max is not None and self.warn > self.max:
                raise PolicyError(f"rule for {m!r}: warn {_g(self.warn)} must be <= max {_g(self.max)} (warn before failing)")
            if self.min is not None and self.warn < self.min:
                raise PolicyError(f"rule for {m!r}: warn {_g(self.warn)} must be >= min {_g(self.min)} (warn before failing)")
        agg = self.aggregation if self.aggregation is not None else self.direction
        if not isinstance(agg, str) or agg not in AGGREGATIONS:
            hint = _hint(agg, AGGREGATIONS) if isinstance(agg, str) else ""
            raise PolicyError(f"rule for {m!r}: unknown aggregation {agg!r}.{hint} Valid: {', '.join(AGGREGATIONS)}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise PolicyError(f"rule for {m!r}: k must be an integer >= 1, got {self.k!r}")
        attacks = _str_tuple(self.attacks, "attacks", m)
        modules = _str_tuple(self.modules, "modules", m)
        if not isinstance(self.steps, tuple | list) or len(self.steps) != 2:
            raise PolicyError(f"rule for {m!r}: steps must be a (step_min, step_max) pair, got {self.steps!r}")
        lo, hi = self.steps
        for key, v in (("step_min", lo), ("step_max", hi)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise PolicyError(f"rule for {m!r}: {key} must be an integer >= 0 or absent, got {v!r}")
        if lo is not None and hi is not None and lo > hi:
            raise PolicyError(f"rule for {m!r}: empty step range: step_min {lo} > step_max {hi}")
        if not isinstance(self.name, str):
            raise PolicyError(f"rule for {m!r}: name must be a string, got {self.name!r}")
        object.__setattr__(self, "aggregation", agg)
        object.__setattr__(self, "attacks", attacks)
        object.__setattr__(self, "modules", modules)
        object.__setattr__(self, "steps", (lo, hi))
        scope = _scope_text(attacks, modules, lo, hi)
        object.__setattr__(self, "name", self.name or (f"{m}[{scope}]" if scope else m))

    @property
    def direction(self) -> str:
        """``"max"`` (fail above :attr:`threshold`) or ``"min"`` (fail below)."""
        return "max" if self.max is not None else "min"

    @property
    def threshold(self) -> float:
        """The hard limit: ``max`` or ``min``."""
        return float(self.max if self.max is not None else self.min)  # type: ignore[arg-type]

    @property
    def threshold_text(self) -> str:
        """The limit as written, never rounded: ``"max 0.5"``, ``"min 20"``."""
        return f"{self.direction} {_g(self.threshold)}"

    @property
    def warn_text(self) -> str:
        """The warn level as written (``"0.3"``), or ``"-"`` without one."""
        return "-" if self.warn is None else _g(self.warn)

    @property
    def limit_text(self) -> str:
        """:attr:`threshold_text` and the warn level: ``"max 0.5, warn 0.3"``."""
        return self.threshold_text + (f", warn {self.warn_text}" if self.warn is not None else "")

    @property
    def aggregation_text(self) -> str:
        """``"max"``, ``"last"``, ..., or ``"mean_last_k (k=3)"``."""
        return f"mean_last_k (k={self.k})" if self.aggregation == "mean_last_k" else self.aggregation

    def in_scope(self, record: AuditRecord) -> bool:
        """Whether ``record`` is in the rule's scope (attack, module patterns, step range); status aside."""
        if self.attacks and record.attack not in self.attacks:
            return False
        if self.modules and not any(fnmatch.fnmatchcase(mod, pat) for pat in self.modules for mod in record.modules):
            return False
        lo, hi = self.steps
        return (lo is None or record.step >= lo) and (hi is None or record.step <= hi)

    def value_of(self, record: AuditRecord) -> float | None:
        """The rule's metric in ``record``, or ``None`` when the record does not report a number for it."""
        if self.metric == "epsilon_excess":
            p = record.privacy if isinstance(record.privacy, dict) else {}
            low, eps = p.get("epsilon_empirical"), p.get("epsilon")
            v = low - eps if _is_number(low) and _is_number(eps) else None
        elif self.metric in PRIVACY_METRICS:
            v = record.privacy.get(self.metric) if isinstance(record.privacy, dict) else None
        else:
            v = record.metrics.get(self.metric)
        if not _is_number(v) or math.isnan(v):
            return None
        return float(v)

    def scope_dict(self) -> dict[str, Any]:
        """The rule's scope as the JSON report writes it: ``attacks``, ``modules``, ``step_min``, ``step_max``."""
        return {
            "attacks": list(self.attacks),
            "modules": list(self.modules),
            "step_min": self.steps[0],
            "step_max": self.steps[1],
        }

    def evaluate(self, records: Sequence[AuditRecord]) -> RuleResult:
        """The rule's :class:`RuleResult` on ``records`` (any status; only ``ok`` ones count)."""
        sign = 1.0 if self.direction == "max" else -1.0  # worse means larger * sign
        per_step: dict[tuple[str, int], tuple[float, AuditRecord]] = {}  # (run, step): runs of one log share steps
        n = 0
        for r in records:
            if r.status != "ok" or not self.in_scope(r):
                continue
            v = self.value_of(r)
            if v is None or r.info.get(LOWER_BOUND):  # a lower bound is never evidence of a pass
                continue
            n += 1
            best = per_step.get((r.run, r.step))
            if best is None or sign * v > sign * best[0]:  # ties keep the first record
                per_step[(r.run, r.step)] = (v, r)
        partial = self._partial_breach(records)
        bounds = len(self._lower_bounds(records))
        if not per_step:
            if partial is not None:
                return replace(partial, lower_bounds=bounds)
            return RuleResult(self, "fail", None, self._missing_message(records), "", 0, bounds)
        runs = list(dict.fromkeys(run for run, _ in per_step))  # in log order
        several = len(runs) > 1
        where = ""
        if self.aggregation in ("max", "min"):
            pick = max if self.aggregation == "max" else min
            ordered = sorted(per_step, key=lambda k: (runs.index(k[0]), k[1]))  # by run (log order), then step
            key = pick(ordered, key=lambda k: per_step[k][0])  # the first (earliest) on ties
            value, rec = per_step[key]
            where = f"{rec.attack}@step {rec.step}" + (f" of run {rec.run or 'unnamed'}" if several else "")
            label = "worst" if self.aggregation == self.direction else "at"  # a max rule aggregated by min
            how = f"{self.aggregation} over {_n(len(per_step), 'audit')}; {label} {where}"
        else:  # per run, then the run that is worst in the rule's direction (fail-closed)
            per_run = []
            for run in runs:
                steps = sorted(s for r, s in per_step if r == run)
                last = steps[-1:] if self.aggregation == "last" else steps[-self.k :]
                v = math.fsum(per_step[(run, s)][0] for s in last) / len(last)
                if self.aggregation == "last":
                    how = f"last of {_n(len(steps), 'audit')}, step {last[0]}"
                else:
                    span = f"step {last[0]}" if len(last) == 1 else f"steps {last[0]}-{last[-1]}"
                    how = f"mean of the last {len(last)} of {_n(len(steps), 'audit')}, {span}"
                per_run.append((v, how, run))
            value, how, run = max(per_run, key=lambda t: sign * t[0])  # the first run on ties
            if several:
                how = f"worst of {len(runs)} runs: run {run or 'unnamed'}, {how}"
        status = self._status(value)
        shown = _fmt(value, self.threshold, self.warn)
        text = f"{self.metric} = {shown} ({how})"
        op = ">" if self.direction == "max" else "<"
        if status == "fail":
            text += f" {op} {self.direction} {_g(self.threshold)}"
        elif status == "warn":
            text += f" {op} warn {_g(self.warn)} (limit: {self.direction} {_g(self.threshold)})"
        else:
            text += f" {'<=' if self.direction == 'max' else '>='} {self.direction} {_g(self.threshold)}"
        if status != "fail" and partial is not None:
            return replace(partial, lower_bounds=bounds)
        timeouts = sum(r.status == "timeout" and self.in_scope(r) for r in records)
        if timeouts:
            text += f"; {_n(timeouts, 'timed-out attack')} not counted (missing evidence)"
        if bounds:
            text += f"; {_n(bounds, 'lower-bound reading')} not counted (attacks run where they read less than published ones)"
        return RuleResult(self, status, value, text, where, n, bounds)

    def _lower_bounds(self, records: Sequence[AuditRecord]) -> list[tuple[float, AuditRecord]]:
        """``(value, record)`` of the ``ok`` records in scope that report the metric as a lower bound
        (``info["lower_bound"]``, :data:`~leak_audit.results.records.LOWER_BOUND`)."""
        out = []
        for r in records:
            if r.status == "ok" and r.info.get(LOWER_BOUND) and self.in_scope(r):
                v = self.value_of(r)
                if v is not None:
                    out.append((v, r))
        return out

    def _partial_breach(self, records: Sequence[AuditRecord]) -> RuleResult | None:
        """A fail from lower bounds, where they prove one: timed-out attacks' partial values and the values of
        records marked ``info["lower_bound"]`` are lower bounds on what could be found, so for a ``max`` rule
        aggregated by ``max`` one beyond the limit is a breach. Otherwise they are missing evidence."""
        if self.direction != "max" or self.aggregation != "max" or self.metric in PRIVACY_METRICS:
            return None
        worst: tuple[float, AuditRecord] | None = None
        for r in records:
            v = r.info.get(f"partial_{self.metric}") if r.status == "timeout" and self.in_scope(r) else None
            if _is_number(v) and not math.isnan(v) and (worst is None or v > worst[0]):
                worst = (float(v), r)
        for v, r in self._lower_bounds(records):
            if worst is None or v > worst[0]:
                worst = (v, r)
        if worst is None or not worst[0] > self.threshold:
            return None
        value, rec = worst
        where = f"{rec.attack}@step {rec.step}"
        why = "which timed out" if rec.status == "timeout" else "run where it reads less than published attacks"
        kind = "partial result" if rec.status == "timeout" else "result"
        text = (f"{self.metric} >= {_fmt(value, self.threshold, self.warn)} ({kind} of {where}, {why}: a lower "
                f"bound) > {self.direction} {_g(self.threshold)}")
        return RuleResult(self, "fail", value, text, where, 1)

    def _status(self, value: float) -> str:
        if self.direction == "max":
            beyond = value > self.threshold
            warned = self.warn is not None and value > self.warn
        else:
            beyond = value < self.threshold
            warned = self.warn is not None and value < self.warn
        return "fail" if beyond else "warn" if warned else "pass"

    def _missing_message(self, records: Sequence[AuditRecord]) -> str:
        scope = _scope_text(self.attacks, self.modules, *self.steps)
        scope = f" in scope ({scope})" if scope else ""
        text = f"{self.metric}: no successful audit{scope} reports it; a gate must not pass on missing evidence"
        ok = [r for r in records if r.status == "ok"]
        timeouts = sorted({r.attack for r in records if r.status == "timeout" and self.in_scope(r)})
        if timeouts:
            text += f" (timed out, which is not a measurement: {', '.join(timeouts)})"
        bounds = sorted({r.attack for _, r in self._lower_bounds(records)})
        if bounds:
            text += f" (lower bounds only, never evidence of a pass: {', '.join(bounds)})"
        if self.metric in PRIVACY_METRICS:
            nulls = [r for r in ok if self.in_scope(r) and isinstance(r.privacy, dict)]
            if nulls:
                why = next((r.privacy.get("error") for r in nulls if r.privacy.get("error")), None)
                text += f" ({len(nulls)} in scope have privacy.{self.metric} null{': ' + why if why else ''})"
            elif not any(isinstance(r.privacy, dict) for r in ok):
                text += " (no record has a privacy field: was the run trained with DP-SGD?)"
        elif self.attacks:
            seen = sorted({r.attack for r in ok})
            text += f" (attacks with successful audits: {', '.join(seen)})"
        return text


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _str_tuple(value: object, key: str, metric: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, tuple | list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"rule for {metric!r}: {key} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _scope_text(attacks: tuple[str, ...], modules: tuple[str, ...], lo: int | None, hi: int | None) -> str:
    parts = []
    if attacks:
        parts.append("attack=" + ",".join(attacks))
    if modules:
        parts.append("module=" + ",".join(modules))
    if lo is not None or hi is not None:
        parts.append(f"step={'' if lo is None else lo}..{'' if hi is None else hi}")
    return "; ".join(parts)


@dataclass(frozen=True)
class RuleResult:
    """The outcome of one rule.

    Attributes:
        rule: the rule.
        status: ``"pass"``, ``"warn"`` or ``"fail"``.
        value: the aggregated value; ``None`` when no ok record in scope reports the metric (then ``fail``).
        message: a sentence, e.g. ``"rouge1 = 0.812 (max over 12 audits; worst span_check@step 150) > max 0.5"``.
        where: ``"<attack>@step <n>"`` of the worst record for the ``max``/``min`` aggregations, else ``""``.
        records: ok records in scope that report the metric.
        lower_bounds: ok records in scope whose value is a lower bound (``info["lower_bound"]``), left out of
            ``value``; with ``value`` ``None`` they are the rule's only evidence, and it fails on missing evidence.
    """

    rule: MetricRule
    status: str
    value: float | None
    message: str
    where: str = ""
    records: int = 0
    lower_bounds: int = 0

    @property
    def only_lower_bounds(self) -> bool:
        """No value, and lower bounds in scope: more audits of the same setting cannot make this rule pass."""
        return self.value is None and self.lower_bounds > 0

    @property
    def value_text(self) -> str:
        """``value`` as the message shows it (4 significant digits, more when needed to show how it compares
        with the limit and warn level), ``"lower bounds"`` when those are the rule's only evidence, or
        ``"missing"``."""
        if self.value is None:
            return "lower bounds" if self.only_lower_bounds else "missing"
        return _fmt(self.value, self.rule.threshold, self.rule.warn)

    def to_dict(self) -> dict[str, Any]:
        """The result as one entry of the JSON report's ``results``."""
        r = self.rule
        return {
            "name": r.name,
            "metric": r.metric,
            "direction": r.direction,
            "threshold": r.threshold,
            "warn": r.warn,
            "aggregation": r.aggregation,
            "k": r.k if r.aggregation == "mean_last_k" else None,
            "value": self.value,
            "status": self.status,
            "message": self.message,
            "where": self.where,
            "records": self.records,
            "lower_bounds": self.lower_bounds,
            "scope": r.scope_dict(),
        }


@dataclass(frozen=True)
class GateReport:
    """The results of every rule of a policy, in the policy's order."""

    results: tuple[RuleResult, ...]

    @property
    def verdict(self) -> str:
        """``"fail"`` if any rule fails, else ``"warn"`` if any warns, else ``"pass"``."""
        statuses = {r.status for r in self.results}
        return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"

    @property
    def passed(self) -> bool:
        """The gate passes unless a rule fails (a warning does not fail it)."""
        return self.verdict != "fail"

    @property
    def exit_code(self) -> int:
        """0 on pass or warn, 1 on fail (the ``leak-audit gate`` exit code)."""
        return 0 if self.passed else 1

    def breaches(self) -> list[RuleResult]:
        """The failing results (a metric beyond its limit, or reported by no record in scope)."""
        return [r for r in self.results if r.status == "fail"]

    def measured(self) -> GateReport:
        """The results with a value, and those whose only evidence is lower bounds (a fail that more audits of
        the same setting cannot turn into a pass): what a run in progress is judged on (no evidence yet is no
        verdict yet)."""
        return GateReport(tuple(r for r in self.results if r.value is not None or r.only_lower_bounds))

    def to_dict(self) -> dict[str, Any]:
        """``{"verdict", "exit_code", "results"}``: the JSON report (:meth:`to_json`) before serialisation."""
        return {"verdict": self.verdict, "exit_code": self.exit_code, "results": [r.to_dict() for r in self.results]}

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON (an infinite value is written as the string ``"inf"``)."""
        return json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False)

    def to_junit(self) -> str:
        """A JUnit XML document: one ``<testcase>`` per rule; a failing rule carries ``<failure>``, a warning
        rule passes with ``<system-out>WARN: ...</system-out>``."""
        fails = str(len(self.breaches()))
        counts = {"tests": str(len(self.results)), "failures": fails, "errors": "0", "skipped": "0", "time": "0"}
        root = ET.Element("testsuites", {"name": "leak-audit", **counts})
        suite = ET.SubElement(root, "testsuite", {"name": "leak-audit gate", **counts})
        for res in self.results:
            case = ET.SubElement(suite, "testcase", {"classname": "leak_audit.gate.thresholds", "name": res.rule.name, "time": "0"})
            if res.status == "fail":
                failure = ET.SubElement(case, "failure", {"message": res.message, "type": "LeakageThresholdExceeded"})
                failure.text = _junit_details(res)
            elif res.status == "warn":
                ET.SubElement(case, "system-out").text = f"WARN: {res.message}"
        ET.indent(root)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _junit_details(res: RuleResult) -> str:
    r = res.rule
    lines = [res.message, f"rule: {r.metric} {r.direction} {_g(r.threshold)}, aggregation {r.aggregation_text}"]
    if r.warn is not None:
        lines[-1] += f", warn {_g(r.warn)}"
    scope = r.scope_dict()
    if any(scope["attacks"] or scope["modules"]) or r.steps != (None, None):
        lines.append(f"scope: {json.dumps(scope)}")
    lines.append(f"records: {res.records}")
    return "\n".join(lines)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


@dataclass(frozen=True)
class GatePolicy:
    """An ordered, non-empty list of :class:`MetricRule`."""

    rules: tuple[MetricRule, ...]

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        if not rules:
            raise PolicyError("the policy has no rules (add at least one [[rule]] with a metric and a max or min)")
        bad = [r for r in rules if not isinstance(r, MetricRule)]
        if bad:
            raise PolicyError(f"policy rules must be MetricRule objects, got {bad[0]!r}")
        seen: set[str] = set()
        for r in rules:  # names key the reports, warnings, W&B summaries and alerts
            if r.name in seen:
                raise PolicyError(f"two rules are named {r.name!r}: give each a distinct name (name = \"...\")")
            seen.add(r.name)
        object.__setattr__(self, "rules", rules)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> GatePolicy:
        """Read a policy file (see the module docstring for the format).

        Raises:
            PolicyError: the file is missing or unreadable, not valid TOML, or not a valid policy; the
                message starts with the file name.
        """
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise PolicyError(f"policy file not found: {path}") from None
        except OSError as exc:
            raise PolicyError(f"cannot read policy {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: TOML syntax error: {exc}") from None
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{path}: not UTF-8 text: {exc}") from None
        try:
            return cls.from_mapping(data)
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc}") from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GatePolicy:
        """A policy from the parsed TOML: ``{"rule": [{"metric": ..., "max": ..., ...}, ...]}``.

        Raises:
            PolicyError: an unknown key (with the closest valid ones), a value of the wrong type, or an
                invalid rule; the message names the rule by number (1-based) and metric.
        """
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy must be a mapping with a 'rule' list, got {type(data).__name__}")
        for key in data:
            if key not in _TOP_KEYS:
                raise PolicyError(f"unknown top-level key {key!r}.{_hint(str(key), _TOP_KEYS)} A policy is a list of [[rule]] tables")
        rules_data = data.get("rule", [])
        if isinstance(rules_data, Mapping):
            raise PolicyError("'rule' must be an array of tables: write [[rule]], not [rule]")
        if not isinstance(rules_data, list | tuple):
            raise PolicyError(f"'rule' must be an array of tables ([[rule]]), got {type(rules_data).__name__}")
        rules = []
        for i, item in enumerate(rules_data, start=1):
            if not isinstance(item, Mapping):
                raise PolicyError(f"rule {i}: expected a table, got {type(item).__name__}")
            label = f"rule {i}" + (f" ({item['metric']})" if isinstance(item.get("metric"), str) else "")
            for key in item:
                if key not in _RULE_KEYS:
                    raise PolicyError(
                        f"{label}: unknown key {key!r}.{_hint(str(key), _RULE_KEYS)} Valid keys: {', '.join(_RULE_KEYS)}"
                    )
            if "metric" not in item:
                raise PolicyError(f"{label}: missing key 'metric' (one of {', '.join(RULE_METRICS)})")
            aggregation = item.get("aggregation")
            if "k" in item and aggregation != "mean_last_k":
                raise PolicyError(f"{label}: k applies only to aggregation = \"mean_last_k\" (got aggregation {aggregation!r})")
            try:
                rules.append(
                    MetricRule(
                        metric=item["metric"],
                        max=item.get("max"),
                        min=item.get("min"),
                        warn=item.get("warn"),
                        aggregation=aggregation,
                        k=item.get("k", 5),
                        attacks=item.get("attacks", ()),
                        modules=item.get("modules", ()),
                        steps=(item.get("step_min"), item.get("step_max")),
                        name=item.get("name", ""),
                    )
                )
            except PolicyError as exc:
                raise PolicyError(f"{label}: {exc}") from None
        return cls(tuple(rules))

    @classmethod
    def from_thresholds(cls, thresholds: Mapping[str, float]) -> GatePolicy:
        """The ``--max METRIC=VALUE`` shorthand: one max rule, aggregated by ``max``, per metric."""
        if not thresholds:
            raise PolicyError("no thresholds given (e.g. --max rouge1=0.5)")
        return cls(tuple(MetricRule(metric=m, max=v, aggregation="max") for m, v in thresholds.items()))

    @classmethod
    def coerce(cls, value: GatePolicy | str | os.PathLike[str] | Mapping[str, Any] | None) -> GatePolicy | None:
        """A policy from what a user configures (a ``LeakageAudit`` argument, a LightningCLI value):
        ``None`` and policies as they are, a path through :meth:`from_toml`, a mapping through
        :meth:`from_mapping`.

        Raises:
            PolicyError: an invalid policy file or mapping.
            TypeError: any other type.
        """
        if value is None or isinstance(value, GatePolicy):
            return value
        if isinstance(value, str | os.PathLike):
            return cls.from_toml(value)
        if isinstance(value, Mapping):
            return cls.from_mapping(value)
        raise TypeError(f"a gate policy must be a GatePolicy, a path to a TOML file or a mapping, got {type(value).__name__}")

    def evaluate(self, records: Sequence[AuditRecord]) -> GateReport:
        """Evaluate every rule on ``records`` (see the module docstring).

        Raises:
            GateError: no record has ``status == "ok"`` (the log is empty, or every audit failed or was
                skipped): there is nothing to judge.
        """
        if not any(r.status == "ok" for r in records):
            statuses = sorted({r.status for r in records}) or ["none"]
            raise GateError(f"the audit log has no successful audit (record statuses: {', '.join(statuses)})")
        rules = list(self.rules)
        canaries = any(r.status == "ok" and isinstance(r.privacy, dict) and _is_number(r.privacy.get("epsilon_empirical"))
                       for r in records)
        if canaries and not any(rule.metric == "epsilon_excess" for rule in rules):
            # always checked with canaries; on the last audit, which holds the most evidence: one 95% test, not the
            # max over many correlated ones (whose false-alarm rate would grow with the number of audits)
            rules.append(MetricRule("epsilon_excess", max=0.0, aggregation="last", name=DP_FAULT_NAME))
        return GateReport(tuple(rule.evaluate(records) for rule in rules))
