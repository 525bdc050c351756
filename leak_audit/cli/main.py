"""The ``leak-audit`` command line.

``leak-audit gate AUDIT.jsonl [--policy leak-policy.toml] [--max rouge1=0.5 ...] [--format text|json|junit]
[--output FILE]`` evaluates a leakage policy (:mod:`leak_audit.gate.policy`; ``--max`` adds max rules) and prints
one row per rule; it exits 0 when no rule fails (warnings included), 1 on a breach (or a metric no record in
a rule's scope reports), and 2 on bad input (missing or malformed log or policy, unknown metric, no
successful audit). ``--format json|junit`` prints the machine-readable report instead, or writes it to
``--output FILE`` and prints the table.

``leak-audit bench text --data FILE.tsv [--views full,layer:0,linear:MODULE] [--attacks best|NAME,...] ...``
runs the attacks on real sentences and reports per-attack leakage and seconds per batch (see
:mod:`leak_audit.cli.bench.text`); it exits 0 on success and 2 on bad input.

``leak-audit bench image --data FILE.npz [--batch-sizes 1,4,8] [--attacks dlg,inverting_gradients]`` does the
same for images (PSNR, SSIM, LPIPS; :mod:`leak_audit.cli.bench.image`).

``leak-audit bench overhead --steps 300 --every-n-steps 50 [--attacks NAME,...] [--data FILE.tsv] ...`` times
training steps of the pretrained MiniLM with and without ``LeakageAudit`` in interleaved runs (steps/s,
slowdown ratio, audits ok/skipped/failed, audit latency; :mod:`leak_audit.cli.bench.overhead`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from leak_audit.cli.bench.image import add_image_arguments, bench_image_command
from leak_audit.cli.bench.overhead import add_overhead_arguments, bench_overhead_command
from leak_audit.cli.bench.text import add_text_arguments, bench_text_command
from leak_audit.gate.thresholds import GateError, policy_from_args
from leak_audit.gate.policy import GatePolicy, GateReport
from leak_audit.results.records import STATUSES, AuditLogError, AuditRecord, read_audit_log
from leak_audit.cli.report import add_report_arguments, report_command

__all__ = ["main", "policy_table", "summary_table"]

EXIT_PASS, EXIT_BREACH, EXIT_BAD_INPUT = 0, 1, 2


def summary_table(records: Sequence[AuditRecord], metrics: Sequence[str], title: str) -> Table:
    """Worst (largest) value of each of ``metrics`` per attack over the ``ok`` records, then the count of
    records per status and the mean seconds of an ``ok`` audit (rows: metrics; columns: attacks)."""
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


_STATUS_STYLE = {"pass": "[green]pass[/green]", "warn": "[yellow]WARN[/yellow]", "fail": "[red]FAIL[/red]"}


def policy_table(report: GateReport, title: str = "leak-audit gate") -> Table:
    """A rich table of a :class:`~leak_audit.gate.policy.GateReport`: one row per rule with its aggregated value,
    limit, warn level, aggregation, status and where the worst value came from."""
    table = Table(title=title)
    for col in ("rule", "value", "threshold", "warn", "aggregation", "status", "worst at"):
        table.add_column(col, justify="right" if col in ("value", "threshold", "warn") else "left")
    for res in report.results:
        rule = res.rule
        cells = (rule.name, res.value_text, rule.threshold_text, rule.warn_text, rule.aggregation_text)
        table.add_row(*(Text(c) for c in cells), _STATUS_STYLE[res.status], Text(res.where))
    return table


def _gate_policy(args: argparse.Namespace) -> GatePolicy:
    if args.policy is None and not args.max:
        raise GateError("give a policy (--policy leak-policy.toml) or thresholds (--max METRIC=VALUE, e.g. rouge1=0.5)")
    if args.output is not None and args.format == "text":
        raise GateError("--output writes a json or junit report: add --format json or --format junit")
    policy = policy_from_args(args.policy, args.max)
    assert policy is not None
    return policy


def _print_text(report: GateReport, console: Console) -> None:
    if not console.is_terminal and console.width < 160:  # a CI log or a pipe is no 80-column terminal
        console = Console(file=console.file, width=160)
    console.print(policy_table(report))
    for res in report.results:
        if res.status != "pass":
            named = "" if res.rule.name == res.rule.metric else f"{res.rule.name}: "  # messages start with the metric
            console.print(f"{res.status.upper()} {named}{res.message}", markup=False, highlight=False, soft_wrap=True)
    verdict = {"pass": "PASS", "warn": "WARN", "fail": "BREACH"}[report.verdict]
    console.print(f"verdict: {verdict}", markup=False, highlight=False)


def _gate(args: argparse.Namespace, console: Console) -> int:
    try:
        policy = _gate_policy(args)
        records = read_audit_log(args.audit_log)
        report = policy.evaluate(records)
    except (GateError, AuditLogError) as exc:
        print(f"leak-audit gate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    document = {"json": report.to_json, "junit": report.to_junit}.get(args.format)
    if document is None:
        _print_text(report, console)
    elif args.output is None:
        sys.stdout.write(document().rstrip("\n") + "\n")
    else:
        try:
            Path(args.output).write_text(document(), encoding="utf-8")
        except OSError as exc:
            print(f"leak-audit gate: error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        _print_text(report, console)
    return EXIT_PASS if report.passed else EXIT_BREACH


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leak-audit", description="Audit gradient leakage in training runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    gate = sub.add_parser(
        "gate",
        help="fail (exit 1) when an audit log breaks a leakage policy or thresholds",
        description="Evaluate a leakage policy (--policy, and/or --max rules) on an audit log. "
        "Exit 0: pass (warnings included). 1: a rule fails (a value beyond its limit, or no successful audit "
        "in its scope reports the metric). 2: bad input (missing or malformed log or policy, unknown metric, "
        "no successful audit).",
    )
    gate.add_argument("audit_log", help="path to audit.jsonl")
    gate.add_argument("--policy", metavar="FILE", help="TOML policy of [[rule]] tables (see leak_audit.gate.policy)")
    gate.add_argument(
        "--max",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="maximum allowed worst-case value, e.g. rouge1=0.5 or epsilon=8 (repeatable; added to --policy's rules)",
    )
    gate.add_argument(
        "--format",
        choices=("text", "json", "junit"),
        default="text",
        help="text: a table and the verdict (default); json or junit: the report document on stdout, or in --output",
    )
    gate.add_argument(
        "--output", metavar="FILE", help="write the json/junit report to FILE and print the text table to stdout"
    )
    gate.set_defaults(func=_gate)
    report = sub.add_parser(
        "report",
        help="write a self-contained HTML page (summary, gate verdict, plots, audit table) of an audit log",
        description="Exit 0: page written, whatever the verdict (a breach is shown, not enforced: use "
        "'leak-audit gate' to fail a release). 2: bad input (missing or malformed log, bad policy, unwritable output).",
    )
    add_report_arguments(report)
    report.set_defaults(func=report_command)
    bench = sub.add_parser("bench", help="benchmark the attacks on real data", description="Benchmark the attacks.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    text = bench_sub.add_parser(
        "text",
        help="per-attack leakage and seconds per batch on sentences, per gradient view and batch size",
        description="Exit 0: done. 2: bad input (unknown view, module, layer or attack; unreadable data).",
    )
    add_text_arguments(text)
    text.set_defaults(func=bench_text_command)
    image = bench_sub.add_parser(
        "image",
        help="PSNR/SSIM/LPIPS of image reconstructions (DLG, Inverting Gradients) per batch size",
        description="Exit 0: done. 2: bad input (unreadable data, unknown attack, bad option).",
    )
    add_image_arguments(image)
    image.set_defaults(func=bench_image_command)
    overhead = bench_sub.add_parser(
        "overhead",
        help="training steps/s with and without LeakageAudit (pretrained MiniLM, interleaved runs)",
        description="Time optimizer steps of the pretrained MiniLM on real sentences without and with "
        "LeakageAudit, in interleaved runs (baseline, audit, ...; same seed and data order). "
        "Exit 0: done. 2: bad input (missing data file, unknown attack or module, bad option).",
    )
    add_overhead_arguments(overhead)
    overhead.set_defaults(func=bench_overhead_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leak-audit`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, as we do on bad input
        return int(exc.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return int(args.func(args, Console()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
