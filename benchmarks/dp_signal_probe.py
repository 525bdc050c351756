"""What a DP-SGD release leaves above the noise: per weight matrix, the signal directions that clear the noise edge.

    .venv/bin/python benchmarks/dp_signal_probe.py [--n 8] [--sigmas 1e-4,1e-3,1e-2]

The benchmark's DP rows (``leak-audit bench text --dp-noise ...``) clip each example's gradient over all 22.7M
parameters of the pretrained MiniLM classifier to ``C = 1`` and add ``N(0, (σC)²)`` per coordinate (B = 1).
Subspace attacks (span_check, TIGER-style objectives toward a layer's attention-gradient subspace) read a
weight gradient's top singular directions. A signal direction of singular value ``θ`` in an ``[m, n]`` matrix
plus i.i.d. noise of std ``s = σC`` separates from the noise bulk at all only when ``θ > s·(mn)^{1/4}`` (the
BBP phase transition; Benaych-Georges & Nadakuditi, Adv. Math. 2011, and Adv. Appl. Probab. 2012 for
rectangular matrices); below it the noised matrix's top directions carry no trace of it. The token bag reads
the word-embedding rows: a row is found when its noised norm clears the chi-square threshold
(:func:`~leak_audit.attacks.spans.noise_threshold`), with probability given by the noncentral chi-square law.

For the first ``n`` CoLA sentences, one at a time, this prints the mean number of signal directions past the
transition per group of matrices (layer k's query/key/value, its attention output and feed-forward, the pooler
and classifier), from the noise-free clipped gradient, and the token bag's expected recall. These bound what
any attack on that matrix alone can read. Eval mode, the bench's seeded head (``load_model(None, 0)``).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch
from scipy.stats import ncx2

from leak_audit.attacks.spans import noise_threshold
from leak_audit.cli.bench.common import default_data_path
from leak_audit.cli.bench.text_run import load_model
from leak_audit.demos.datasets import read_tsv


def group_of(name: str) -> str | None:
    """Table row of a 2-D weight (``None``: not reported)."""
    if name.startswith("bert.pooler") or name.startswith("classifier"):
        return "pooler + classifier"
    if ".layer." not in name or not name.endswith("weight"):
        return None
    layer = name.split(".layer.")[1].split(".")[0]
    part = "q/k/v" if ".attention.self." in name else "attention output + FFN"
    return f"layer {layer} {part}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="sentences (B = 1 each)")
    p.add_argument("--sigmas", default="1e-4,1e-3,1e-2", help="noise multipliers σ, comma-separated")
    p.add_argument("--data", default=None, help="TSV (default: cola_dev.tsv beside the repository)")
    args = p.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    torch.set_num_threads(2)
    model, tokenizer, _ = load_model(None, 0)
    rows = read_tsv(args.data or default_data_path("cola_dev.tsv"), limit=args.n)
    above: dict[tuple[str, float], float] = defaultdict(float)
    bag: dict[float, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for sentence, label in rows:
        enc = tokenizer([sentence], return_tensors="pt")
        model.zero_grad(set_to_none=True)
        model(**enc, labels=torch.tensor([label])).loss.backward()
        grads = {n: q.grad.detach().double() for n, q in model.named_parameters() if q.grad is not None}
        scale = min(1.0, 1.0 / math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values())))  # flat clipping, C = 1
        for name, g in grads.items():
            group = group_of(name)
            if group is None or g.dim() != 2:
                continue
            sv = torch.linalg.svdvals(g * scale)
            top[group] = max(top[group], float(sv[0]))
            for s in sigmas:
                above[(group, s)] += int((sv > s * (g.shape[0] * g.shape[1]) ** 0.25).sum()) / len(rows)
        word = grads["bert.embeddings.word_embeddings.weight"] * scale
        ids = sorted(set(enc["input_ids"][0].tolist()))
        power = word[ids].pow(2).sum(1).numpy()  # ‖row‖² per distinct token
        for s in sigmas:
            cut = (noise_threshold(s, *word.shape) / s) ** 2
            bag[s] += float(ncx2.sf(cut, word.shape[1], power / s**2).mean()) / len(rows)
    head = " | ".join(f"σ = {s:g}" for s in sigmas)
    print(f"| matrices | largest singular value (clipped, any sentence) | directions past the transition: {head} |")
    print("|---|---:|" + "---:|" * len(sigmas))
    for group in top:
        cells = " | ".join(f"{above[(group, s)]:.2f}" for s in sigmas)
        print(f"| {group} | {top[group]:.3g} | {cells} |")
    cells = " | ".join(f"{bag[s]:.2f}" for s in sigmas)
    print(f"| token bag: expected recall of the word-embedding rows | – | {cells} |")


if __name__ == "__main__":
    main()
