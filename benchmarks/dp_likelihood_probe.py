"""Is the DP-SGD release still peaked at the private sentence? The Gaussian likelihood of candidate sentences
under the gradient Opacus releases (pretrained MiniLM, full view, flat clipping to C = 1, B = 1, CoLA).

    .venv/bin/python benchmarks/dp_likelihood_probe.py [--n 4] [--sigmas 0,0.001,0.01,0.1] [--threads 2]

With B = 1 the release is ``r = clip_C(g) + σC z``. A candidate sentence ``c`` with clipped gradient ``ḡ_c``
has log-likelihood ``(⟨ḡ_c, r⟩ − ½‖ḡ_c‖²) / (σC)²`` up to a constant, so the maximum-likelihood test
between the private sentence ``t`` and ``c`` has mean margin ``½‖ḡ_t − ḡ_c‖²`` and noise
``σC‖ḡ_t − ḡ_c‖``: its signal-to-noise ratio is ``‖ḡ_t − ḡ_c‖ / (2σC)`` whatever the model's size.
:mod:`dp_signal_probe` showed that no *subspace* of layer 0 survives σ = 1e-3; this probe asks whether the
whole release still ranks the truth first among its neighbours, i.e. whether an attack that searches
sentences by likelihood (gradient matching's discrete phase) is limited by the noise or by its search.

Per sentence and σ it prints the truth's score ``⟨ḡ_c, r⟩ − ½‖ḡ_c‖²`` against the best of ``--per-position``
random single-token replacements per position, every adjacent swap and 10 random sentences of the same
length (all with the true label), the smallest ``‖ḡ_t − ḡ_c‖`` over the neighbours (the predicted SNR is that
over ``2σ``), and the ranks of the true tokens among the word-embedding gradient's rows by norm (what a
noise-thresholded token bag can see).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from leak_audit.cli.bench.common import default_data_path
from leak_audit.cli.bench.dp import DPGradients
from leak_audit.cli.bench.text_run import load_model
from leak_audit.demos.datasets import read_tsv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4, help="first N CoLA dev sentences, one per batch")
    p.add_argument("--sigmas", default="0,0.001,0.01,0.1", help="noise multipliers σ (C = 1)")
    p.add_argument("--per-position", type=int, default=5, help="random replacements per position")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None, help="TSV (default: cola_dev.tsv beside the repository)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = read_tsv(args.data or default_data_path("cola_dev.tsv"))[: args.n]
    model, tokenizer, _ = load_model(None, 0)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    special = set(tokenizer.all_special_ids)
    vocab = [v for v in range(tokenizer.vocab_size) if v not in special]

    def clipped(ids: torch.Tensor, label: int) -> torch.Tensor:
        """The candidate's per-sample gradient over every parameter, clipped to C = 1 as DP-SGD clips it."""
        loss = model(input_ids=ids[None], labels=torch.tensor([label])).loss
        g = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(x if x is not None else torch.zeros_like(q)).reshape(-1) for x, q in zip(g, params)])
        return flat * min(1.0, 1.0 / float(flat.norm()))

    for sigma in (float(s) for s in args.sigmas.split(",")):
        with DPGradients(model, sigma, 1.0, train=False) as dp:
            released = [dp(tokenizer, [row], names, seed=i) for i, row in enumerate(rows)]
        model.eval()
        rng = random.Random(0)
        for k, ((_, label), (batch, grads, _)) in enumerate(zip(rows, released, strict=True)):
            r = torch.cat([grads[n].reshape(-1) for n in names])
            ids = batch.input_ids[0]
            n = len(ids)
            t0 = time.monotonic()
            g_t = clipped(ids, label)
            truth = float(g_t @ r - 0.5 * g_t @ g_t)
            kinds: dict[str, list[float]] = {"replace": [], "swap": [], "random": []}
            nearest = float("inf")
            cands: list[tuple[str, torch.Tensor]] = []
            for i in range(1, n - 1):
                for _ in range(args.per_position):
                    c = ids.clone()
                    c[i] = rng.choice(vocab)
                    cands.append(("replace", c))
            for i in range(1, n - 2):
                if ids[i] != ids[i + 1]:
                    c = ids.clone()
                    c[i], c[i + 1] = ids[i + 1], ids[i]
                    cands.append(("swap", c))
            for _ in range(10):
                c = ids.clone()
                c[1:-1] = torch.tensor([rng.choice(vocab) for _ in range(n - 2)])
                cands.append(("random", c))
            for kind, c in cands:
                g_c = clipped(c, label)
                kinds[kind].append(float(g_c @ r - 0.5 * g_c @ g_c))
                if kind != "random":
                    nearest = min(nearest, float((g_t - g_c).norm()))
            norms = grads["bert.embeddings.word_embeddings.weight"].norm(dim=1)
            rank = torch.empty_like(norms, dtype=torch.long)
            rank[norms.argsort(descending=True)] = torch.arange(len(norms))
            ranks = sorted(rank[sorted(set(ids[1:-1].tolist()))].tolist())
            best = max(kinds["replace"] + kinds["swap"])
            snr = f"{nearest / (2 * sigma):.1f}" if sigma > 0 else "inf"
            print(f"σ={sigma:g} sentence {k} ({n} tokens): truth {truth:.4f}, best neighbour {best:.4f} "
                  f"({'truth first' if truth > best else 'a neighbour beats the truth'}), best random "
                  f"{max(kinds['random']):.4f}; nearest ‖ḡ_t−ḡ_c‖ {nearest:.4f}, predicted SNR {snr}; "
                  f"true tokens' embedding-row ranks {ranks} ({time.monotonic() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
