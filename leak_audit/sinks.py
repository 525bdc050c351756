"""Where audit results go: the durable audit log, every Lightning logger, and W&B extras.

All sinks are called on the Trainer's thread, on global rank zero only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leak_audit.records import AuditRecord

PRIVACY_KEYS: tuple[str, ...] = (
    "epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "noise_std",
)
"""The numeric fields of a record's ``privacy`` dict that go to the loggers as ``privacy/<key>``."""

__all__ = ["PRIVACY_KEYS", "AuditLog", "flatten_metrics", "log_to_loggers", "log_samples_to_wandb", "wandb_loggers"]


class AuditLog:
    """Append-only ``audit.jsonl``: each record is one line, flushed and fsynced before ``write`` returns.

    Opening never truncates: a resumed run appends to the same file, and records already written are
    never rewritten.

    Args:
        path: file to append to; parent directories are created.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        self._fh.write("".join(r.to_json() + "\n" for r in records))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    @property
    def closed(self) -> bool:
        return self._fh.closed


def flatten_metrics(records: Sequence[AuditRecord]) -> dict[str, float]:
    """Scalars for loggers from one audit's records.

    ``leak/<attack>/<metric>`` per successful attack, ``leak/max/<metric>`` the worst case over attacks
    (every metric grows with leakage), ``audit/seconds`` the audit's total attack time, and with DP-SGD
    ``privacy/<key>`` for :data:`PRIVACY_KEYS` (``privacy/epsilon`` is absent when ε is infinite or
    could not be computed; the audit log's ``privacy.error`` says why).
    """
    out: dict[str, float] = {}
    worst: dict[str, float] = {}
    for r in records:
        if r.status != "ok":
            continue
        for name, value in r.metrics.items():
            out[f"leak/{r.attack}/{name}"] = float(value)
            worst[name] = max(worst.get(name, float("-inf")), float(value))
    out.update({f"leak/max/{k}": v for k, v in worst.items()})
    privacy = next((r.privacy for r in records if r.privacy), None)
    if privacy:
        for key in PRIVACY_KEYS:
            value = privacy.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"privacy/{key}"] = float(value)
    if records:
        out["audit/seconds"] = float(sum(r.seconds for r in records))
        out["audit/failed"] = float(sum(r.status == "failed" for r in records))
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


def log_samples_to_wandb(loggers: Sequence[Any], records: Sequence[AuditRecord], step: int) -> None:
    """A ``wandb.Table`` of original vs reconstructed text per audit (only called with ``log_samples``)."""
    targets = wandb_loggers(loggers)
    rows = [
        [step, r.attack, s.get("reference", ""), s.get("reconstruction", ""), s.get("rouge1")]
        for r in records
        if r.samples
        for s in r.samples
    ]
    if not targets or not rows:
        return
    import wandb

    for lg in targets:
        table = wandb.Table(columns=["step", "attack", "original", "reconstruction", "rouge1"], data=rows)
        lg.experiment.log({"leak/samples": table, "trainer/global_step": step})
