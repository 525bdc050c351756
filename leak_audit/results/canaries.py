"""What the canaries certify, said and logged on rank zero: how much ``m`` canaries can certify at δ (once, when
they are placed) and the empirical ε over the whole run (at the end of training, as the audit log's closing
record, :data:`~leak_audit.results.records.CANARY_RECORD`).

The per-audit values ride in each audit record's ``privacy`` field (:class:`~leak_audit.runtime.job.AuditJob`);
the statistics are :mod:`leak_audit.metrics.epsilon`.
"""

from __future__ import annotations


from leak_audit.capture.privacy import DPRelease
from leak_audit.metrics.epsilon import canary_privacy, epsilon_ceiling
from leak_audit.results.records import CANARY_RECORD, AuditRecord

__all__ = ["announce_canaries", "final_canary_record"]


def announce_canaries(count: int, delta: float) -> float:
    """Say what ``count`` canaries can certify at ``delta``; warn when it is under 1 (the one-run bound pays
    ``2·m·δ``, so a large δ such as ``1/N`` for a small train set leaves nothing). Returns the ceiling."""
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    ceiling = epsilon_ceiling(count, delta)
    if ceiling < 1.0:
        rank_zero_warn(f"LeakageAudit: {count} canaries can certify at most epsilon {ceiling:.2f} at delta={delta:g} "
                       f"(the one-run bound pays 2*m*delta); pass a smaller delta= (at 1e-5: "
                       f"{epsilon_ceiling(count, 1e-5):.2f})")
    else:
        rank_zero_info(f"LeakageAudit: {count} Dirac canaries in DP-SGD; they can certify epsilon up to {ceiling:.2f} "
                       f"at delta={delta:g}")
    return ceiling


def final_canary_record(dp: DPRelease, *, step: int, epoch: int, audit: int) -> AuditRecord:
    """The record that closes a run with canaries: ``attack`` :data:`~leak_audit.results.records.CANARY_RECORD`,
    status ``ok``, no metrics; ``privacy`` holds the accountant's ε at ``dp.delta`` after the last step and
    :func:`~leak_audit.metrics.epsilon.canary_privacy` over every step (``epsilon_empirical``,
    ``epsilon_empirical_ceiling``, ``epsilon_empirical_gdp``, ``canaries``).

    Raises:
        ValueError: ``dp`` carries no canaries.
    """
    if dp.canaries is None:
        raise ValueError("final_canary_record needs a DPRelease with canaries (place_canaries)")
    state = dp.state()
    privacy = state.report(dp.delta).to_dict()
    scores = state.canaries
    assert scores is not None  # DPRelease.state() copies them when canaries are placed
    privacy.update(canary_privacy(scores.llr, scores.included, dp.delta))
    return AuditRecord(step=step, attack=CANARY_RECORD, status="ok", epoch=epoch, audit=audit, privacy=privacy,
                       info={"private_steps": state.steps})
