"""The report page: one self-contained HTML document from an audit log's records (see :mod:`leak_audit.cli.report`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from leak_audit.cli.report.format import escape, module_set, sort_records
from leak_audit.cli.report.plots import plots_section
from leak_audit.cli.report.sections import (
    audit_section,
    canary_section,
    gate_section,
    samples_section,
    summary_section,
)
from leak_audit.gate.policy import GatePolicy
from leak_audit.results.records import AuditRecord, read_audit_log, select_run, which_runs

__all__ = ["CSP", "CSS", "ReportError", "render_page", "render_report", "write_page", "write_report"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
"""The page's Content-Security-Policy: images from ``data:`` URIs and inline style, nothing else."""


class ReportError(ValueError):
    """Bad report input: a bad policy or threshold, or an output that cannot be written."""


CSS = """
:root { --ok:#1a7f37; --fail:#c62828; --warn:#b26a00; --muted:#5f6368; --line:#d0d7de; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0 auto; max-width: 1240px; padding: 20px 24px 40px; color: #1f2328; background: #fff;
       font-size: 14px; line-height: 1.45; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 28px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
code { background: #f3f4f6; padding: 0 3px; border-radius: 3px; font-size: 12.5px; }
.sub, .note, figcaption { color: var(--muted); font-size: 12.5px; }
table { border-collapse: collapse; }
table.kv th { text-align: left; padding: 3px 16px 3px 0; vertical-align: top; white-space: nowrap; font-weight: 600; }
table.kv td { padding: 3px 0; word-break: break-word; }
table.grid { font-size: 12.5px; min-width: 50%; }
table.grid.wide { width: 100%; }
table.grid th, table.grid td { border: 1px solid var(--line); padding: 3px 6px; text-align: left; vertical-align: top; }
table.grid thead th { background: #f6f8fa; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.error { color: var(--fail); word-break: break-word; min-width: 240px; max-width: 420px; }
tr.r-failed td.status, tr.r-fail td.status, .s-failed { color: var(--fail); font-weight: 600; }
tr.r-skipped td, .s-skipped { color: var(--muted); }
tr.r-timeout td.status, .s-timeout { color: #ef6c00; font-weight: 600; }
.partial { color: var(--muted); font-style: italic; }
tr.r-ok td.status, tr.r-pass td.status, .s-ok { color: var(--ok); font-weight: 600; }
tr.r-warn td.status { color: var(--warn); font-weight: 600; }
tr.r-fail { background: #fdecea; }
tr.r-warn { background: #fff6e0; }
.verdict { display: inline-block; font-size: 30px; font-weight: 800; letter-spacing: 2px; color: #fff;
           padding: 8px 28px; border-radius: 8px; margin: 4px 0 8px; }
.v-pass { background: var(--ok); } .v-warn { background: var(--warn); } .v-fail { background: var(--fail); }
.v-none { background: #8b949e; font-size: 20px; letter-spacing: 0; }
figure.plot { margin: 10px 0 22px; }
figure.plot img, .sample-images img { max-width: 100%; height: auto; display: block; }
.privacy { background: #f6f8fa; border-left: 4px solid #8b949e; padding: 8px 12px; }
.warn-box { border-left-color: var(--fail); background: #fdecea; }
table.sample { margin-bottom: 8px; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 8px; }
"""


