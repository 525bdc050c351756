"""The ``leak-audit`` command line: one table of subcommands, each imported only when it runs.

``leak-audit gate AUDIT.jsonl [--policy leak-policy.toml] [--max rouge1=0.5 ...] [--run all|last|ID]
[--format text|json|junit] [--output FILE]`` evaluates a leakage policy (:mod:`leak_audit.gate.policy`; ``--max``
adds max rules) on the log's training runs (every run by default) and prints one row per rule; it exits 0 when
no rule fails (warnings included), 1 on a breach (or a metric no record in a rule's scope reports), and 2 on bad
input (missing or malformed log or policy, unknown metric, a ``--run`` the log does not hold, no successful audit).
``--format json|junit`` prints the machine-readable report instead, or writes it to ``--output FILE`` and prints the
table (:mod:`leak_audit.cli.gate`).

``leak-audit report AUDIT.jsonl [-o OUT.html] [--run all|last|ID]`` writes a self-contained HTML page of an audit log
(:mod:`leak_audit.cli.report`).

``leak-audit bench text --data FILE.tsv [--views full,layer:0,linear:MODULE] [--attacks best|NAME,...] ...``
runs the attacks on real sentences and reports per-attack leakage and seconds per batch (see
:mod:`leak_audit.cli.bench.text`); it exits 0 on success and 2 on bad input.

``leak-audit bench image --data FILE.npz [--batch-sizes 1,4,8] [--attacks dlg,inverting_gradients]`` does the
same for images (PSNR, SSIM, LPIPS; :mod:`leak_audit.cli.bench.image`).

``leak-audit bench overhead --steps 300 --every-n-steps 50 [--attacks NAME,...] [--data FILE.tsv] ...`` times
training steps of the pretrained MiniLM with and without ``LeakageAudit`` in interleaved runs (steps/s,
slowdown ratio, audits ok/skipped/failed, audit latency; :mod:`leak_audit.cli.bench.overhead`).

Each subcommand is a :class:`Command`: the module that defines its arguments and runs it is imported only
when the command line names that subcommand, so ``leak-audit gate`` (the CI check) imports the log reader
and the gate, never torch, Lightning or the attacks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """One subcommand of ``leak-audit``.

    Attributes:
        path: the words that name it, e.g. ``("gate",)`` or ``("bench", "text")``.
        module: the module that defines it, imported only when the command line names it.
        add_arguments: name of the module's ``(parser) -> None`` function that adds its arguments.
        run: name of the module's ``(args, console) -> exit code`` function.
        help: one line in the parent's ``--help``.
        description: the text of its own ``--help``.
    """

    path: tuple[str, ...]
    module: str
    add_arguments: str
    run: str
    help: str
    description: str

    def function(self, name: str) -> Callable[..., Any]:
        """The module's function ``name`` (importing the module)."""
        return getattr(importlib.import_module(self.module), name)  # type: ignore[no-any-return]


GROUPS: dict[tuple[str, ...], tuple[str, str]] = {
    ("bench",): ("benchmark the attacks on real data", "Benchmark the attacks."),
}
"""Subcommands that only hold subcommands: ``path -> (help, description)``."""

COMMANDS: tuple[Command, ...] = (
    Command(
        ("gate",), "leak_audit.cli.gate", "add_gate_arguments", "gate_command",
        "fail (exit 1) when an audit log breaks a leakage policy or thresholds",
        "Evaluate a leakage policy (--policy, and/or --max rules) on an audit log: every training run it holds, or "
        "the one --run names. "
        "Exit 0: pass (warnings included). 1: a rule fails (a value beyond its limit, or no successful audit "
        "in its scope reports the metric). 2: bad input (missing or malformed log or policy, unknown metric, "
        "a --run the log does not hold, no successful audit).",
    ),
    Command(
        ("report",), "leak_audit.cli.report.command", "add_report_arguments", "report_command",
        "write a self-contained HTML page (summary, gate verdict, plots, audit table) of an audit log",
        "Exit 0: page written, whatever the verdict (a breach is shown, not enforced: use "
        "'leak-audit gate' to fail a release). 2: bad input (missing or malformed log, a --run the log does not hold, "
        "bad policy, unwritable output).",
    ),
    Command(
        ("bench", "text"), "leak_audit.cli.bench.text", "add_text_arguments", "bench_text_command",
        "per-attack leakage and seconds per batch on sentences, per gradient view and batch size",
        "Exit 0: done. 2: bad input (unknown view, module, layer or attack; unreadable data).",
    ),
    Command(
        ("bench", "image"), "leak_audit.cli.bench.image", "add_image_arguments", "bench_image_command",
        "PSNR/SSIM/LPIPS of image reconstructions (DLG, Inverting Gradients) per batch size",
        "Exit 0: done. 2: bad input (unreadable data, unknown attack, bad option).",
    ),
    Command(
        ("bench", "canary"), "leak_audit.cli.bench.canary", "add_canary_arguments", "bench_canary_command",
        "empirical epsilon of Dirac canaries against the accountant's, honest and with injected faults",
        "Train with Opacus DP-SGD and Dirac canaries, and compare the one-run empirical lower bound on epsilon "
        "(Steinke, Nasr, Jagielski 2023) with the accountant's epsilon. Exit 0: done. 2: bad input.",
    ),
    Command(
        ("bench", "overhead"), "leak_audit.cli.bench.overhead", "add_overhead_arguments", "bench_overhead_command",
        "training steps/s with and without LeakageAudit (pretrained MiniLM, interleaved runs)",
        "Time optimizer steps of the pretrained MiniLM on real sentences without and with "
        "LeakageAudit, in interleaved runs (baseline, audit, ...; same seed and data order). "
        "Exit 0: done. 2: bad input (missing data file, unknown attack or module, bad option).",
    ),
)
"""Every subcommand, in ``--help`` order."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``leak-audit`` parser.

    Args:
        argv: the command line the parser is for (without the program name): only the subcommand it names
            gets its arguments, so only that subcommand's module is imported. ``None``: every subcommand
            gets its arguments (every module is imported).
    """
    parser = argparse.ArgumentParser(prog="leak-audit", description="Audit gradient leakage in training runs.")
    subparsers = {(): parser.add_subparsers(dest="command", required=True)}
    for command in COMMANDS:
        for depth in range(1, len(command.path)):  # the groups on the way, once each
            group = command.path[:depth]
            if group not in subparsers:
                help_text, description = GROUPS[group]
                sub = subparsers[group[:-1]].add_parser(group[-1], help=help_text, description=description)
                subparsers[group] = sub.add_subparsers(dest=f"{'_'.join(group)}_command", required=True)
        sub = subparsers[command.path[:-1]].add_parser(command.path[-1], help=command.help,
                                                       description=command.description)
        if argv is None or tuple(argv[: len(command.path)]) == command.path:
            command.function(command.add_arguments)(sub)
        sub.set_defaults(command_spec=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leak-audit`` console script; returns the exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words)
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # argparse exits 2 on usage errors, as we do on bad input
        return int(exc.code or 0)
    args.argv = words
    command: Command = args.command_spec
    from rich.console import Console

    return int(command.function(command.run)(args, Console()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
