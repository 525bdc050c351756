"""Is the DP-SGD release still peaked at the private sentence? The Gaussian likelihood of candidate sentences
under the gradient Opacus releases (pretrained MiniLM, full view, flat clipping to C = 1, B = 1, CoLA).

    .venv/bin/python benchmarks/dp_likelihood_probe.py [--n 4] [--sigmas 0,0.001,0.01,0.1] [--threads 2]
    .venv/bin/python benchmarks/dp_likelihood_probe.py --corrupt 3 --top 16 --sigmas 0,0.001,0.01   # the search
    .venv/bin/python benchmarks/dp_likelihood_probe.py --filter --n 8 --sigmas 0.001,0.01            # word rows
    .venv/bin/python benchmarks/dp_likelihood_probe.py --vocab --corrupt 3 --n 2 --sigmas 0.001        # every token

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

``--corrupt K``: instead, the likelihood's *landscape*. Start from the truth with ``K`` random positions
replaced, and climb the likelihood by coordinate ascent (up to two sweeps over the positions; at each, the
``--top`` tokens of HotFlip's first-order estimate of the likelihood, from one double backward through the
clipped gradient, each scored exactly; the best that raises the score is kept). Prints the true token's rank in
HotFlip's estimate at every wrong position met, and how many positions are right at the end.

``--filter``: the word-embedding table's own rows as a per-position test. Row ``v`` of its released gradient is
``Σ_{i: t_i = v} g_i`` plus noise (``g_i``: the clipped gradient at position ``i``'s embedding sum), so a known
``g_i`` ranks the vocabulary by ``⟨g_i, r_v⟩`` with signal-to-noise ratio ``‖g_i‖/σC``. Prints, over every
inner position, the true token's rank when ``g_i`` comes from the true sentence (an oracle) and when it comes from
the sentence with a random token at ``i`` (what a search knows at a wrong position).

``--vocab`` (with ``--corrupt K``): the likelihood of *every* token at a position, where HotFlip's shortlist above
may be what fails. Corrupt ``K`` random inner positions, then at each of them and at 3 positions left right, score
the whole vocabulary: ``⟨g_c, r⟩`` of every candidate by a central difference of the per-candidate loss between the
parameters ``θ ± εr`` (ε = 1e-2; two batched forward passes, within 2e-5 of forward-mode JVP), with the clipping
norm held at the corrupted sentence's; then the best 50 and the true token scored exactly. Prints per position
the true token's rank in both, and the exact winner.
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
    p.add_argument("--corrupt", type=int, default=0, help="K > 0: the coordinate-ascent probe from K corruptions")
    p.add_argument("--top", type=int, default=16, help="HotFlip candidates scored per position (--corrupt)")
    p.add_argument("--filter", action="store_true", help="rank the vocabulary by <g_i, word row> per position")
    p.add_argument("--vocab", action="store_true", help="with --corrupt: score every token at a position")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = read_tsv(args.data or default_data_path("cola_dev.tsv"))[: args.n]
    model, tokenizer, _ = load_model(None, 0)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    special = set(tokenizer.all_special_ids)
    vocab = [v for v in range(tokenizer.vocab_size) if v not in special]

    table = model.get_input_embeddings().weight.detach()
    banned = torch.zeros(table.shape[0], dtype=torch.bool)
    banned[sorted(special)] = True

    def likelihood(g: list[torch.Tensor], r: list[torch.Tensor]) -> torch.Tensor:
        """``⟨ḡ, r⟩ − ½‖ḡ‖²`` of a gradient ``g`` (a list of tensors), clipped to C = 1 (differentiable)."""
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        c = torch.clamp(1.0 / norm, max=1.0)
        return c * sum((x * y).sum() for x, y in zip(g, r, strict=True)) - 0.5 * (c * norm) ** 2

    def gradient(label: int, create_graph: bool = False, **inputs: torch.Tensor) -> list[torch.Tensor]:
        loss = model(**inputs, labels=torch.tensor([label])).loss
        g = torch.autograd.grad(loss, params, allow_unused=True, create_graph=create_graph)
        return [x if x is not None else torch.zeros_like(q) for x, q in zip(g, params)]

    def clipped(ids: torch.Tensor, label: int) -> torch.Tensor:
        """The candidate's per-sample gradient over every parameter, flat, clipped to C = 1 as DP-SGD clips it."""
        flat = torch.cat([x.reshape(-1) for x in gradient(label, input_ids=ids[None])])
        return flat * min(1.0, 1.0 / float(flat.norm()))

    def exact(ids: torch.Tensor, label: int, r: list[torch.Tensor]) -> float:
        return float(likelihood(gradient(label, input_ids=ids[None]), r))

    def hotflip(ids: torch.Tensor, label: int, r: list[torch.Tensor], pos: int) -> torch.Tensor:
        """First-order gain in likelihood of every token at ``pos`` ``[V]`` (special tokens ``-inf``)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        e = table[ids].clone().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no double backward
            (ge,) = torch.autograd.grad(likelihood(gradient(label, True, inputs_embeds=e[None]), r), [e])
        return (table @ ge[pos] - ge[pos] @ e[pos].detach()).masked_fill(banned, -float("inf"))

    def climb(truth: torch.Tensor, label: int, r: list[torch.Tensor], rng: random.Random) -> str:
        ids = truth.clone()
        n = len(ids)
        for i in rng.sample(range(1, n - 1), min(args.corrupt, n - 2)):
            ids[i] = rng.choice(vocab)
        start_right = int((ids == truth).sum()) - 2
        current, ranks = exact(ids, label, r), []
        for _ in range(2):
            moved = False
            for pos in range(1, n - 1):
                gain = hotflip(ids, label, r, pos)
                if ids[pos] != truth[pos]:
                    ranks.append(int((gain > gain[truth[pos]]).sum()))
                best: tuple[float, torch.Tensor] | None = None
                for v in gain.topk(args.top).indices.tolist():
                    if v != int(ids[pos]):
                        c = ids.clone()
                        c[pos] = v
                        score = exact(c, label, r)
                        if score > current and (best is None or score > best[0]):
                            best = (score, c)
                if best is not None:
                    (current, ids), moved = best, True
            if not moved:
                break
        right = int((ids == truth).sum()) - 2
        return (f"{start_right} → {right} of {n - 2} positions right (score {current:.4f}, truth "
                f"{exact(truth, label, r):.4f}); the true token's HotFlip rank at each wrong position met: {ranks}")

    def vocabulary_ranks(truth: torch.Tensor, label: int, grads: dict[str, torch.Tensor], rng: random.Random) -> str:
        """``--vocab``: per probed position, the true token's rank over the vocabulary (held norm) and among
        the best 50 scored exactly, and the exact winner."""
        from torch.func import functional_call

        eps, n = 1e-2, len(truth)
        r = [grads[nm] for nm in names]
        base = {nm: q.detach() for nm, q in model.named_parameters()}
        plus = {nm: base[nm] + eps * grads[nm] for nm in names}
        minus = {nm: base[nm] - eps * grads[nm] for nm in names}
        ids = truth.clone()
        wrong = sorted(rng.sample(range(1, n - 1), min(args.corrupt, n - 2)))
        for i in wrong:
            ids[i] = rng.choice(vocab)
        kept = [i for i in range(1, n - 1) if i not in wrong]
        norm = float(torch.cat([x.reshape(-1) for x in gradient(label, input_ids=ids[None])]).norm())
        scale = min(1.0, 1.0 / norm)  # the clipping factor, held at the corrupted sentence's
        tokens = torch.tensor(vocab)
        out = []
        for i in wrong + sorted(rng.sample(kept, min(3, len(kept)))):
            approx = torch.empty(len(vocab), dtype=torch.float64)
            for s in range(0, len(vocab), 512):
                cand = ids.repeat(min(512, len(vocab) - s), 1)
                cand[:, i] = tokens[s: s + 512]
                lab = torch.full((cand.shape[0],), label)
                with torch.no_grad():
                    lp, lm = (torch.nn.functional.cross_entropy(functional_call(model, q, (cand,)).logits.double(), lab,
                                                                reduction="none") for q in (plus, minus))
                approx[s: s + 512] = scale * (lp - lm) / (2 * eps)
            true = vocab.index(int(truth[i]))
            top = approx.topk(50).indices.tolist()
            top += [true] if true not in top else []
            exact_scores = {}
            for j in top:
                c = ids.clone()
                c[i] = vocab[j]
                exact_scores[j] = exact(c, label, r)
            winner = max(exact_scores, key=exact_scores.__getitem__)
            out.append(f"{i} ({'corrupted' if i in wrong else 'right'}): rank {int((approx > approx[true]).sum())} / "
                       f"{sum(v > exact_scores[true] for v in exact_scores.values())} exact, "
                       f"{tokenizer.convert_ids_to_tokens(vocab[winner])!r} for {tokenizer.convert_ids_to_tokens(int(truth[i]))!r}")
        return f"corrupted {wrong}; " + "; ".join(out)

    def position_gradients(ids: torch.Tensor, label: int) -> torch.Tensor:
        """``[n, d]`` the clipped gradient at each position's embedding sum (= its word row's share)."""
        e = table[ids].clone().requires_grad_(True)
        loss = model(inputs_embeds=e[None], labels=torch.tensor([label])).loss
        ge, *g = torch.autograd.grad(loss, [e, *params], allow_unused=True)
        norm = torch.sqrt(sum((x * x).sum() for x in g if x is not None))
        return ge * torch.clamp(1.0 / norm, max=1.0)

    def ranks_by_rows(word_rows: torch.Tensor, ids: torch.Tensor, label: int,
                      rng: random.Random) -> list[tuple[int, int]]:
        """Per inner position: the true token's rank by ``⟨g_i, r_v⟩``, with the true ``g_i`` and a perturbed
        one."""
        out, oracle = [], position_gradients(ids, label)
        for i in range(1, len(ids) - 1):
            c = ids.clone()
            c[i] = rng.choice(vocab)
            ranked = []
            for g in (oracle[i], position_gradients(c, label)[i]):
                score = (word_rows @ g).masked_fill(banned, -float("inf"))
                ranked.append(int((score > score[ids[i]]).sum()))
            out.append((ranked[0], ranked[1]))
        return out

    for sigma in (float(s) for s in args.sigmas.split(",")):
        with DPGradients(model, sigma, 1.0, train=False) as dp:
            released = [dp(tokenizer, [row], names, seed=i) for i, row in enumerate(rows)]
        model.eval()
        rng = random.Random(0)
        if args.filter:
            ranks, scale = [], []
            for (_, label), (batch, grads, _) in zip(rows, released, strict=True):
                ids = batch.input_ids[0]
                ranks += ranks_by_rows(grads["bert.embeddings.word_embeddings.weight"], ids, label, rng)
                scale += (position_gradients(ids, label)[1:-1].norm(dim=1) / max(sigma, 1e-12)).tolist()
            for k, what in enumerate(("true sentence (oracle)", "sentence with a random token there")):
                r = torch.tensor([x[k] for x in ranks], dtype=torch.float64)
                print(f"σ={sigma:g}, g_i from the {what}: the true token first at {int((r == 0).sum())} of {len(r)} "
                      f"positions, in the top 16 at {int((r < 16).sum())}, median rank {float(r.median()):.0f}; "
                      f"median ‖g_i‖/σC {float(torch.tensor(scale).median()):.2f}", flush=True)
            continue
        if args.corrupt > 0:
            for k, ((_, label), (batch, grads, _)) in enumerate(zip(rows, released, strict=True)):
                t0 = time.monotonic()
                line = (vocabulary_ranks(batch.input_ids[0], label, grads, rng) if args.vocab
                        else climb(batch.input_ids[0], label, [grads[n] for n in names], rng))
                print(f"σ={sigma:g} sentence {k}: {line} ({time.monotonic() - t0:.0f} s)", flush=True)
            continue
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
