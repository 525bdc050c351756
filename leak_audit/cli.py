"""The ``leak-audit`` command line.

``leak-audit gate AUDIT.jsonl --max rouge1=0.5 [--max token_recall=0.9 ...]`` prints one row per
metric and exits 0 when every metric passes, 1 on a breach (or a metric no record reports), and 2 on bad
input (missing file, unparsable line, unknown metric, no successful audit).

``leak-audit bench text --data FILE.tsv [--views full,layer:0,linear:MODULE] [--attacks best|NAME,...] ...``
runs the attacks on real sentences and reports per-attack leakage and seconds per batch (see
:mod:`leak_audit.bench.text`); it exits 0 on success and 2 on bad input.

``leak-audit bench image --data FILE.npz [--batch-sizes 1,4,8] [--attacks dlg,inverting_gradients]`` does the
same for images (PSNR, SSIM, LPIPS; :mod:`leak_audit.bench.image`).

``leak-audit bench overhead --steps 300 --every-n-steps 50 [--attacks NAME,...] [--data FILE.tsv] ...`` times
training steps of the pretrained MiniLM with and without ``LeakageAudit`` in interleaved runs (steps/s,
slowdown ratio, audits ok/skipped/failed, audit latency; :mod:`leak_audit.bench.overhead`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from leak_audit.bench.image import add_image_arguments, bench_image_command
from leak_audit.bench.overhead import add_overhead_arguments, bench_overhead_command
from leak_audit.bench.text import add_text_arguments, bench_text_command
from leak_audit.gate import GateError, GateRow, evaluate_gate, parse_threshold
from leak_audit.records import AuditLogError, AuditRecord, read_audit_log

__all__ = ["main", "gate_table", "summary_table"]

EXIT_PASS, EXIT_BREACH, EXIT_BAD_INPUT = 0, 1, 2


def gate_table(rows: Sequence[GateRow], title: str = "leak-audit gate") -> Table:
    """A rich table of gate rows: metric, worst value, threshold, verdict, where the worst value came from."""
    table = Table(title=title)
    for col in ("metric", "worst", "max", "verdict", "worst at"):
        table.add_column(col, justify="right" if col in ("worst", "max") else "left")
    for r in rows:
        worst = "missing" if r.worst is None else f"{r.worst:.4f}"
        verdict = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
        table.add_row(r.metric, worst, f"{r.threshold:g}", verdict, r.where)
    return table


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
    for status in ("ok", "failed", "skipped"):
        table.add_row(f"audits {status}", *[str(sum(r.attack == a and r.status == status for r in records)) for a in attacks])
    secs = []
    for a in attacks:
        ok = [r.seconds for r in records if r.attack == a and r.status == "ok"]
        secs.append(f"{sum(ok) / len(ok):.2f}" if ok else "-")
    table.add_row("seconds/audit", *secs)
    return table


def _gate(args: argparse.Namespace, console: Console) -> int:
    try:
        thresholds = dict(parse_threshold(t) for t in args.max)
        records = read_audit_log(args.audit_log)
        rows = evaluate_gate(records, thresholds)
    except (GateError, AuditLogError) as exc:
        print(f"leak-audit gate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    console.print(gate_table(rows))
    failed = [r for r in rows if not r.passed]
    for r in failed:
        why = "no successful record reports it" if r.worst is None else f"{r.worst:.4f} > {r.threshold:g}"
        console.print(f"FAIL {r.metric}: {why}", markup=False, highlight=False)
    console.print("verdict: " + ("BREACH" if failed else "PASS"), markup=False, highlight=False)
    return EXIT_BREACH if failed else EXIT_PASS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leak-audit", description="Audit gradient leakage in training runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    gate = sub.add_parser(
        "gate",
        help="fail (exit 1) when the worst leakage in an audit log exceeds thresholds",
        description="Exit 0: pass. 1: a metric exceeds its maximum or is missing. 2: bad input.",
    )
    gate.add_argument("audit_log", help="path to audit.jsonl")
    gate.add_argument(
        "--max",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="maximum allowed worst-case value, e.g. rouge1=0.5 (repeatable)",
    )
    gate.set_defaults(func=_gate)
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
