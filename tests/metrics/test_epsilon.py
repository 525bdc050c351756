"""The one-run empirical ε (Steinke, Nasr, Jagielski 2023) and the GDP estimate, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from leak_audit.metrics.epsilon import (
    canary_privacy,
    empirical_epsilon,
    epsilon_ceiling,
    gdp_epsilon,
    gdp_mu_lower_bound,
    one_run_epsilon,
    one_run_p_value,
    split_grid,
)


def test_p_value_matches_a_hand_computed_binomial_case():
    # m = 10 canaries, 4 guesses, 4 right, at epsilon = 1 and delta = 0: P[Bin(4, q) >= 4] = q^4, q = e/(1+e)
    q = math.e / (1 + math.e)
    assert one_run_p_value(10, 4, 4, 1.0, 0.0) == pytest.approx(q**4, rel=1e-12)
    # 3 of 4 right: P[Bin(4, q) >= 3] = 4 q^3 (1-q) + q^4
    assert one_run_p_value(10, 4, 3, 1.0, 0.0) == pytest.approx(4 * q**3 * (1 - q) + q**4, rel=1e-12)
    # the delta term: 2 m delta * max_i P[v-i <= Bin < v] / i, for v = 3, r = 4
    pmf = [stats.binom.pmf(k, 4, q) for k in (2, 1, 0)]
    alpha = max(pmf[0] / 1, (pmf[0] + pmf[1]) / 2, sum(pmf) / 3)
    expected = 4 * q**3 * (1 - q) + q**4 + alpha * 1e-3 * 2 * 10
    assert one_run_p_value(10, 4, 3, 1.0, 1e-3) == pytest.approx(expected, rel=1e-12)


def test_lower_bound_is_where_the_p_value_crosses_alpha():
    # every guess right, delta 0: q^r = alpha at the bound, so epsilon = log(q / (1 - q)) with q = alpha^(1/r)
    for m in (100, 1000, 10000):
        q = 0.05 ** (1 / m)
        assert one_run_epsilon(m, m, m, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=2e-4)
    # the paper's ceilings (delta 0, 95%, one split of all m guesses): 3.5, 5.8, 8.1
    assert [round(one_run_epsilon(m, m, m, 0.0), 1) for m in (100, 1000, 10000)] == [3.5, 5.8, 8.1]
    eps = one_run_epsilon(1000, 100, 90, 1e-5)
    assert one_run_p_value(1000, 100, 90, eps, 1e-5) < 0.05 <= one_run_p_value(1000, 100, 90, eps + 1e-3, 1e-5)
    assert one_run_epsilon(1000, 100, 50, 1e-5) == 0.0  # chance-level guesses certify nothing


def test_empirical_epsilon_uses_the_best_split_with_bonferroni():
    m = 1000
    included = torch.arange(m) % 2 == 0
    scores = included.double()  # perfect separation: every guess of every split is right
    est = empirical_epsilon(scores, included, 1e-5)
    assert est.epsilon == pytest.approx(est.ceiling) and est.correct == est.guesses
    assert est.ceiling == pytest.approx(epsilon_ceiling(m, 1e-5))
    # six splits share the 5%: the ceiling is the single split's at alpha = 0.05 / 6
    assert est.ceiling == pytest.approx(max(one_run_epsilon(m, a + b, a + b, 1e-5, 0.05 / 6) for a, b in split_grid(m)))
    assert 5.2 < est.ceiling < 5.8
    # reversed scores: guessing "in" for the top is always wrong
    assert empirical_epsilon(-scores, included, 1e-5).epsilon == 0.0


def test_random_scores_certify_nothing_in_nearly_every_trial():
    g = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(100):
        included = torch.rand(500, generator=g) < 0.5
        hits += empirical_epsilon(torch.randn(500, generator=g), included, 1e-5).epsilon > 0
    assert hits <= 5  # a valid 95% bound on a 0-DP "mechanism" (no signal at all): at most ~5% false positives


def test_gdp_conversion_and_mu_bound():
    # mu-GDP at mu = 1: delta(epsilon) from Dong, Roth, Su, evaluated at the returned epsilon
    eps = gdp_epsilon(1.0, 1e-5)
    d = stats.norm.cdf(-eps + 0.5) - math.exp(eps) * stats.norm.cdf(-eps - 0.5)
    assert d == pytest.approx(1e-5, rel=1e-2) and 4.0 < eps < 5.0
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    # scores drawn from N(0,1) (out) and N(2,1) (in): a 2-GDP pair; the 95% lower bound lies below 2, near it
    g = torch.Generator().manual_seed(1)
    included = torch.rand(4000, generator=g) < 0.5
    scores = torch.randn(4000, generator=g, dtype=torch.float64) + 2.0 * included
    mu = gdp_mu_lower_bound(scores, included)
    assert 1.5 < mu < 2.0


def test_canary_privacy_fields():
    included = torch.arange(100) % 2 == 0
    out = canary_privacy(included.double(), included, 1e-5)
    assert set(out) == {"epsilon_empirical", "epsilon_empirical_ceiling", "epsilon_empirical_gdp", "canaries"}
    assert out["canaries"] == 100 and out["epsilon_empirical"] == out["epsilon_empirical_ceiling"] > 2.5


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="correct <= guesses <= m"):
        one_run_p_value(10, 4, 5, 1.0, 0.0)
    with pytest.raises(ValueError, match="delta must be in"):
        one_run_epsilon(10, 4, 4, 1.5)
    with pytest.raises(ValueError, match=r"scores and included must both be \[m\]"):
        empirical_epsilon(torch.zeros(3), torch.zeros(4, dtype=torch.bool), 1e-5)
    with pytest.raises(ValueError, match="k_in=8, k_out=8"):
        empirical_epsilon(torch.zeros(10), torch.zeros(10, dtype=torch.bool), 1e-5, splits=[(8, 8)])
    with pytest.raises(ValueError, match="confidence must be in"):
        empirical_epsilon(torch.zeros(10), torch.zeros(10, dtype=torch.bool), 1e-5, confidence=1.0)
