"""A leakage summary of audit records for the console: the worst value of each metric per attack."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from leak_audit.results.records import STATUSES, AuditRecord

__all__ = ["summary_table"]


def summary_table(records: Sequence[AuditRecord], metrics: Sequence[str], title: str) -> Table:
    """Worst (largest) value of each of ``metrics`` per attack over the ``ok`` records, then the count of
    records per status and the mean seconds of an ``ok`` audit (rows: metrics; columns: attacks).

    Args:
        records: audit records (:func:`~leak_audit.results.records.read_audit_log`).
        metrics: the metrics to show, in order (e.g. :data:`~leak_audit.metrics.names.TEXT_METRICS`); a
            metric no record reports gets no row.
        title: the table's title.
    """
    attacks = list(dict.fromkeys(r.attack for r in records))
    table = Table(title=title)
    table.add_column("metric")
    for a in attacks:
        table.add_column(a, justify="right")
    for m in [m for m in metrics if any(m in r.metrics for r in records)]:
        cells = []
        for a in attacks:
            vals = [r.metrics[m] for r in records if r.attack == a and r.status == "ok" and m in r.metrics]
            cells.append(f"{max(vals):.3f}" if vals else "-")
        table.add_row(m, *cells)
    for status in STATUSES:
        table.add_row(f"audits {status}", *[str(sum(r.attack == a and r.status == status for r in records)) for a in attacks])
    secs = []
    for a in attacks:
        ok = [r.seconds for r in records if r.attack == a and r.status == "ok"]
        secs.append(f"{sum(ok) / len(ok):.2f}" if ok else "-")
    table.add_row("seconds/audit", *secs)
    return table
