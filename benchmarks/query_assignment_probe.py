"""Does span_cluster's certificate tell which audits of layer 0's query alone it recovered? Per batch, its own
evidence next to what each sentence attack recovered, and the audit's lower-bound mark.

    .venv/bin/python benchmarks/query_assignment_probe.py --data ../shared/data/sst2_dev.tsv --batch-sizes 4
    .venv/bin/python benchmarks/query_assignment_probe.py --data ../shared/data/cola_dev.tsv --batch-sizes 4,16

Runs ``leak-audit bench text --views linear:bert.encoder.layer.0.attention.self.query --attacks
span_check,span_attention,span_cluster --dropout off --seed 0 --max-seconds 30 --n 64`` on the pretrained MiniLM (the
single-linear rows of benchmarks/README.md) and prints, for every audited batch, its positions, span_cluster's status,
the sentences it certified (``info.certified``), its ROUGE-1 and exact match against the real batch, span_check's
ROUGE-1, and whether the audit's sentence records are marked lower bounds (``info.lower_bound``:
:func:`leak_audit.attacks.gaps.query_sentence_gap`). The mark reads only span_cluster's certificate count and B; the
ROUGE-1 columns show whether that evidence tells the recovered batches apart; an audit stopped by its budget shows
its partial metrics, marked ``*``. Extra arguments go to the bench (e.g. ``--threads 1``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from leak_audit.cli.main import main as leak_audit
from leak_audit.results.records import LOWER_BOUND, AuditRecord
from leak_audit.runtime.auditor import Auditor

VIEW = "linear:bert.encoder.layer.0.attention.self.query"


def _metric(record: AuditRecord | None, name: str) -> str:
    """The record's metric; for an audit stopped by its budget, its partial metric (what it had certified and
    proposed at the deadline) marked ``*``."""
    if record is None:
        return "–"
    if name in record.metrics:
        return f"{record.metrics[name]:.3f}"
    partial = record.info.get(f"partial_{name}") if record.status == "timeout" else None
    return "–" if partial is None else f"{float(partial):.3f}*"


def _row(records: Sequence[AuditRecord], positions: int) -> str:
    by = {r.attack: r for r in records}
    cluster, check = by.get("span_cluster"), by.get("span_check")
    marked = sorted(r.attack for r in records if r.status == "ok" and r.info.get(LOWER_BOUND))
    cells = [records[0].batch_size, records[0].step, positions, cluster.status if cluster else "–",
             cluster.info.get("certified", "–") if cluster else "–", _metric(cluster, "rouge1"),
             _metric(cluster, "exact_match"), _metric(check, "rouge1"), ", ".join(marked) or "none"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a TSV of sentences (CoLA or SST-2 dev)")
    p.add_argument("--batch-sizes", default="4", help="comma-separated B (default 4)")
    p.add_argument("--n", type=int, default=64, help="sentences (default 64)")
    p.add_argument("--max-seconds", default="30", help="each attack's budget per audit, in seconds (default 30)")
    args, extra = p.parse_known_args(argv)
    real = Auditor.__call__

    def audited(self: Auditor, snapshot, audit: int = 0) -> list[AuditRecord]:
        records = real(self, snapshot, audit)
        print(_row(records, int(snapshot.batch.attention_mask.sum())), flush=True)
        return records

    Auditor.__call__ = audited  # type: ignore[method-assign]
    print("| B | batch | positions | span_cluster | certified | its ROUGE-1 | its exact | span_check ROUGE-1 "
          "| marked lower bounds |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---|")
    try:
        return leak_audit(["bench", "text", "--data", args.data, "--n", str(args.n), "--batch-sizes", args.batch_sizes,
                           "--views", VIEW, "--attacks", "span_check,span_attention,span_cluster", "--dropout", "off",
                           "--seed", "0", "--max-seconds", args.max_seconds, *extra])
    finally:
        Auditor.__call__ = real  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
