"""Where audit results go: the durable audit log and every Lightning logger (W&B views: :mod:`leak_audit.results.wandb_dashboard`).

All sinks are called on the Trainer's thread, on global rank zero only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from leak_audit.results.records import PICK, AuditLogError, AuditRecord, read_audit_log, run_ids

PRIVACY_KEYS: tuple[str, ...] = (
    "epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "noise_std",
    "epsilon_empirical", "epsilon_empirical_ceiling", "epsilon_empirical_gdp", "canaries",
)
"""The numeric fields of a record's ``privacy`` dict that go to the loggers as ``privacy/<key>``."""

MEMORY_KEYS: tuple[str, ...] = ("snapshot_bytes", "peak_bytes")
"""Per-audit memory figures in a record's ``info`` that go to the loggers as ``audit/<key>`` (bytes)."""

__all__ = ["MEMORY_KEYS", "PRIVACY_KEYS", "AuditLog", "flatten_metrics", "log_to_loggers", "note_earlier_runs",
           "wandb_loggers"]


class AuditLog:
    """Append-only ``audit.jsonl``: each record is one line, fsynced before ``write`` returns.

    Opening never truncates: a resumed run appends to the same file, and records already written are
    never rewritten. Each ``write`` is one ``os.write`` of whole lines on an ``O_APPEND`` descriptor, so a
    process killed at any moment (SIGKILL included) leaves only whole lines behind; ``write`` is
    thread-safe (the worker writes finished audits itself, the Trainer's thread writes skipped ones).

    Args:
        path: file to append to; parent directories are created.
        run: the training run's id (:func:`~leak_audit.results.records.new_run_id`), written into every record
            whose ``run`` is empty; the callback sets it at ``on_train_start``, once a resumed run has its
            checkpoint's.
    """

    def __init__(self, path: str | os.PathLike[str], run: str = "") -> None:
        self.path = Path(path)
        self.run = run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Append ``records``, one JSON line each, and fsync; records without a ``run`` get this log's.

        Raises:
            ValueError: the log was closed.
        """
        if not records:
            return
        for r in records:
            r.run = r.run or self.run
        data = "".join(r.to_json() + "\n" for r in records).encode("utf-8")
        with self._lock:
            if self._fd is None:
                raise ValueError(f"the audit log {self.path} is closed")
            view = memoryview(data)
            while view:  # a regular file takes it in one call; loop only for the short-write corner case
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the log file (idempotent)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None


def note_earlier_runs(path: str | os.PathLike[str], run: str) -> int:
    """Warn (rank zero) when the audit log at ``path`` already holds records of runs other than ``run``, and
    return how many: a new run appends to them, and ``leak-audit gate``/``report`` judge every run of the log
    unless told ``--run last`` or a run id. A missing or unreadable log counts none (the gate reports a bad one)."""
    try:
        records = read_audit_log(path) if Path(path).is_file() else []
    except AuditLogError:
        return 0
    others = [r for r in records if r.run != run]
    if others:
        n, k = len(others), len(run_ids(others))
        rank_zero_warn(f"LeakageAudit: {path} already holds {n} record{'s' * (n != 1)} of {k} earlier "
                       f"run{'s' * (k != 1)}; this run ({run!r}) appends to it. `leak-audit gate` and `leak-audit report` "
                       "read every run of it unless given --run last (or --run ID); a new log_dir keeps runs apart")
    return len(others)


def flatten_metrics(records: Sequence[AuditRecord]) -> dict[str, float]:
    """Scalars for loggers from one audit's records.

    ``leak/<attack>/<metric>`` per successful attack, ``leak/max/<metric>`` the oracle's worst case over
    attacks (each scored against the real batch; every metric grows with leakage; with records of several
    ranks, the worst rank), ``leak/pick/<metric>`` the attacker's pick (the record marked
    :data:`~leak_audit.results.records.PICK`: what an attacker without the answer keeps; with several ranks, the
    worst rank's), ``audit/seconds`` the audit's total attack time, ``audit/timeout`` and ``audit/failed``
    the attacks stopped by their budget or failed (a timed-out attack reports no ``leak/`` value), ``audit/snapshot_bytes`` and ``audit/peak_bytes`` (:data:`MEMORY_KEYS`), and
    with DP-SGD
    ``privacy/<key>`` for :data:`PRIVACY_KEYS` (``privacy/epsilon`` is absent when ε is infinite or
    could not be computed; the audit log's ``privacy.error`` says why).
    """
    out: dict[str, float] = {}
    worst: dict[str, float] = {}
    for r in records:
        if r.status != "ok":
            continue
        for name, value in r.metrics.items():
            key = f"leak/{r.attack}/{name}"  # several ranks' records (scope="local"): the worst
            out[key] = max(out.get(key, float("-inf")), float(value))
            worst[name] = max(worst.get(name, float("-inf")), float(value))
    out.update({f"leak/max/{k}": v for k, v in worst.items()})
    for r in records:
        if r.status == "ok" and r.info.get(PICK):
            for name, value in r.metrics.items():
                key = f"leak/pick/{name}"
                out[key] = max(out.get(key, float("-inf")), float(value))
    privacy = next((r.privacy for r in records if r.privacy), None)
    if privacy:
        for key in PRIVACY_KEYS:
            value = privacy.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"privacy/{key}"] = float(value)
    if records:
        out["audit/seconds"] = float(sum(r.seconds for r in records))
        out["audit/failed"] = float(sum(r.status == "failed" for r in records))
        out["audit/timeout"] = float(sum(r.status == "timeout" for r in records))
    for key in MEMORY_KEYS:
        values = [float(r.info[key]) for r in records if isinstance(r.info.get(key), int | float)]
        if values:
            out[f"audit/{key}"] = max(values)
    return out


def log_to_loggers(loggers: Sequence[Any], metrics: dict[str, float], step: int) -> None:
    """``logger.log_metrics(metrics, step)`` on every logger, as Lightning's ``LearningRateMonitor`` does."""
    if not metrics:
        return
    for logger in loggers:
        logger.log_metrics(metrics, step=step)


def wandb_loggers(loggers: Sequence[Any]) -> list[Any]:
    """The ``WandbLogger`` instances among ``loggers``."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning is a dependency
        return []
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]
