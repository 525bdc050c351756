"""The rows of ``leak-audit bench overhead``: step-time statistics and audit outcomes per setting, and the
rows as a console table and a markdown report (pure functions of the runs; see
:mod:`leak_audit.cli.bench.overhead`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from leak_audit.cli.bench.common import BenchError, fmt, markdown_report
from leak_audit.results.records import AuditRecord

__all__ = [
    "AUDIT",
    "BASELINE",
    "NOTE",
    "RunResult",
    "audit_capture_seconds",
    "audit_counts",
    "audit_latencies",
    "cycle_rows",
    "percentile",
    "rows_markdown",
    "rows_table",
    "summarize_runs",
]

BASELINE = "baseline"
"""The setting without the callback."""


AUDIT = "audit"
"""The setting with :class:`~leak_audit.LeakageAudit`."""


def cycle_rows(rows: Sequence[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """The first ``n`` rows of ``rows``, starting over from the top as often as needed.

    Raises:
        BenchError: ``rows`` is empty.
    """
    if not rows:
        raise BenchError("the data file holds no sentences")
    return [rows[i % len(rows)] for i in range(n)]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (``0 <= q <= 100``) with linear interpolation between closest ranks
    (numpy's default); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def audit_latencies(records: Sequence[AuditRecord]) -> list[float]:
    """Seconds each audit took on the worker, one value per audit that has an ``ok`` record.

    Per audit (records grouped by ``record.audit``): the sum of ``seconds`` of its ``ok`` records, plus
    ``info["recompute_seconds"]`` (the ``recompute="eval"`` forward/backward) once when present.
    Audits in log order.
    """
    out: dict[int, float] = {}
    for r in records:
        if r.status != "ok":
            continue
        if r.audit not in out:
            out[r.audit] = float(r.info.get("recompute_seconds", 0.0))
        out[r.audit] += float(r.seconds)
    return list(out.values())


def audit_capture_seconds(records: Sequence[AuditRecord]) -> list[float]:
    """Seconds each audit cost the training thread (``info["capture_seconds"]``: copying the batch,
    the parameters and the gradients), one value per audit that reports it, in log order."""
    out: dict[int, float] = {}
    for r in records:
        if r.audit not in out and "capture_seconds" in r.info:
            out[r.audit] = float(r.info["capture_seconds"])
    return list(out.values())


def audit_counts(records: Sequence[AuditRecord], audits: int, skipped: int, failed: int) -> dict[str, int]:
    """Audits per outcome from the callback's counters and its log.

    Args:
        records: the audit log.
        audits, skipped, failed: the callback's ``audits``, ``skipped`` and ``failed`` attributes.

    Returns:
        ``{"audits", "ok", "skipped", "failed", "unfinished"}``: ``ok`` counts the audits of the log with an
        ``ok`` record and no ``failed`` one; ``unfinished`` the dispatched audits that are none of
        ok, skipped or failed (abandoned at ``end_timeout``).
    """
    statuses: dict[int, set[str]] = {}
    for r in records:
        statuses.setdefault(r.audit, set()).add(r.status)
    ok = sum("ok" in s and "failed" not in s for s in statuses.values())
    return {"audits": audits, "ok": ok, "skipped": skipped, "failed": failed,
            "unfinished": max(0, audits - ok - skipped - failed)}


@dataclass
class RunResult:
    """One training run.

    Attributes:
        setting: :data:`BASELINE` or :data:`AUDIT`.
        repeat: 0-based repeat index.
        step_seconds: wall seconds of each timed optimizer step (warmup steps dropped).
        fit_seconds: wall seconds of ``trainer.fit`` (model transfer, every step, the end wait).
        end_wait_seconds: wall seconds from the last step's end to ``trainer.fit`` returning (mostly the
            callback waiting for its last audit).
        counts: see :func:`audit_counts` (empty for the baseline).
        latencies: audit latencies in seconds (:func:`audit_latencies`).
        captures: capture seconds per audit (:func:`audit_capture_seconds`).
        attacks: the attacks the callback ran (empty for the baseline).
    """

    setting: str
    repeat: int
    step_seconds: list[float]
    fit_seconds: float
    end_wait_seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    captures: list[float] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def summarize_runs(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per setting (baseline first) from the runs of both settings.

    Row keys (times in seconds unless the name says ms):

    * ``setting``, ``runs``, ``timed_steps`` (pooled over repeats);
    * ``median_step_seconds``, ``mean_step_seconds``, ``steps_per_second_median`` (``1 / median``),
      ``steps_per_second_mean`` (``1 / mean``);
    * ``ratio_mean``: pooled mean step time / the baseline's pooled mean step time;
      ``ratio_per_repeat``: the same per repeat (runs paired by repeat index);
      ``mean_step_seconds_per_repeat``;
    * ``audits``, ``audits_ok``, ``audits_skipped``, ``audits_failed``, ``audits_unfinished`` (sums over
      repeats; ``None`` for the baseline);
    * ``audit_latency_p50_seconds``, ``audit_latency_p95_seconds``, ``audit_latency_mean_seconds``
      (over all audits of all repeats), ``capture_ms_per_audit`` (mean);
    * ``end_wait_seconds`` (mean over repeats), ``fit_seconds`` (mean over repeats).

    Raises:
        ValueError: no baseline run, or a run without timed steps.
    """
    by_setting: dict[str, list[RunResult]] = {}
    for run in runs:
        if not run.step_seconds:
            raise ValueError(f"run {run.setting} #{run.repeat} has no timed steps")
        by_setting.setdefault(run.setting, []).append(run)
    if BASELINE not in by_setting:
        raise ValueError("no baseline run to compare with")
    base_runs = {r.repeat: r for r in by_setting[BASELINE]}
    base_mean = statistics.mean(t for r in by_setting[BASELINE] for t in r.step_seconds)
    rows = []
    for setting in sorted(by_setting, key=lambda s: (s != BASELINE, s)):
        setting_runs = sorted(by_setting[setting], key=lambda r: r.repeat)
        times = [t for r in setting_runs for t in r.step_seconds]
        median, mean = statistics.median(times), statistics.mean(times)
        per_repeat = [statistics.mean(r.step_seconds) for r in setting_runs]
        ratios = [
            _round(statistics.mean(r.step_seconds) / statistics.mean(base_runs[r.repeat].step_seconds), 4)
            for r in setting_runs if r.repeat in base_runs
        ]
        audited = setting != BASELINE
        counts: dict[str, int | None] = {}
        for key in ("audits", "ok", "skipped", "failed", "unfinished"):
            counts[key] = sum(r.counts.get(key, 0) for r in setting_runs) if audited else None
        latencies = [x for r in setting_runs for x in r.latencies]
        captures = [x for r in setting_runs for x in r.captures]
        rows.append({
            "setting": setting,
            "runs": len(setting_runs),
            "timed_steps": len(times),
            "median_step_seconds": _round(median),
            "mean_step_seconds": _round(mean),
            "steps_per_second_median": _round(1.0 / median, 4),
            "steps_per_second_mean": _round(1.0 / mean, 4),
            "ratio_mean": _round(mean / base_mean, 4),
            "ratio_per_repeat": ratios,
            "mean_step_seconds_per_repeat": [_round(m) for m in per_repeat],
            "audits": counts["audits"],
            "audits_ok": counts["ok"],
            "audits_skipped": counts["skipped"],
            "audits_failed": counts["failed"],
            "audits_unfinished": counts["unfinished"],
            "audit_latency_p50_seconds": _round(percentile(latencies, 50), 4),
            "audit_latency_p95_seconds": _round(percentile(latencies, 95), 4),
            "audit_latency_mean_seconds": _round(statistics.mean(latencies), 4) if latencies else None,
            "capture_ms_per_audit": _round(1000 * statistics.mean(captures), 3) if captures else None,
            "end_wait_seconds": _round(statistics.mean(r.end_wait_seconds for r in setting_runs), 4),
            "fit_seconds": _round(statistics.mean(r.fit_seconds for r in setting_runs), 4),
            "attacks": setting_runs[0].attacks if audited else [],
        })
    return rows


