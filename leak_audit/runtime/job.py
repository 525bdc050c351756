"""One audit as a worker runs it: the auditor on a snapshot, plus what the run adds to each record.

:class:`AuditJob` is the ``fn`` / ``on_error`` pair handed to a worker (:mod:`leak_audit.runtime.worker`):
it completes a snapshot whose frozen weights the worker holds itself, moves it to the attack device, runs
the :class:`~leak_audit.runtime.auditor.Auditor` while sampling memory, adds ε under DP-SGD, the snapshot's
size and its capture time, and passes the records to ``finish`` (which writes them to the audit log).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import Tensor

from leak_audit.capture.snapshot import AuditSnapshot
from leak_audit.metrics.epsilon import canary_privacy
from leak_audit.results.records import AuditRecord
from leak_audit.runtime.auditor import Auditor, failed_records
from leak_audit.runtime.memory import PeakMemory

__all__ = ["AuditJob"]

Finish = Callable[[list[AuditRecord]], list[AuditRecord]]


def _unchanged(records: list[AuditRecord]) -> list[AuditRecord]:
    return records


class AuditJob:
    """Runs ``auditor`` on snapshots on the worker's side, and turns a crash into failed records.

    Args:
        auditor: the run's auditor.
        device: where the attacks run (``None``: where the snapshot is).
        delta: δ at which ε is reported for DP snapshots, in ``(0, 1)``.
        resident: ``{name: parameter}`` the worker can read itself: parameters the snapshot leaves out
            (frozen weights a forked worker holds since the fork) are taken from here. In a forked child this
            is the child's own copy.
        finish: called with every audit's records before they are returned (e.g. to stamp and write them);
            its result is what the worker hands back.
    """

    def __init__(
        self,
        auditor: Auditor,
        *,
        device: torch.device | None = None,
        delta: float = 1e-5,
        resident: Mapping[str, Tensor] | None = None,
        finish: Finish = _unchanged,
    ) -> None:
        self.auditor = auditor
        self.device = device
        self.delta = delta
        self.resident = dict(resident or {})
        self.finish = finish

    def run(self, snap: AuditSnapshot) -> list[AuditRecord]:
        """One record per attack of the audit of ``snap``, with ``info["snapshot_bytes"]``,
        ``info["capture_seconds"]``, ``info["peak_bytes"]`` (when memory can be read) and, under DP-SGD,
        ``privacy`` (ε at :attr:`delta`).

        Raises:
            KeyError: the snapshot leaves out a parameter the attacks need that is not :attr:`resident`.
        """
        missing = [n for n in self.auditor.param_names if n not in snap.params]
        if missing:  # frozen weights left out of a forked worker's snapshot: its fork-time copy
            snap = replace(snap, params={**snap.params, **{n: self.resident[n].detach() for n in missing}})
        if self.device is not None:
            snap = snap.to(self.device)
        with PeakMemory(self.device) as peak:
            records = self.auditor(snap, audit=snap.audit)
        if snap.dp is not None:
            privacy = snap.dp.report(self.delta).to_dict()
            if snap.dp.canaries is not None:
                privacy.update(canary_privacy(snap.dp.canaries.llr, snap.dp.canaries.included, self.delta))
            for r in records:
                r.privacy = privacy
        for r in records:
            r.info.setdefault("snapshot_bytes", snap.copied_bytes)
            if peak.bytes is not None:
                r.info.setdefault("peak_bytes", peak.bytes)
            r.info.setdefault("capture_seconds", round(float(snap.capture_seconds), 6))
        return self.finish(records)

    def crashed(self, snap: AuditSnapshot, exc: BaseException) -> list[AuditRecord]:
        """The audit of ``snap`` failed as a whole with ``exc``: one failed record per attack."""
        names = [a.name for a in self.auditor.attacks]
        return self.finish(failed_records(snap, names, exc, snap.audit))
