"""The ``leak-audit`` command line. Subcommands import their heavy dependencies only when they run."""

from leak_audit.cli.main import main

__all__ = ["main"]
