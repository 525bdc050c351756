"""Is bfloat16 good enough to rank span search's candidates, and how much faster is it here?

    .venv/bin/python benchmarks/screening_probe.py [--n 8] [--candidates 64] [--threads 2]

Pretrained MiniLM (the bench's model, fresh seeded head), layer 3's query alone, B = 1, dropout off, the first
``--n`` SST-2 dev reviews. Per review the candidates are span search's kind: the review itself and
``--candidates - 1`` copies with one random position replaced by a random token. It runs them through layers 0-2
(:func:`~leak_audit.attacks.text.span_search.module_inputs`) with the float32 parameters and with a bfloat16 copy
(:func:`~leak_audit.attacks.precision.cast_floating`), and prints each forward's time (best of 3), the largest
change of the span distance ``D`` (float32 ``D`` of the bfloat16 inputs against the float32 one), the rank
correlation of the two orderings, and whether both rank the review first. Then the time of ``D``'s covered share
by the float64 Cholesky :func:`~leak_audit.attacks.spans.span_distance` uses against a batched QR of the same
inputs. ``benchmarks/README.md`` ("Screening in bfloat16") has a run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from leak_audit.attacks.precision import cast_floating
from leak_audit.attacks.spans import span_basis, span_distance
from leak_audit.attacks.text.span_search import module_inputs
from leak_audit.cli.bench.common import default_data_path
from leak_audit.cli.bench.text_run import load_model
from leak_audit.demos.datasets import read_tsv
from leak_audit.models.replica import ModelReplica

QUERY3 = "bert.encoder.layer.3.attention.self.query"


def _best_of(run: Callable[[], torch.Tensor], repeat: int = 3) -> tuple[float, torch.Tensor]:
    out = run()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return min(times), out


def _qr_distance(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``D`` with the covered share from a batched QR (the definition span_distance's Cholesky replaces)."""
    resid = ((x - x @ basis @ basis.T).square().sum(-1) / x.square().sum(-1)).sum(-1)
    q, _ = torch.linalg.qr(x.transpose(1, 2))
    return resid + (basis.shape[1] - (q.transpose(1, 2) @ basis).square().sum((1, 2)))


def _ranks(v: torch.Tensor) -> torch.Tensor:
    return v.argsort().argsort().double()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="SST-2 dev reviews (default 8)")
    p.add_argument("--candidates", type=int, default=64, help="sequences per review, the review included (default 64)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--data", default=str(default_data_path("sst2_dev.tsv")), help="the SST-2 dev TSV")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(None, seed=0)
    params = {n: q.detach() for n, q in model.named_parameters()}
    low = cast_floating(params, torch.bfloat16)
    replica = ModelReplica(model)
    gen = torch.Generator().manual_seed(0)
    module = QUERY3
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.candidates} candidates per review")
    print("| review | tokens | float32 forward (s) | bfloat16 forward (s) | speed-up | max abs ΔD | rank corr | "
          "review first (f32 / bf16) | QR D (s) | Cholesky D (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for k, (sentence, label) in enumerate(read_tsv(args.data, limit=args.n)):
        enc = tokenizer([sentence], return_tensors="pt")
        model.zero_grad()
        model(**enc, labels=torch.tensor([label])).loss.backward()
        basis, _ = span_basis([model.get_parameter(module + ".weight").grad.detach().clone()])
        basis = basis.float()
        ids = enc["input_ids"][0]
        rows = ids[None].repeat(args.candidates, 1)
        for i in range(1, args.candidates):
            pos = 1 + int(torch.randint(len(ids) - 2, (1,), generator=gen))
            rows[i, pos] = int(torch.randint(1000, tokenizer.vocab_size, (1,), generator=gen))
        with torch.no_grad():
            t32, x32 = _best_of(lambda: module_inputs(replica, params, [module], input_ids=rows)[module])
            t16, x16 = _best_of(lambda: module_inputs(replica, low, [module], input_ids=rows)[module])
            d32, d16 = span_distance(x32, basis), span_distance(x16.float(), basis)
            tqr, _ = _best_of(lambda: _qr_distance(x32, basis))
            tch, _ = _best_of(lambda: span_distance(x32, basis))
        corr = float(torch.corrcoef(torch.stack([_ranks(d32), _ranks(d16)]))[0, 1])
        first = f"{'yes' if int(d32.argmin()) == 0 else 'no'} / {'yes' if int(d16.argmin()) == 0 else 'no'}"
        print(f"| {k} | {len(ids)} | {t32:.3f} | {t16:.3f} | {t32 / t16:.2f} | {float((d32 - d16).abs().max()):.3f} | "
              f"{corr:.4f} | {first} | {tqr:.4f} | {tch:.4f} |", flush=True)
    model.zero_grad()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
