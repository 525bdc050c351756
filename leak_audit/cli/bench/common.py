"""What every ``leak-audit bench`` command shares: bad input, list options, and the outputs (JSON file,
markdown report, console table width, "wrote ..." lines).

Light on purpose (no torch at import): the benchmarks' option parsing and their outputs do not need it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence, Collection
from pathlib import Path
from typing import Any

from rich.console import Console

__all__ = [
    "BenchError",
    "command_line",
    "default_data_path",
    "fmt",
    "intra_op_threads",
    "markdown_report",
    "parse_batch_sizes",
    "parse_list",
    "parse_niceness",
    "resolve_accelerator",
    "wide_console",
    "write_json",
    "write_markdown",
    "wrote",
]


REPO = Path(__file__).resolve().parents[3]
"""The source checkout (the default data sits beside it, in ``../shared/data``)."""


class BenchError(ValueError):
    """Bad benchmark input: a malformed option, an unknown view, module, layer or attack, unusable data."""


def parse_list(text: str, option: str) -> list[str]:
    """Split a comma-separated option value into its stripped, non-empty items.

    Raises:
        BenchError: the value is empty, holds an empty item (``"a,,b"``), or repeats an item.
    """
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise BenchError(f"{option} {text!r} has an empty item; give comma-separated values without blanks")
    repeated = sorted({s for s in items if items.count(s) > 1})
    if repeated:
        raise BenchError(f"{option} {text!r} repeats {', '.join(repr(s) for s in repeated)}")
    return items


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``.

    Raises:
        BenchError: an item is not a positive integer (the message names it), or see :func:`parse_list`.
    """
    sizes = []
    for item in parse_list(text, "--batch-sizes"):
        try:
            size = int(item)
        except ValueError:
            raise BenchError(f"--batch-sizes: {item!r} is not an integer (e.g. --batch-sizes 1,4,16)") from None
        if size < 1:
            raise BenchError(f"--batch-sizes: batch size {size} must be >= 1")
        sizes.append(size)
    return sizes


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (``args.argv`` when set, else ``sys.argv``), echoed in markdown reports."""
    argv = getattr(args, "argv", None)
    return "leak-audit " + shlex.join(argv if argv is not None else sys.argv[1:])


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or ``"–"`` for ``None`` and NaN (a metric not reported)."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_report(
    title: str,
    command: str,
    facts: Mapping[str, Any],
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    note: str,
    numeric: Collection[str] = (),
) -> str:
    """A benchmark's markdown report: ``# title``, the command line that produced it, the run's facts as a
    list, one table row per result, then a note on the columns.

    Args:
        title: the heading (``"leak-audit bench text"``).
        command: the exact command line (:func:`command_line`).
        facts: ``{name: value}`` shown as ``- name: value`` (model, seed, versions, ...).
        columns: the table's headers.
        rows: the cells of each row, as text (``|`` is escaped).
        note: the paragraph under the table.
        numeric: headers of right-aligned columns.
    """
    lines = [f"# {title}", "", "```", command, "```", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    if facts:
        lines.append("")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]
    lines += ["", note, ""]
    return "\n".join(lines)


def write_json(document: Any, path: str | Path) -> Path:
    """Write ``document`` (the rows, or a mapping holding them) as indented JSON, creating parent folders.

    Raises:
        ValueError: a value is NaN or infinite (JSON has neither).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_markdown(text: str, path: str | Path) -> Path:
    """Write the markdown report (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def wrote(console: Console, path: Path) -> None:
    """Say that ``path`` was written."""
    console.print(f"wrote {path}", markup=False, highlight=False)


def wide_console(console: Console) -> Console:
    """``console`` itself on a terminal (which wraps tables to its width); a pipe or file gets a console of
    at least 200 columns, so wide tables are not squeezed."""
    return console if console.is_terminal else Console(file=console.file, width=max(console.width, 200))


def default_data_path(name: str = "cola_dev.tsv") -> Path:
    """``$LEAK_AUDIT_DATA/<name>`` when that variable is set, else ``<repo>/../shared/data/<name>``."""
    folder = os.environ.get("LEAK_AUDIT_DATA")
    return Path(folder) / name if folder else REPO.parent / "shared" / "data" / name


def parse_niceness(text: str) -> int | None:
    """``"19"`` -> ``19``; ``"none"`` -> ``None`` (leave the worker's nice value alone).

    Raises:
        BenchError: neither ``none`` nor an integer in 0..19.
    """
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise BenchError(f"--worker-niceness must be an integer in 0..19 or 'none', got {text!r}") from None
    if not 0 <= value <= 19:
        raise BenchError(f"--worker-niceness must be in 0..19 or 'none', got {value}")
    return value


def resolve_accelerator(choice: str, cuda_available: bool) -> str:
    """``"auto"`` -> ``"cuda"`` when CUDA is available, else ``"cpu"``; ``"cpu"``/``"cuda"`` as given.

    Raises:
        BenchError: ``"cuda"`` without a CUDA device, or an unknown choice.
    """
    if choice == "auto":
        return "cuda" if cuda_available else "cpu"
    if choice == "cuda" and not cuda_available:
        raise BenchError("--accelerator cuda: torch sees no CUDA device (use --accelerator cpu or auto)")
    if choice not in ("cpu", "cuda"):
        raise BenchError(f"--accelerator must be auto, cpu or cuda, got {choice!r}")
    return choice
