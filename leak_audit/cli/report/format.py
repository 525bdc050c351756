"""Escaping, labels and number formats shared by the report's sections and plots."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from leak_audit.results.records import AuditRecord

__all__ = [
    "HEADLINE_METRICS",
    "METRIC_LABELS",
    "METRIC_ORDER",
    "duration_text",
    "escape",
    "finite_epsilon",
    "format_metric",
    "format_number",
    "metric_label",
    "module_set",
    "ordered_metrics",
    "parse_time",
    "shorten",
    "sort_records",
]


HEADLINE_METRICS: tuple[str, ...] = ("rouge1", "token_recall", "exact_match", "psnr", "ssim")
"""The metrics plotted when present: text (ROUGE-1, token recall, exact sequences), then images (PSNR, SSIM)."""


METRIC_ORDER: tuple[str, ...] = (
    "rouge1", "rouge2", "rougeL", "token_precision", "token_recall", "exact_match", "position_recall",
    "psnr", "ssim", "label_accuracy",
)
"""The order of metric columns and worst-value rows; metrics not listed come after, sorted."""


METRIC_LABELS: dict[str, str] = {
    "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "token_precision": "token precision",
    "token_recall": "token recall", "exact_match": "exact match", "position_recall": "position recall",
    "psnr": "PSNR (dB)", "ssim": "SSIM", "label_accuracy": "label accuracy",
}
"""Column headers and plot titles of the metrics."""


def escape(value: Any) -> str:
    """``html.escape(str(value))``, quotes included: every string from the log goes through here."""
    return html.escape(str(value), quote=True)


def metric_label(metric: str) -> str:
    """The human name of a metric (``"ROUGE-1"``, ``"PSNR (dB)"``), or the metric itself."""
    return METRIC_LABELS.get(metric, metric)


def format_metric(metric: str, value: float | None) -> str:
    """A metric value as shown: PSNR with 2 decimals, known metrics with 3, others with 4 significant digits; ``"–"`` for ``None``."""
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if metric == "psnr":
        return f"{value:.2f}"
    return f"{value:.3f}" if metric in METRIC_ORDER else f"{value:.4g}"


def format_number(value: Any) -> str:
    """A privacy field as shown: integers as they are, floats with 4 significant digits, ``"–"`` for ``None``."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def module_set(record: AuditRecord) -> str:
    """The record's tapped modules joined with ", " (``""``, the whole model, reads "(whole model)")."""
    return ", ".join(m if m else "(whole model)" for m in record.modules) or "(whole model)"


def shorten(text: str, n: int = 48) -> str:
    """``text`` cut to ``n`` characters from the left (``"…"`` and its end), for legends."""
    return text if len(text) <= n else "…" + text[-(n - 1):]


def ordered_metrics(names: Iterable[str]) -> list[str]:
    """The metric names in report order (:data:`METRIC_ORDER`), unknown ones last, sorted."""
    present = set(names)
    return [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))


def finite_epsilon(record: AuditRecord) -> float | None:
    """``privacy.epsilon`` when it is a finite number, else ``None``."""
    eps = (record.privacy or {}).get("epsilon")
    if isinstance(eps, int | float) and not isinstance(eps, bool) and math.isfinite(eps):
        return float(eps)
    return None


def parse_time(text: str) -> datetime | None:
    """A record's ISO 8601 ``time`` as an aware datetime (UTC when it has no zone), or ``None`` when malformed."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def duration_text(seconds: float) -> str:
    """``"1 h 02 min 03 s"``, ``"2 min 03 s"`` or ``"3 s"``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def sort_records(records: Sequence[AuditRecord], attacks: Sequence[str]) -> list[AuditRecord]:
    """The records by training run (in the order the log first shows them), step, audit, then the position of their
    attack in ``attacks``."""
    order = {a: i for i, a in enumerate(attacks)}
    runs = {run: i for i, run in enumerate(dict.fromkeys(r.run for r in records))}
    return sorted(records, key=lambda r: (runs[r.run], r.step, r.audit, order.get(r.attack, 0)))