def render_page(
    records: Sequence[AuditRecord], title: str, policy: GatePolicy | None, include_samples: bool,
    source: str | Path | None,
) -> tuple[str, str | None]:
    """The page and the verdict word (``PASS``/``WARN``/``BREACH``; ``None`` without a verdict)."""
    records = list(records)
    attacks = list(dict.fromkeys(r.attack for r in sort_records(records, [])))
    sets = list(dict.fromkeys(module_set(r) for r in sort_records(records, [])))
    source_text = str(source) if source is not None else None
    base = Path(source).parent if source is not None else None
    gate_html, verdict = gate_section(records, policy)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f'<header><h1>{escape(title)}</h1><p class="sub">Gradient-leakage audit report, generated {generated} by '
        "<code>leak-audit report</code>. Self-contained: no script, nothing loaded from anywhere.</p></header>",
        summary_section(records, source_text, attacks, sets),
        gate_html,
        '<section id="plots"><h2>Leakage</h2>',
        plots_section(records, attacks, sets),
        "</section>",
        canary_section(records),
        audit_section(records, attacks, sets),
        samples_section(records, include_samples, base, attacks),
        "<footer>Every metric grows with leakage (higher: the attacker rebuilt more of the batch). "
        "Record <code>info</code> fields are not shown, except partial values and lower-bound reasons.</footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n", verdict


def render_report(
    records: Sequence[AuditRecord],
    *,
    title: str = "leak-audit report",
    policy: GatePolicy | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    include_samples: bool = False,
    source: str | Path | None = None,
) -> str:
    """The report page for ``records`` as one self-contained HTML document.

    Args:
        records: the audit log's records (:func:`leak_audit.results.records.read_audit_log`), in any order.
        title: the page title and heading (escaped).
        policy: a :class:`leak_audit.gate.policy.GatePolicy` to evaluate, or anything
            :meth:`GatePolicy.coerce <leak_audit.gate.policy.GatePolicy.coerce>` accepts (a TOML path, a
            mapping); ``None``: "no policy given" and the worst value per metric.
        include_samples: embed the records' ``samples`` (reconstructed text, and images read from the
            ``.npz`` files they name, relative to ``source``'s folder). Off by default: they are the
            private data the attacks recovered; the page says whether they are included.
        source: the log's path, shown in the summary and used to find image sample files.

    Returns:
        The HTML text. It references no external resource (no URL at all, no script); its plots are
        base64 PNGs. What is plotted and what is never included: see :mod:`leak_audit.cli.report`.

    Raises:
        leak_audit.gate.policy.PolicyError: ``policy`` is not a valid policy. A log the policy cannot be
            evaluated on (no successful audit) is not an error: the page says "no verdict" and why.
    """
    return render_page(records, title, GatePolicy.coerce(policy), include_samples, source)[0]


def write_report(
    path_in: str | Path,
    path_out: str | Path,
    *,
    title: str | None = None,
    policy: GatePolicy | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    include_samples: bool = False,
    run: str = "all",
) -> Path:
    """Read the audit log ``path_in`` and write its report page to ``path_out`` (parents created).

    Args:
        title: default ``"leak-audit report: <log path>"`` (and which run, when the log holds several).
        policy, include_samples: as in :func:`render_report`.
        run: which training runs of the log: ``"all"``, ``"last"`` or a run id
            (:func:`~leak_audit.results.records.select_run`).

    Returns:
        ``path_out`` as a :class:`~pathlib.Path`.

    Raises:
        leak_audit.results.records.AuditLogError: the log is missing or malformed, or holds no run ``run``.
        leak_audit.gate.policy.PolicyError: a bad policy.
        ReportError: the page cannot be written.
    """
    return write_page(path_in, path_out, title, GatePolicy.coerce(policy), include_samples, run)[0]


def write_page(path_in: str | Path, path_out: str | Path, title: str | None, policy: GatePolicy | None,
           include_samples: bool, run: str = "all") -> tuple[Path, int, str | None]:
    """Read, render, write: ``(path_out, number of records, verdict word or None)``, for the runs of the log that
    ``run`` selects (:func:`~leak_audit.results.records.select_run`; a log of several runs says which in the title)."""
    everything = read_audit_log(path_in)
    records = select_run(everything, run)
    if title is None:
        runs = which_runs(everything, run)
        title = f"leak-audit report: {path_in}" + (f", {runs}" if runs else "")
    page, verdict = render_page(records, title, policy, include_samples, path_in)
    out = Path(path_out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out, len(records), verdict
