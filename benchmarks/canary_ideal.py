"""What one-run auditing can certify at best: idealised canaries whose scores are exact draws of a μ-GDP
mechanism with the accountant's ε, through the same statistics as ``LeakageAudit(canaries=m)``.

    .venv/bin/python benchmarks/canary_ideal.py [--epsilons 1.16,3.52,20.24] [--canaries 1000,10000,100000]

Per (ε, m), the median over ``--seeds`` of ``empirical_epsilon / ε`` (Steinke, Nasr, Jagielski 2023, the
binomial bound with abstention) and of ``gdp_epsilon(gdp_mu_lower_bound) / ε``. An included canary's score is
``N(μ, 1)``, an excluded one's ``N(0, 1)``, with μ the GDP parameter whose ε at ``--delta`` is the given ε: no
real canary's score separates the two hypotheses better (Dong, Roth, Su 2022), so the ratios are an upper
limit for the Dirac canaries in DP-SGD (``leak-audit bench canary``).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from scipy.optimize import brentq

from leak_audit.metrics.epsilon import empirical_epsilon, gdp_epsilon, gdp_mu_lower_bound


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epsilons", default="1.16,3.52,20.24", help="the accountant's epsilons (default: bench canary's PRV values at sigma 2, 1, 0.5)")
    p.add_argument("--canaries", default="1000,10000,100000")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seeds", type=int, default=10)
    args = p.parse_args()
    print("| accountant ε | μ (GDP) | canaries | binomial bound / ε (median) | GDP estimate / ε (median) |")
    print("|---|---|---|---|---|")
    for eps in (float(e) for e in args.epsilons.split(",")):
        mu = brentq(lambda m: gdp_epsilon(m, args.delta) - eps, 1e-3, 15.0)
        for m in (int(c) for c in args.canaries.split(",")):
            binomial, gdp = [], []
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(seed)
                included = torch.rand(m, generator=g) < 0.5
                scores = torch.randn(m, generator=g, dtype=torch.float64) + mu * included
                binomial.append(empirical_epsilon(scores, included, args.delta).epsilon / eps)
                gdp.append(gdp_epsilon(gdp_mu_lower_bound(scores, included), args.delta) / eps)
            print(f"| {eps:g} | {mu:.3f} | {m} | {statistics.median(binomial):.3f} | {statistics.median(gdp):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
