"""Time the Dirac canaries' own work inside Opacus's ``add_noise`` on the pretrained MiniLM (one thread).

    .venv/bin/python benchmarks/canary_cost.py [--canaries 1000]

Prints the median ``add_noise`` time of Opacus alone, and the canaries' extra work (the wrapper with Opacus's
noise replaced by a plain copy, against that copy alone), both over 30 calls.
"""

from __future__ import annotations

import argparse
import time

import torch
from opacus.optimizers import DPOptimizer

from leak_audit.capture.canaries import DiracCanaries
from leak_audit.cli.bench.text_run import load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--canaries", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _, _ = load_model(None, 0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=8)

    def median_ms(n: int = 30) -> float:
        times = []
        for _ in range(n):
            for q in model.parameters():
                q.summed_grad = torch.zeros_like(q)
            start = time.perf_counter()
            opt.add_noise()
            times.append(time.perf_counter() - start)
        return sorted(times)[n // 2] * 1e3

    noise = median_ms()

    def copy() -> None:
        for q in model.parameters():
            q.grad = q.summed_grad

    opt.add_noise = copy
    plain = median_ms()
    DiracCanaries(opt, dict(model.named_parameters()), args.canaries, sample_rate=8 / 256)  # wraps the copy
    with_canaries = median_ms()
    params = sum(q.numel() for q in model.parameters())
    print(f"MiniLM, {params:,} parameters; Opacus add_noise: {noise:.1f} ms; {args.canaries} canaries' own work: "
          f"{with_canaries - plain:.2f} ms per step ({(with_canaries - plain) / noise:.1%} of the noise)")


if __name__ == "__main__":
    main()
