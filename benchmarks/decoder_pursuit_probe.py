"""Does span_decoder's prefix pursuit close? Per batch, its own evidence next to what it recovered.

    .venv/bin/python benchmarks/decoder_pursuit_probe.py --data ../shared/data/sst2_dev.tsv --batch-sizes 4,8
    .venv/bin/python benchmarks/decoder_pursuit_probe.py --data ../shared/data/cola_dev.tsv --batch-sizes 8

Runs ``leak-audit bench text --model smollm2 --task causal-lm --views lora --attacks span_decoder --lora-r 8
--lora-steps 50 --n 16 --seed 0`` (the LoRA rows of docs/decoders.md) and prints, for every audited batch, the
pursuit's relative residual after pruning, its picks, the prefixes it kept, the leaves (sentences) it found, and
the record's ROUGE-1 and exact match against the real batch, and whether the record is marked a lower bound
(``info.lower_bound``: :func:`leak_audit.attacks.gaps.decoder_pursuit_gap`). The mark reads only the pursuit's
evidence (residual, leaves, B); the ROUGE-1 column is what shows whether that evidence tells the failed batches
apart. Extra arguments go to the bench (e.g. ``--threads 1``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from leak_audit.cli.main import main as leak_audit
from leak_audit.results.records import LOWER_BOUND, AuditRecord
from leak_audit.runtime.auditor import Auditor


def _row(record: AuditRecord, positions: int) -> str:
    info = record.info
    metrics = record.metrics
    cells = [record.batch_size, record.step, positions, info.get("pursuit_residual", "–"), info.get("pursuit_picks", "–"),
             info.get("pursuit_kept", "–"), info.get("prefixes", "–"), f"{metrics.get('rouge1', float('nan')):.3f}",
             f"{metrics.get('exact_match', float('nan')):.3f}", "yes" if info.get(LOWER_BOUND) else "no", record.status]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a TSV of sentences (CoLA or SST-2 dev)")
    p.add_argument("--batch-sizes", default="4,8", help="comma-separated B (default 4,8)")
    p.add_argument("--n", type=int, default=16, help="sentences (default 16)")
    args, extra = p.parse_known_args(argv)
    real = Auditor.__call__

    def audited(self: Auditor, snapshot, audit: int = 0) -> list[AuditRecord]:
        records = real(self, snapshot, audit)
        positions = int(snapshot.batch.attention_mask.sum())
        for r in records:
            if r.attack == "span_decoder":
                print(_row(r, positions), flush=True)
        return records

    Auditor.__call__ = audited  # type: ignore[method-assign]
    print("| B | batch | positions | pursuit residual | picks | kept | leaves | ROUGE-1 | exact | lower bound | status |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    try:
        return leak_audit(["bench", "text", "--model", "smollm2", "--task", "causal-lm", "--data", args.data,
                           "--n", str(args.n), "--batch-sizes", args.batch_sizes, "--views", "lora",
                           "--attacks", "span_decoder", "--lora-r", "8", "--lora-steps", "50", "--seed", "0", *extra])
    finally:
        Auditor.__call__ = real  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
