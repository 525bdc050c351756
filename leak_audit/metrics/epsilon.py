"""An empirical lower bound on ε from canaries: privacy auditing with one training run.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023. Each of ``m``
canaries is included in training independently with probability ½. After training the auditor scores every
canary, guesses "in" for the ``k₊`` highest scores and "out" for the ``k₋`` lowest (abstaining on the rest),
and counts ``v`` correct guesses out of ``r = k₊ + k₋``. If training is (ε, δ)-DP, ``v`` is stochastically
dominated by ``Binomial(r, e^ε / (1 + e^ε))`` up to a δ term (their Theorem 5.2 with the δ bound of
Proposition 5.7, stated as Algorithm 2):

    p(ε) = P[Binomial(r, q) ≥ v] + 2·m·δ · max_{1 ≤ i ≤ v} P[v − i ≤ Binomial(r, q) < v] / i,   q = e^ε / (1 + e^ε)

is a valid p-value for the hypothesis "the training is (ε, δ)-DP". Every ε with ``p(ε) < 1 − confidence`` is
rejected, so the largest such ε is a lower bound on the true ε at δ that holds with that confidence.

The split ``(k₊, k₋)`` is chosen after seeing the scores, over a fixed grid of :func:`split_grid` splits;
the confidence is divided among them (Bonferroni), so the best split's bound stays valid. The *ceiling* is
the bound when every guess of a split is right: no run with ``m`` canaries can certify more, whatever its
score (for ``m = 1000`` at δ = 0 and one prechosen split of all 1,000 guesses, 5.8; with this module's six
splits, 5.3; 5.27 at δ = 1e-5).

:func:`empirical_epsilon` is the functional form, :class:`EmpiricalEpsilon` its result. Scores and the
membership truth come from :mod:`leak_audit.capture.canaries`; this is the only code that compares them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

__all__ = ["EmpiricalEpsilon", "canary_privacy", "empirical_epsilon", "epsilon_ceiling", "gdp_epsilon", "gdp_mu_lower_bound",
           "one_run_epsilon", "one_run_p_value", "split_grid"]

_EPS_MAX = 60.0  # q = e^ε/(1+e^ε) is 1 in float64 beyond about 37: no larger ε is distinguishable


def _check(m: int, guesses: int, correct: int, delta: float) -> None:
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got correct={correct}, guesses={guesses}, m={m}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The p-value of "(ε, δ)-DP" after ``correct`` of ``guesses`` right guesses on ``m`` canaries.

    Steinke, Nasr, Jagielski (NeurIPS 2023), Theorem 5.2 and Proposition 5.7 (module docstring).

    Args:
        m: canaries, each included with probability ½.
        guesses: ``r = k₊ + k₋`` guesses made (the rest abstained).
        correct: ``v`` right guesses.
        epsilon: ε ≥ 0 under test.
        delta: δ in ``[0, 1)``.

    Returns:
        ``p`` in ``[0, 1]``; small ``p`` rejects (ε, δ)-DP.

    Raises:
        ValueError: not ``0 ≤ correct ≤ guesses ≤ m``, ``epsilon < 0`` or ``delta`` outside ``[0, 1)``.
    """
    _check(m, guesses, correct, delta)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if correct == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(correct - 1, guesses, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0:
        pmf = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, correct + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def one_run_epsilon(m: int, guesses: int, correct: int, delta: float, alpha: float = 0.05) -> float:
    """The largest ε rejected at level ``alpha``: ``sup {ε : p(ε) < alpha}`` (:func:`one_run_p_value`), 0.0 if none.

    ``p(ε)`` grows with ε, so the bound is found by bisection to 1e-4 in ε.

    Raises:
        ValueError: as :func:`one_run_p_value`, or ``alpha`` outside ``(0, 1)``.
    """
    _check(m, guesses, correct, delta)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if one_run_p_value(m, guesses, correct, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, _EPS_MAX
    if one_run_p_value(m, guesses, correct, hi, delta) < alpha:
        return hi
    while hi - lo > 1e-4:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, guesses, correct, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def split_grid(m: int) -> tuple[tuple[int, int], ...]:
    """The ``(k₊, k₋)`` splits tried on ``m`` canaries: "in" for the top ``m/32 … m/2`` scores (five one-sided
    splits, where scores of included canaries stand out), and all ``m`` guessed (top half in, bottom half out).
    Duplicates and empty splits are dropped.

    Raises:
        ValueError: ``m < 1``.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    splits = [(max(1, m // f), 0) for f in (32, 16, 8, 4, 2)] + [((m + 1) // 2, m // 2)]
    return tuple(dict.fromkeys(s for s in splits if sum(s) > 0 and s[0] + s[1] <= m))


def epsilon_ceiling(m: int, delta: float, confidence: float = 0.95,
                    splits: Sequence[tuple[int, int]] | None = None) -> float:
    """The most ε that ``m`` canaries can certify: the bound when every guess of the best split is right.

    Args:
        m: canaries.
        delta: δ in ``[0, 1)``.
        confidence: of the bound, in ``(0, 1)``; divided among the splits as in :func:`empirical_epsilon`.
        splits: ``(k₊, k₋)`` splits (default :func:`split_grid`).

    Raises:
        ValueError: ``m < 1``, ``delta`` or ``confidence`` out of range.
    """
    splits = tuple(splits) if splits is not None else split_grid(m)
    alpha = _alpha(confidence, len(splits))
    return max(one_run_epsilon(m, k1 + k2, k1 + k2, delta, alpha) for k1, k2 in splits)


def _alpha(confidence: float, n_splits: int) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return (1.0 - confidence) / max(1, n_splits)


@dataclass(frozen=True)
class EmpiricalEpsilon:
    """An empirical lower bound on ε from one run's canaries.

    Attributes:
        epsilon: the largest ε rejected at ``confidence`` (0.0 when nothing is rejected): the training is not
            (ε', δ)-DP for any ε' below it, with that confidence.
        ceiling: the most ``canaries`` can certify (:func:`epsilon_ceiling`).
        canaries: ``m``.
        guesses: ``k₊ + k₋`` of the split that gave ``epsilon``.
        correct: right guesses of that split.
        split: ``(k₊, k₋)``.
        delta: δ.
        confidence: of the bound, over all splits tried.
    """

    epsilon: float
    ceiling: float
    canaries: int
    guesses: int
    correct: int
    split: tuple[int, int]
    delta: float
    confidence: float


def empirical_epsilon(scores: Tensor, included: Tensor, delta: float, confidence: float = 0.95,
                      splits: Sequence[tuple[int, int]] | None = None) -> EmpiricalEpsilon:
    """A lower bound on ε from canary scores (Steinke, Nasr, Jagielski 2023; module docstring).

    Args:
        scores: ``[m]`` float, higher = more likely included (e.g.
            :meth:`~leak_audit.capture.canaries.DiracCanaries.scores`). Ties are broken by index.
        included: ``[m]`` bool, the truth: which canaries took part in training.
        delta: δ in ``[0, 1)`` (the accountant's δ, to compare ε at the same δ).
        confidence: of the bound over all splits (Bonferroni over ``splits``), in ``(0, 1)``.
        splits: ``(k₊, k₋)`` guesses to try (default :func:`split_grid`): "in" for the ``k₊`` highest scores,
            "out" for the ``k₋`` lowest.

    Returns:
        :class:`EmpiricalEpsilon` of the best split.

    Raises:
        ValueError: ``scores`` and ``included`` not of one shape ``[m]`` with ``m ≥ 1``, a NaN score, a split
            with ``k₊ + k₋ > m``, or ``delta``/``confidence`` out of range.
    """
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64).reshape(-1)
    truth = torch.as_tensor(included).detach().to("cpu").reshape(-1).bool()
    m = scores.numel()
    if m < 1 or truth.numel() != m:
        raise ValueError(f"scores and included must both be [m] with m >= 1, got {scores.numel()} and {truth.numel()}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    splits = tuple(splits) if splits is not None else split_grid(m)
    for k1, k2 in splits:
        if k1 < 0 or k2 < 0 or k1 + k2 > m:
            raise ValueError(f"split (k_in={k1}, k_out={k2}) needs 0 <= k_in + k_out <= m = {m}")
    alpha = _alpha(confidence, len(splits))
    order = torch.argsort(scores, descending=True, stable=True)
    ranked = truth[order]
    hits_top = torch.cumsum(ranked.long(), 0)  # included among the top k
    outs_bottom = torch.cumsum((~ranked.flip(0)).long(), 0)  # excluded among the bottom k
    best = None
    for k1, k2 in splits:
        v = (int(hits_top[k1 - 1]) if k1 else 0) + (int(outs_bottom[k2 - 1]) if k2 else 0)
        eps = one_run_epsilon(m, k1 + k2, v, delta, alpha)
        if best is None or eps > best[0]:
            best = (eps, k1 + k2, v, (k1, k2))
    assert best is not None
    ceiling = max(one_run_epsilon(m, k1 + k2, k1 + k2, delta, alpha) for k1, k2 in splits)
    return EmpiricalEpsilon(best[0], ceiling, m, best[1], best[2], best[3], delta, confidence)


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε at ``delta`` of a μ-GDP mechanism (Dong, Roth, Su 2022, Corollary 2.13):
    ``δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2)``, solved for ε by bisection (0.0 when ``δ(0) ≤ delta``).

    Raises:
        ValueError: ``mu < 0`` or ``delta`` outside ``(0, 1)``.
    """
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")

    def delta_of(eps: float) -> float:
        return float(stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2))

    if mu == 0 or delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-4:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def gdp_mu_lower_bound(scores: Tensor, included: Tensor, confidence: float = 0.95,
                       tops: Sequence[int] | None = None) -> float:
    """A lower bound on μ, assuming the training is μ-GDP: the second, tighter but model-based estimate.

    A μ-GDP mechanism lets no test beat ``TPR = Φ(Φ⁻¹(FPR) + μ)``. For the test "included if among the top
    ``k`` scores" the Clopper–Pearson bounds ``TPR ≥ TPR_lo`` and ``FPR ≤ FPR_hi`` (each at level ``α/2``) give
    ``μ ≥ Φ⁻¹(TPR_lo) − Φ⁻¹(FPR_hi)``; the largest over ``tops`` is returned, the confidence divided among them
    (Bonferroni). The approach of Nasr et al. (USENIX Security 2023, "Tight auditing of differentially private
    machine learning") and of jax_privacy's canary auditor. DP-SGD over many steps is close to GDP (the
    central limit theorem of Dong, Roth, Su), but not exactly; :func:`empirical_epsilon` needs no such model.
    The threshold of "top ``k``" is read from the pooled scores, so it depends slightly on the data, which the
    Clopper–Pearson intervals treat as fixed: one more reason this estimate is not the gate's.

    Args:
        scores: ``[m]`` float, higher = more likely included.
        included: ``[m]`` bool, the truth.
        confidence: in ``(0, 1)``.
        tops: the ``k`` to try (default ``m/32 … m/2``, as :func:`split_grid`).

    Raises:
        ValueError: shapes differ, fewer than one included and one excluded canary, or ``confidence`` out of range.
    """
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64).reshape(-1)
    truth = torch.as_tensor(included).detach().to("cpu").reshape(-1).bool()
    m = scores.numel()
    n_in, n_out = int(truth.sum()), int((~truth).sum())
    if truth.numel() != m or n_in < 1 or n_out < 1:
        raise ValueError(f"need scores and included of one shape [m] with canaries both in and out, got "
                         f"{m} scores, {n_in} in, {n_out} out")
    tops = tuple(tops) if tops is not None else tuple(dict.fromkeys(max(1, m // f) for f in (32, 16, 8, 4, 2)))
    alpha = _alpha(confidence, len(tops)) / 2
    ranked = truth[torch.argsort(scores, descending=True, stable=True)]
    best = 0.0
    for k in tops:
        tp = int(ranked[:k].sum())
        fp = k - tp
        tpr_lo = float(stats.beta.ppf(alpha, tp, n_in - tp + 1)) if tp > 0 else 0.0
        fpr_hi = float(stats.beta.ppf(1 - alpha, fp + 1, n_out - fp)) if fp < n_out else 1.0
        if 0 < tpr_lo and fpr_hi < 1:
            best = max(best, float(stats.norm.ppf(tpr_lo) - stats.norm.ppf(fpr_hi)))
    return best


def canary_privacy(scores: Tensor, included: Tensor, delta: float, confidence: float = 0.95) -> dict[str, float | int]:
    """The canary fields of an audit record's ``privacy`` dict (logged as ``privacy/<key>``).

    Returns:
        ``{"epsilon_empirical": ..., "epsilon_empirical_ceiling": ..., "epsilon_empirical_gdp": ...,
        "canaries": m}``: the one-run lower bound (:func:`empirical_epsilon`, the one the gate compares with the
        accountant's ε), the most ``m`` canaries can certify, and the GDP-model estimate
        (:func:`gdp_mu_lower_bound` then :func:`gdp_epsilon`; 0.0 while all canaries are on one side).

    Raises:
        ValueError: as :func:`empirical_epsilon`.
    """
    est = empirical_epsilon(scores, included, delta, confidence)
    truth = torch.as_tensor(included).bool()
    both = bool(truth.any()) and not bool(truth.all())
    mu = gdp_mu_lower_bound(scores, included, confidence) if both else 0.0
    return {"epsilon_empirical": round(est.epsilon, 4), "epsilon_empirical_ceiling": round(est.ceiling, 4),
            "epsilon_empirical_gdp": round(gdp_epsilon(mu, delta), 4) if delta > 0 else 0.0, "canaries": est.canaries}
