"""``leak-audit report AUDIT.jsonl [-o OUT.html] [--policy FILE] [--max METRIC=VALUE ...] [--run all|last|ID]
[--include-samples]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from leak_audit.cli.gate import add_run_argument
from leak_audit.cli.report.page import ReportError, write_page
from leak_audit.gate.policy import GateError
from leak_audit.gate.thresholds import policy_from_args
from leak_audit.results.records import AuditLogError

__all__ = ["EXIT_BAD_INPUT", "EXIT_WRITTEN", "add_report_arguments", "report_command"]

EXIT_WRITTEN, EXIT_BAD_INPUT = 0, 2


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``leak-audit report`` arguments to ``parser``."""
    parser.add_argument("audit_log", help="path to audit.jsonl")
    add_run_argument(parser)
    parser.add_argument("-o", "--output", default=None, metavar="OUT.html",
                        help="the page to write (default: report.html next to the log)")
    parser.add_argument("--title", default=None, help="page title (default: 'leak-audit report: <log>')")
    parser.add_argument("--policy", default=None, metavar="FILE.toml",
                        help="leakage policy to evaluate and show, as for 'leak-audit gate --policy'")
    parser.add_argument("--max", action="append", default=[], metavar="METRIC=VALUE",
                        help="maximum allowed worst-case value, e.g. rouge1=0.5 (repeatable; added to --policy's "
                        "rules, as for 'leak-audit gate')")
    parser.add_argument("--include-samples", action="store_true",
                        help="embed the reconstructed text/images the log holds (log_samples=True): private data!")


def report_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``leak-audit report`` from parsed arguments.

    Returns:
        0 when the page was written, whatever the verdict: a breach is shown, not enforced (that is
        ``leak-audit gate``'s exit code). 2 on bad input (missing or malformed log, bad policy or
        threshold, unwritable output), with ``leak-audit report: error: ...`` on stderr.
    """
    out = Path(args.output) if args.output else Path(args.audit_log).parent / "report.html"
    try:
        policy = policy_from_args(args.policy, args.max)
        path, n, verdict = write_page(args.audit_log, out, args.title, policy, args.include_samples, args.run)
    except (AuditLogError, GateError, ReportError) as exc:
        print(f"leak-audit report: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if policy is None:
        said = "no policy given"
    elif verdict is None:
        said = "no verdict: the log has no successful audit"
    else:
        said = f"verdict {verdict} (shown, not enforced: use leak-audit gate to fail a release)"
    samples = "samples included" if args.include_samples else "no samples"
    console.print(f"wrote {path} ({n} records; {said}; {samples})", markup=False, highlight=False, soft_wrap=True)
    return EXIT_WRITTEN
