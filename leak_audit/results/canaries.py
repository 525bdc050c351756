"""What the canaries certify, said and logged on rank zero: how much ``m`` canaries can certify at δ (once, when
they are placed) and the empirical ε over the whole run (at the end of training).

The per-audit values ride in each audit record's ``privacy`` field (:class:`~leak_audit.runtime.job.AuditJob`);
the statistics are :mod:`leak_audit.metrics.epsilon`.
"""

from __future__ import annotations


from leak_audit.capture.canaries import DiracCanaries
from leak_audit.metrics.epsilon import canary_privacy, epsilon_ceiling

__all__ = ["announce_canaries", "final_canary_metrics"]


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


def final_canary_metrics(canaries: DiracCanaries, delta: float) -> dict[str, float]:
    """``privacy/<key>`` of :func:`~leak_audit.metrics.epsilon.canary_privacy` over every step so far."""
    scores = canaries.scores()
    return {f"privacy/{k}": float(v) for k, v in canary_privacy(scores.llr, scores.included, delta).items()}

