"""The gate's report for people: a rich table of a :class:`~leak_audit.gate.policy.GateReport` and the
text ``leak-audit gate`` prints (the JSON and JUnit documents are :meth:`GateReport.to_json
<leak_audit.gate.policy.GateReport.to_json>` and :meth:`~leak_audit.gate.policy.GateReport.to_junit`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from leak_audit.gate.policy import VERDICT_WORDS, GateReport

__all__ = ["STATUS_MARKUP", "policy_table", "print_report"]

STATUS_MARKUP: dict[str, str] = {"pass": "[green]pass[/green]", "warn": "[yellow]WARN[/yellow]", "fail": "[red]FAIL[/red]"}
"""A rule's status as rich markup, in :func:`policy_table`'s status column."""


def policy_table(report: GateReport, title: str = "leak-audit gate") -> Table:
    """A rich table of a :class:`~leak_audit.gate.policy.GateReport`: one row per rule with its aggregated value,
    limit, warn level, aggregation, status and where the worst value came from."""
    table = Table(title=title)
    for col in ("rule", "value", "threshold", "warn", "aggregation", "status", "worst at"):
        table.add_column(col, justify="right" if col in ("value", "threshold", "warn") else "left")
    for res in report.results:
        rule = res.rule
        cells = (rule.name, res.value_text, rule.threshold_text, rule.warn_text, rule.aggregation_text)
        table.add_row(*(Text(c) for c in cells), STATUS_MARKUP[res.status], Text(res.where))
    return table


def print_report(report: GateReport, console: Console) -> None:
    """Print what ``leak-audit gate`` shows: :func:`policy_table`, one line per rule that does not pass,
    then ``verdict: PASS|WARN|BREACH``. A console that is not a terminal (a CI log, a pipe) gets 160
    columns, so the table is not squeezed into 80."""
    if not console.is_terminal and console.width < 160:
        console = Console(file=console.file, width=160)
    console.print(policy_table(report))
    for res in report.results:
        if res.status != "pass":
            named = "" if res.rule.name == res.rule.metric else f"{res.rule.name}: "  # messages start with the metric
            console.print(f"{res.status.upper()} {named}{res.message}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"verdict: {VERDICT_WORDS[report.verdict]}", markup=False, highlight=False)
