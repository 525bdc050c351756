"""``leak-audit gate AUDIT.jsonl [--policy FILE] [--max METRIC=VALUE ...] [--run all|last|ID]
[--format text|json|junit] [--output FILE]``.

The CI check: it evaluates a leakage policy (:mod:`leak_audit.gate.policy`; ``--max`` adds max rules,
:mod:`leak_audit.gate.thresholds`) on an audit log and prints one row per rule. It judges every training run the
log holds unless ``--run`` names one (:func:`~leak_audit.results.records.select_run`), so a release is not passed
on part of its evidence; when the log holds several runs it says which it judged, on stderr. It imports only the log
reader and the gate (no torch, Lightning or attack), so it starts fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from leak_audit.gate.policy import GatePolicy
from leak_audit.gate.render import print_report
from leak_audit.gate.thresholds import GateError, policy_from_args
from leak_audit.results.records import AuditLogError, read_audit_log, select_run, which_runs

__all__ = ["EXIT_BAD_INPUT", "EXIT_BREACH", "EXIT_PASS", "add_gate_arguments", "add_run_argument", "gate_command"]

EXIT_PASS, EXIT_BREACH, EXIT_BAD_INPUT = 0, 1, 2


def add_run_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--run`` (which training run of the log to read; shared by ``gate`` and ``report``) to ``parser``."""
    parser.add_argument("--run", default="all", metavar="all|last|ID",
                        help="which training runs of the log to read: every run (default), the last to write, or "
                        "one run's id (each record's 'run' field; several fits can append to one log)")


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``leak-audit gate`` arguments to ``parser``."""
    parser.add_argument("audit_log", help="path to audit.jsonl")
    add_run_argument(parser)
    parser.add_argument("--policy", metavar="FILE", help="TOML policy of [[rule]] tables (see leak_audit.gate.policy)")
    parser.add_argument(
        "--max",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="maximum allowed worst-case value, e.g. rouge1=0.5 or epsilon=8 (repeatable; added to --policy's rules)",
    )
    parser.add_argument(
        "--format",
        choices=("text", "json", "junit"),
        default="text",
        help="text: a table and the verdict (default); json or junit: the report document on stdout, or in --output",
    )
    parser.add_argument(
        "--output", metavar="FILE", help="write the json/junit report to FILE and print the text table to stdout"
    )


def _policy(args: argparse.Namespace) -> GatePolicy:
    if args.policy is None and not args.max:
        raise GateError("give a policy (--policy leak-policy.toml) or thresholds (--max METRIC=VALUE, e.g. rouge1=0.5)")
    if args.output is not None and args.format == "text":
        raise GateError("--output writes a json or junit report: add --format json or --format junit")
    policy = policy_from_args(args.policy, args.max)
    assert policy is not None
    return policy


def gate_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``leak-audit gate`` from parsed arguments.

    Returns:
        0 when no rule fails (warnings included), 1 on a breach (or a metric no record in a rule's scope
        reports), 2 on bad input (missing or malformed log or policy, unknown metric, a ``--run`` the log does not
        hold, no successful audit),
        with ``leak-audit gate: error: ...`` on stderr.
    """
    try:
        policy = _policy(args)
        everything = read_audit_log(args.audit_log)
        records = select_run(everything, args.run)
        report = policy.evaluate(records)
    except (GateError, AuditLogError) as exc:
        print(f"leak-audit gate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    runs = which_runs(everything, args.run)
    if runs:  # stderr: a json/junit document on stdout stays machine-readable
        narrow = " (--run last or --run ID judges one)" if args.run == "all" else ""
        print(f"leak-audit gate: judged {runs} in {args.audit_log}: {len(records)} of {len(everything)} records{narrow}",
              file=sys.stderr)
    document = {"json": report.to_json, "junit": report.to_junit}.get(args.format)
    if document is None:
        print_report(report, console)
    elif args.output is None:
        sys.stdout.write(document().rstrip("\n") + "\n")
    else:
        try:
            Path(args.output).write_text(document(), encoding="utf-8")
        except OSError as exc:
            print(f"leak-audit gate: error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print_report(report, console)
    return EXIT_PASS if report.passed else EXIT_BREACH