# ----------------------------------------------------------------------------------------- output


_COLUMNS = ("setting", "steps/s (median)", "steps/s (mean)", "ms/step (mean)", "ratio (mean)", "ratio per repeat",
            "audits ok/skipped/failed", "latency p50 s", "latency p95 s", "capture ms/audit", "end wait s")


def _cells(row: Mapping[str, Any]) -> list[str]:
    audited = row["audits"] is not None
    counts = f"{row['audits_ok']}/{row['audits_skipped']}/{row['audits_failed']}" if audited else "–"
    if audited and row.get("audits_unfinished"):
        counts += f" (+{row['audits_unfinished']} unfinished)"
    return [
        row["setting"],
        fmt(row["steps_per_second_median"], 2),
        fmt(row["steps_per_second_mean"], 2),
        fmt(1000 * row["mean_step_seconds"], 1),
        f"{row['ratio_mean']:.3f}x",
        ", ".join(f"{r:.3f}x" for r in row["ratio_per_repeat"]),
        counts,
        fmt(row["audit_latency_p50_seconds"], 2),
        fmt(row["audit_latency_p95_seconds"], 2),
        fmt(row["capture_ms_per_audit"], 1),
        fmt(row["end_wait_seconds"], 2),
    ]


NOTE = ("Step time: first batch-start hook to last batch-end hook (forward, backward, optimizer step, every "
        "callback hook, the audit's capture included), warmup steps dropped, pooled over repeats. ratio: mean "
        "step time / the baseline's (per repeat: paired runs). Audit latency: seconds of an audit's ok attacks "
        "(plus the eval recomputation) on the worker. capture: the audit's copies on the training thread. end "
        "wait: waiting for the last audit after the last step (end_timeout), not part of the step times.")


def rows_table(rows: Sequence[Mapping[str, Any]], title: str = "leak-audit bench overhead") -> Table:
    """A rich table of the rows (one per setting)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in _COLUMNS:
        table.add_column(col, justify="left" if col == "setting" else "right")
    for row in rows:
        table.add_row(*[escape(c) for c in _cells(row)])
    return table


def rows_markdown(rows: Sequence[Mapping[str, Any]], command: str, settings: Mapping[str, Any]) -> str:
    """The rows as a markdown document: the command line, the settings, a table, a note on the columns."""
    cells = (_cells(row) for row in rows)
    numeric = [c for c in _COLUMNS if c != "setting"]
    return markdown_report("leak-audit bench overhead", command, settings, _COLUMNS, cells, NOTE, numeric)
