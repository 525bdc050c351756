"""Why encoder LoRA at B > 1 stops at the token bag: two probes on the pretrained MiniLM (LoRA r = 8 on
query/value, 50 AdamW steps, as ``leak-audit bench text --views lora --lora-steps 50``), first CoLA batches.

    .venv/bin/python benchmarks/lora_assignment_probe.py [--batches 4] [--batch-size 4]

1. **Pairs from layer 0.** RA-ORMP over the (token, position) pairs of the *exact* bag and length
   (:func:`~leak_audit.attacks.text.sparse_bag.sparse_bag`) against layer 0's 16 ``lora_A`` rows: how many
   pairs it keeps and how many are wrong. Every pair lies in one ``tokens + positions + 1``-dimensional span,
   so layer 0 cannot tell them apart.
2. **Assignment by local search at layer 1.** Start from the true per-position token multisets, scrambled
   across sentences (seeded), and swap tokens between sentences at one position while the relative residual
   of layer 1's ``lora_A`` rows outside the span of the batch's layer-1 inputs drops. Prints the residual
   reached, the truth's, and the sentences exact.
"""

from __future__ import annotations

import argparse
import random

import torch

from leak_audit.attacks.pursuit import joint_support, prune_support
from leak_audit.attacks.text.sparse_bag import sparse_bag
from leak_audit.cli.bench.common import default_data_path
from leak_audit.cli.bench.lora import LoraSetup, train_adapters, wrap_lora
from leak_audit.cli.bench.text_run import batch_gradients, load_model, split_batches
from leak_audit.demos.datasets import read_tsv
from leak_audit.models import EmbeddingTables, text_model_spec


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


if __name__ == "__main__":
    main()
