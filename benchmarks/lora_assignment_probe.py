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
"""

from __future__ import annotations

import argparse
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


def sentence_directions(model: nn.Module, modules: list[nn.Module], sentences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Per-sentence ``∇(z₁ − z₀)`` of the ``lora_A`` weights of ``modules``: ``[S, Σk, d]`` float64 (one padded pass;
    padding gets no gradient, so each row is the sentence's own)."""
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
    blocks = [torch.einsum("blk,bld->bkd", g.double() * mask[..., None], x.double()) for x, g in (taken[k] for k in range(len(modules)))]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--data", default=None, help="TSV (default: cola_dev.tsv beside the repository)")
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
