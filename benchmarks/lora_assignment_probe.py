"""Why encoder LoRA at B > 1 stops at the token bag, and what certifies a sentence: three probes on the
pretrained MiniLM (LoRA r = 8 on query/value, 50 AdamW steps, as ``leak-audit bench text --views lora
--lora-steps 50``), first CoLA batches.

    .venv/bin/python benchmarks/lora_assignment_probe.py [--batches 4] [--batch-size 4]

1. **Pairs from layer 0.** RA-ORMP over the (token, position) pairs of the *exact* bag and length
   (:func:`~leak_audit.attacks.text.sparse_bag.sparse_bag`) against layer 0's 16 ``lora_A`` rows: how many
   pairs it keeps and how many are wrong. Every pair lies in one ``tokens + positions + 1``-dimensional span,
   so layer 0 cannot tell them apart.
2. **Assignment by local search at layer 1.** Start from the true per-position token multisets, scrambled
   across sentences (seeded), and swap tokens between sentences at one position while the relative residual
   of layer 1's ``lora_A`` rows outside the span of the batch's layer-1 inputs drops. Prints the residual
   reached, the truth's, and the sentences exact.
3. **A per-sentence certificate from layer 0's token coefficients** (span_cluster's peeling certificate,
   :mod:`leak_audit.attacks.text.peeling`, on the adapters' 16 rows instead of the query's 384). Every
   layer-0 input is ``(γ⊙c(E[v]) + γ⊙c(P[i] + T₀))/σ + β``, so ``lora_A``'s gradient ``Σ_t u_t x_tᵀ``
   splits exactly over the bag's token atoms, the position atoms and ``β``: a token that occurs once in the batch gets the coefficient
   ``u_t/σ_t`` (``[16]``: query and value) of its one occurrence, and that depends on its own sentence only.
   The batch loss is a mean of per-sentence losses, and for two classes ``∇ℓ_s = (p₁(s) − y_s)·∇(z₁ − z₀)(s)``,
   so a candidate sentence's own forward/backward predicts those coefficients up to one scale ``α_s``. The
   certificate of a candidate is the relative residual of that one-scale fit over its once-occurring tokens
   (``[CLS]``, ``[SEP]`` and tokens that occur more than once are left out; one such token already gives 15
   constraints): below 1e-6 for a true sentence.
   Prints the truth's certificates, the smallest over single-token exchanges between two true sentences,
   and an **oracle-aided** search: given the true per-position token multisets, the sentence lengths and
   which tokens repeat (no attack recovers these yet), scramble the tokens across sentences and, position by
   position, reassign them by the Hungarian method on the candidates' certificates (the objective is a sum
   over sentences), sweeping until nothing improves; a sentence certified below ``CERTIFY_TOL`` (1e-4) is
   kept and its tokens leave the problem; up to 12 seeded restarts.

``--multisets`` runs two other probes instead, on what layer 0's split says about each position and each token:

4. **Per-position token multisets as a subset sum.** Position ``i``'s coefficient ``π_i`` is the sum of the
   contributions ``u_t/σ_t`` of the tokens there; a token that occurs once contributes its whole column ``c_v``,
   a repeated token an unknown part of its column. Taking each repeated token's parts along its column's direction
   ``d_v`` with a free scale (a least-squares fit), every hypothesis (``k_i`` tokens at position ``i``, ``k_i`` the
   true number of sentences that long: an oracle) is ranked by its relative residual. Prints, per position, the
   true hypothesis's rank and residual against the best; and how well the true contributions of repeated tokens
   (from each true sentence's forward/backward and its loss scale ``(p₁ − y)/B``) follow ``±d_v``.
5. **The label of a token's sentence from its column's sign.** ``∇ℓ_s = (p₁(s) − y_s)·∇(z₁ − z₀)(s)``, so the
   column of a once-occurring token is its sentence's scale times a direction that depends mostly on the token.
   A reference direction per token from ``[CLS] v [SEP]`` (its own forward/backward of ``z₁ − z₀``): the sign
   of the column along it against the sign of ``p₁ − y`` (positive for label 0, negative for label 1).
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from collections import Counter

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from leak_audit.attacks.pursuit import joint_support, prune_support
from leak_audit.attacks.text.peeling import CERTIFY_TOL, certify
from leak_audit.attacks.text.query_columns import additive_atoms, token_query_gradients
from leak_audit.attacks.text.sparse_bag import sparse_bag
from leak_audit.cli.bench.common import default_data_path
from leak_audit.cli.bench.lora import LoraSetup, train_adapters, wrap_lora
from leak_audit.cli.bench.text_run import batch_gradients, load_model, split_batches
from leak_audit.demos.datasets import read_tsv
from leak_audit.models import EmbeddingTables, text_model_spec


def logit_difference_pass(model: nn.Module, modules: list[nn.Module], sentences: list[list[int]], pad_id: int
                          ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One padded forward/backward of ``Σ_s (z₁ − z₀)(s)``: ``(logits [S, 2], mask [S, L], per module (its inputs
    [S, L, d], its output gradients [S, L, k]))``. Padding gets no gradient, so each row is its sentence's own."""
    width = max(len(s) for s in sentences)
    ids = torch.full((len(sentences), width), pad_id)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(sentences):
        ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
    taken: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keeper(k: int):
        def keep(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inp[0].detach()
            out.register_hook(lambda g: taken.__setitem__(k, (x, g)))
        return keep

    hooks = [m.register_forward_hook(keeper(k)) for k, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            (logits[:, 1] - logits[:, 0]).sum().backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return logits.detach(), mask, [taken[k] for k in range(len(modules))]


def sentence_directions(model: nn.Module, modules: list[nn.Module], sentences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Per-sentence ``∇(z₁ − z₀)`` of the ``lora_A`` weights of ``modules``: ``[S, Σk, d]`` float64 (one padded pass)."""
    _, mask, taken = logit_difference_pass(model, modules, sentences, pad_id)
    blocks = [torch.einsum("blk,bld->bkd", g.double() * mask[..., None], x.double()) for x, g in taken]
    return torch.cat(blocks, 1)


def certificate_search(truth: list[list[int]], certify, rng: random.Random, restarts: int = 12) -> dict[int, list[int]]:
    """Probe 3's oracle-aided search (module docstring): sentence slot -> certified sentence. ``certify`` maps a
    list of sentences to their certificates."""
    lengths = [len(s) for s in truth]
    done: dict[int, list[int]] = {}
    for _ in range(restarts):
        slots = [b for b in range(len(truth)) if b not in done]
        if not slots:
            break
        sentences = {b: list(truth[b]) for b in slots}
        for i in range(1, max(lengths)):
            alive = [b for b in slots if lengths[b] - 1 > i]
            tokens = [sentences[b][i] for b in alive]
            rng.shuffle(tokens)
            for b, t in zip(alive, tokens, strict=True):
                sentences[b][i] = t
        current = sum(certify(list(sentences.values())))
        for _sweep in range(10):
            before = current
            for i in range(1, max(lengths)):
                alive = [b for b in slots if lengths[b] - 1 > i]
                tokens = [sentences[b][i] for b in alive]
                if len(alive) < 2:
                    continue
                flat = certify([sentences[b][:i] + [t] + sentences[b][i + 1:] for b in alive for t in tokens])
                cost = [flat[x * len(tokens): (x + 1) * len(tokens)] for x in range(len(alive))]
                for x, y in zip(*linear_sum_assignment(cost), strict=True):
                    sentences[alive[x]][i] = tokens[y]
            current = sum(certify(list(sentences.values())))
            if current >= before * (1 - 1e-9):
                break
        done.update({b: sentences[b] for b in slots if certify([sentences[b]])[0] < CERTIFY_TOL})
    return done


def occurrence_columns(model: nn.Module, modules: list[nn.Module], tables: EmbeddingTables,
                       sentences: list[list[int]], labels: list[int], pad_id: int) -> torch.Tensor:
    """Probes 4 and 5: each token's contribution ``u_t/σ_t`` to layer 0's split, with its sentence's loss scale
    ``(p₁ − y)/B`` (``B = len(sentences)``): ``[S, L, Σk]`` float64, zero past each sentence."""
    logits, _, taken = logit_difference_pass(model, modules, sentences, pad_id)
    scale = (logits.double().softmax(-1)[:, 1] - torch.tensor(labels, dtype=torch.float64)) / len(sentences)
    x = taken[0][0].double()
    g = torch.cat([grad.double() for _, grad in taken], -1)
    beta = tables.norm_bias.detach().double()
    out = torch.zeros_like(g)
    for b, s in enumerate(sentences):
        at = additive_atoms(tables, s, len(s))
        for i in range(len(s)):
            a = at[:, i] + at[:, len(s) + i]  # x_t = a/σ_t + β
            out[b, i] = g[b, i] * float((x[b, i] - beta) @ a / (a @ a)) * scale[b]
    return out


def position_ranks(truth: list[list[int]], c: dict[int, torch.Tensor], pi: torch.Tensor) -> list[tuple[int, float, float]]:
    """Probe 4: per position, (the true hypothesis's rank, its relative residual, the best residual)."""
    counts = Counter(t for s in truth for t in s)
    once = sorted(v for v in c if counts[v] == 1)
    rep = sorted(v for v in c if counts[v] > 1)
    out = []
    for i in range(pi.shape[0]):
        alive = [s[i] for s in truth if len(s) > i]
        key = (tuple(sorted(v for v in alive if counts[v] == 1)), tuple(sorted({v for v in alive if counts[v] > 1})))
        target = pi[i]
        scored = []
        for r in range(len(alive) + 1):
            for chosen in {tuple(sorted(set(x))) for x in itertools.combinations_with_replacement(rep, r)}:
                basis = torch.stack([c[v] / c[v].norm() for v in chosen], 1) if chosen else None
                for members in itertools.combinations(once, len(alive) - r):
                    res = target - sum((c[v] for v in members), torch.zeros_like(target))
                    if basis is not None:
                        res = res - basis @ torch.linalg.lstsq(basis, res[:, None]).solution[:, 0]
                    scored.append((float(res.norm() / target.norm()), (members, chosen)))
        scored.sort(key=lambda t: t[0])
        rank = next(j for j, (_, h) in enumerate(scored) if h == key)
        out.append((rank, scored[rank][0], scored[0][0]))
    return out


def multiset_probes(model: nn.Module, tokenizer, tables: EmbeddingTables, spec, layer0_a: list[nn.Module],
                    names: list[str], rows, n: int, batch_size: int) -> None:
    """Probes 4 and 5 (module docstring) on the first ``n`` sentences in batches of ``batch_size``."""
    totals = Counter()
    for index, batch in enumerate(split_batches(rows[:n], batch_size)):
        text, grads = batch_gradients(model, tokenizer, batch, names, train=False, seed=index)
        truth = [ids[m.bool()].tolist() for ids, m in zip(text.input_ids, text.attention_mask, strict=True)]
        labels = [int(y) for _, y in batch]
        bag = sorted({t for s in truth for t in s})
        length = max(len(s) for s in truth)
        split = token_query_gradients(torch.cat([grads[a.a].double() for a in spec.layers[0].lora]),
                                      additive_atoms(tables, bag, length))
        c = {v: split[:, k] for k, v in enumerate(bag)}
        pi = split[:, len(bag): len(bag) + length].T
        counts = Counter(t for s in truth for t in s)
        occ = occurrence_columns(model, layer0_a, tables, truth, labels, tokenizer.pad_token_id)
        cosines = [float(occ[b, i] @ c[v] / (occ[b, i].norm() * c[v].norm()))
                   for b, s in enumerate(truth) for i, v in enumerate(s) if counts[v] > 1]
        ranks = position_ranks(truth, c, pi)
        whole = [r for (r, _, _), i in zip(ranks, range(length), strict=True)
                 if all(counts[s[i]] == 1 for s in truth if len(s) > i)]
        once = [v for v in bag if counts[v] == 1]
        refs = occurrence_columns(model, layer0_a, tables, [[tokenizer.cls_token_id, v, tokenizer.sep_token_id] for v in once],
                                  [0] * len(once), tokenizer.pad_token_id)[:, 1]
        sentence = {v: b for b, s in enumerate(truth) for v in s if counts[v] == 1}
        signs = sum((float(c[v] @ refs[k]) > 0) == (labels[sentence[v]] == 0) for k, v in enumerate(once))
        totals.update(positions=length, first=sum(r == 0 for r, _, _ in ranks), whole=len(whole),
                      whole_first=sum(r == 0 for r in whole), once=len(once), signs=signs)
        print(f"batch {index}: labels {labels}; {len(once)} once-occurring and {len(bag) - len(once)} repeated tokens; "
              f"repeated tokens' parts along ±d_v: |cos| median {torch.tensor(cosines).abs().median():.3f}, "
              f"min {min(abs(x) for x in cosines):.3f}, {sum(x < 0 for x in cosines)} of {len(cosines)} negative", flush=True)
        print(f"  positions: the true multiset ranks first at {sum(r == 0 for r, _, _ in ranks)} of {length} "
              f"({len(whole)} hold only once-occurring tokens: {sum(r == 0 for r in whole)} first); "
              f"per position (rank, residual, best): {[(r, f'{a:.1e}', f'{b:.1e}') for r, a, b in ranks]}", flush=True)
        print(f"  label sign: {signs} of {len(once)} once-occurring tokens", flush=True)
    print(f"all: true multiset first at {totals['first']} of {totals['positions']} positions "
          f"({totals['whole_first']} of the {totals['whole']} holding only once-occurring tokens); "
          f"label sign right for {totals['signs']} of {totals['once']} once-occurring tokens")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--data", default=None, help="TSV (default: cola_dev.tsv beside the repository)")
    p.add_argument("--multisets", action="store_true", help="run probes 4 and 5 instead of 1-3")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = read_tsv(args.data or default_data_path("cola_dev.tsv"))
    model, tokenizer, _ = load_model(None, 0)
    setup = LoraSetup(r=8, steps=(0, 50), targets=("query", "value"))
    model = wrap_lora(model, setup, 0)
    n = args.batches * args.batch_size
    train_adapters(model, tokenizer, list(rows[n:]) + list(rows[:n]), 50, setup, seed=0, train=False)
    spec = text_model_spec(model).with_tokenizer(tokenizer)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tables = EmbeddingTables.from_params(params, spec)
    encoder = model.base_model.model.bert
    names = [k for k, v in model.named_parameters() if v.requires_grad]
    modules = dict(model.named_modules())
    layer0_a = [modules[a.a.removesuffix(".weight")] for a in spec.layers[0].lora]
    model.eval()
    if args.multisets:
        multiset_probes(model, tokenizer, tables, spec, layer0_a, names, rows, n, args.batch_size)
        return
    rng = random.Random(0)

    def layer1(sentences: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            out = [encoder(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[1][0] for s in sentences]
        return torch.cat(out).double()

    def residual(rows1: torch.Tensor, sentences: list[list[int]]) -> float:
        q, _ = torch.linalg.qr(layer1(sentences).T)
        return float((rows1 - (rows1 @ q) @ q.T).norm() / rows1.norm())

    for index, batch in enumerate(split_batches(rows[:n], args.batch_size)):
        text, grads = batch_gradients(model, tokenizer, batch, names, train=False, seed=index)
        truth = [ids[m.bool()].tolist() for ids, m in zip(text.input_ids, text.attention_mask, strict=True)]
        first = [grads[a.a].double() for a in spec.layers[0].lora]
        bag = sparse_bag(first, tables)
        pairs = [(v, i) for i in range(bag.length) for v in bag.tokens.tolist()]
        atoms = tables.pair_inputs(torch.tensor([v for v, _ in pairs]), torch.tensor([i for _, i in pairs]))
        target = torch.cat(first)
        picked, _, _ = joint_support(target, atoms.float())
        kept = {pairs[picked[k]] for k in prune_support(target, atoms[torch.tensor(picked)])}
        true_pairs = {(t, i) for s in truth for i, t in enumerate(s)}
        # layer 1's adapters (the module after layer 0): their lora_A rows span the layer-1 inputs
        rows1 = torch.cat([grads[a.a].double() for a in spec.layers[1].lora])
        lengths = [len(s) for s in truth]
        sentences = [list(s) for s in truth]
        for i in range(1, max(lengths)):
            alive = [b for b in range(len(sentences)) if lengths[b] - 1 > i]
            tokens = [sentences[b][i] for b in alive]
            rng.shuffle(tokens)
            for b, t in zip(alive, tokens, strict=True):
                sentences[b][i] = t
        current = residual(rows1, sentences)
        improved = True
        while improved:
            improved = False
            for i in range(1, max(lengths)):
                alive = [b for b in range(len(sentences)) if lengths[b] - 1 > i]
                for x in range(len(alive)):
                    for y in range(x + 1, len(alive)):
                        a, b = alive[x], alive[y]
                        if sentences[a][i] == sentences[b][i]:
                            continue
                        trial = [list(s) for s in sentences]
                        trial[a][i], trial[b][i] = trial[b][i], trial[a][i]
                        r = residual(rows1, trial)
                        if r < current * (1 - 1e-9):
                            sentences, current, improved = trial, r, True
        print(f"batch {index}: bag {int(bag.tokens.numel())} tokens (exact: {bag.tokens.tolist() == sorted({t for s in truth for t in s})}), "
              f"length {bag.length}; layer-0 pairs kept {len(kept)} for {len(true_pairs)} true, {len(kept - true_pairs)} wrong; "
              f"swap search: residual {current:.2e} (truth {residual(rows1, truth):.1e}), "
              f"{sum(s in truth for s in sentences)} of {len(truth)} sentences exact", flush=True)
        # 3. the per-sentence certificate from layer 0's token coefficients (peeling's, on 16 adapter rows)
        bag_ids = sorted({t for s in truth for t in s})
        atoms = additive_atoms(tables, bag_ids, max(lengths))
        observed = token_query_gradients(target, atoms)[:, : len(bag_ids)]  # [16, |bag|]
        row = {v: k for k, v in enumerate(bag_ids)}
        counts = Counter(t for s in truth for t in s)
        once = {t for t, c in counts.items() if c == 1} - {tokenizer.cls_token_id, tokenizer.sep_token_id}
        cache: dict[tuple[int, ...], torch.Tensor] = {}

        def certify_all(sentences: list[list[int]]) -> list[float]:
            new = list(dict.fromkeys(tuple(s) for s in sentences if tuple(s) not in cache))
            for k in range(0, len(new), 64):
                chunk = new[k: k + 64]
                directions = sentence_directions(model, layer0_a, [list(s) for s in chunk], tokenizer.pad_token_id)
                split = token_query_gradients(directions.flatten(0, 1), atoms).unflatten(0, directions.shape[:2])
                cache.update(zip(chunk, split[:, :, : len(bag_ids)], strict=True))
            out = []
            for sentence in sentences:
                members = [row[v] for v in set(sentence) if v in once]
                # no once-occurring token: nothing to certify with
                out.append(certify(observed[:, members], cache[tuple(sentence)][None, :, members])[0] if members else 1.0)
            return out

        exchanged = certify_all([
            a[:i] + [b[i]] + a[i + 1:]
            for a in truth for b in truth
            for i in range(1, min(len(a), len(b)) - 1) if a[i] != b[i] and a[i] in once and b[i] in once
        ])
        start = time.monotonic()
        found = certificate_search(truth, certify_all, random.Random(index))
        print(f"  certificate: truth {max(certify_all(truth)):.1e} at most, single exchanges "
              f"{min(exchanged, default=float('nan')):.1e} at least ({len(exchanged)}); oracle-aided search certified "
              f"{len(found)} of {len(truth)}, {sum(s in truth for s in found.values())} true, "
              f"{len(cache)} candidates in {time.monotonic() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
