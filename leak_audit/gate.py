"""Release gate: compare the worst leakage in an audit log with thresholds.

Every metric grows with leakage, so a threshold is a maximum: the gate fails when the worst value over
all successful (``status == "ok"``) records, across attacks and steps, exceeds it. A metric that no record
reports is a failure too: a gate must not pass on missing evidence.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from leak_audit.image_metrics import IMAGE_METRICS
from leak_audit.metrics import TEXT_METRICS
from leak_audit.records import AuditRecord

__all__ = ["GateError", "GateRow", "KNOWN_METRICS", "evaluate_gate", "parse_threshold"]

KNOWN_METRICS: tuple[str, ...] = tuple(dict.fromkeys(TEXT_METRICS + tuple(m for m in IMAGE_METRICS if m != "lpips")))
"""Text metrics and the image ones that grow with leakage (``psnr`` in dB, ``ssim``); LPIPS is a distance
and is never a record metric (see :mod:`leak_audit.scoring`)."""


class GateError(ValueError):
    """Bad gate input: an unknown metric, a malformed threshold, or no successful record."""


@dataclass(frozen=True)
class GateRow:
    """The verdict for one metric.

    Attributes:
        metric: metric name.
        worst: largest value over ok records (``None`` if no record reports it).
        threshold: the maximum allowed.
        passed: ``worst`` exists and ``worst <= threshold``.
        where: ``"<attack>@step <n>"`` of the worst record.
    """

    metric: str
    worst: float | None
    threshold: float
    passed: bool
    where: str = ""


def _check_metric(name: str) -> None:
    if name not in KNOWN_METRICS:
        close = difflib.get_close_matches(name, KNOWN_METRICS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise GateError(f"unknown metric {name!r}.{hint} Known metrics: {', '.join(KNOWN_METRICS)}")


def parse_threshold(text: str) -> tuple[str, float]:
    """Parse ``"metric=value"``.

    Raises:
        GateError: not of that form, unknown metric (with the closest names), or value not a number.
    """
    if "=" not in text:
        raise GateError(f"threshold {text!r} is not of the form METRIC=VALUE (e.g. rouge1=0.5)")
    name, _, raw = text.partition("=")
    name = name.strip()
    _check_metric(name)
    try:
        value = float(raw)
    except ValueError:
        raise GateError(f"threshold for {name!r} is not a number: {raw!r}") from None
    return name, value


def evaluate_gate(records: Sequence[AuditRecord], thresholds: Mapping[str, float]) -> list[GateRow]:
    """One :class:`GateRow` per threshold, in the given order.

    Raises:
        GateError: no thresholds, an unknown metric, or no record with ``status == "ok"``.
    """
    if not thresholds:
        raise GateError("no thresholds given (e.g. --max rouge1=0.5)")
    for name in thresholds:
        _check_metric(name)
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        statuses = sorted({r.status for r in records}) or ["none"]
        raise GateError(f"the audit log has no successful audit (record statuses: {', '.join(statuses)})")
    rows = []
    for name, limit in thresholds.items():
        worst: float | None = None
        where = ""
        for r in ok:
            v = r.metrics.get(name)
            if v is not None and (worst is None or v > worst):
                worst, where = float(v), f"{r.attack}@step {r.step}"
        rows.append(GateRow(name, worst, limit, worst is not None and worst <= limit, where))
    return rows
