"""Training step time with and without LeakageAudit (pretrained MiniLM, generated PII tickets).

Trains the same seeded run several ways and prints the median and mean time per optimizer step, the
slowdown against the run without the callback, and the callback's own cost on the training thread
(cloning batch, parameters and gradients), read from the audit log.

    python benchmarks/overhead.py                       # 48 steps, B=8, audit every 8 steps
    python benchmarks/overhead.py --steps 96 --every-n-steps 16

On CPU the background worker competes with training for cores, so the slowdown here is an upper
bound of what a GPU run sees (there the attacks run on a side stream and the CPU stays free).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from text_classification import SequenceClassifier, default_model_path, make_loader  # noqa: E402

from leak_audit import LeakageAudit, read_audit_log  # noqa: E402
from leak_audit.datasets import synthetic_pii_dataset  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of each training batch (forward, backward, optimizer step, and every callback hook)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args) -> None:  # type: ignore[no-untyped-def]
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter() - self._t0)


def run(rows, args, audit: LeakageAudit | None) -> tuple[list[float], float]:
    L.seed_everything(0, verbose=False)
    module = SequenceClassifier(default_model_path())
    loader = make_loader(rows, module.tokenizer, args.batch_size, 64, seed=0)
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=args.steps, callbacks=[timer, *([audit] if audit else [])], logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, accelerator="cpu",
    )
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return timer.times[args.warmup :], time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--every-n-steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the statistics")
    p.add_argument("--train-threads", type=int, default=None, help="torch threads for training (default: torch's)")
    args = p.parse_args()
    if args.train_threads:
        torch.set_num_threads(args.train_threads)
    rows = synthetic_pii_dataset(args.steps * args.batch_size, seed=0)
    settings: dict[str, dict | None] = {
        "no callback": None,
        "whole model": {"modules": None},
        "layer 0 query": {"modules": "bert.encoder.layer.0.attention.self.query"},
        "whole model, eval recompute": {"modules": None, "recompute": "eval"},
    }
    table = Table(title=f"Step time, MiniLM-L6, B={args.batch_size}, {args.steps} steps, audit every {args.every_n_steps}, "
                  f"{torch.get_num_threads()} threads")
    for col in ("setting", "median s/step", "mean s/step", "slowdown (mean)", "total s", "audits ok/skipped",
                "capture ms/audit", "attack s/audit"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    base_mean = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in settings.items():
            audit = None
            if kwargs is not None:
                audit = LeakageAudit(every_n_steps=args.every_n_steps, log_dir=Path(tmp) / name.replace(" ", "_"), **kwargs)
            times, total = run(rows, args, audit)
            mean = statistics.mean(times)
            base_mean = base_mean or mean
            ok = skipped = "-"
            capture = attack_s = "-"
            if audit is not None:
                recs = read_audit_log(audit.log_path)
                audits = {r.audit: r for r in recs}
                ok = str(audit.audits - audit.skipped - audit.failed)
                skipped = str(audit.skipped)
                caps = [r.info["capture_seconds"] for r in audits.values() if "capture_seconds" in r.info]
                capture = f"{1000 * statistics.mean(caps):.1f}" if caps else "-"
                per_audit: dict[int, float] = {}
                for r in recs:
                    if r.status == "ok":  # attack time, plus the recomputation once per audit
                        extra = float(r.info.get("recompute_seconds", 0.0)) if r.audit not in per_audit else 0.0
                        per_audit[r.audit] = per_audit.get(r.audit, 0.0) + r.seconds + extra
                attack_s = f"{statistics.mean(per_audit.values()):.2f}" if per_audit else "-"
            table.add_row(
                name, f"{statistics.median(times):.3f}", f"{mean:.3f}", f"{mean / base_mean:.2f}x", f"{total:.1f}",
                f"{ok}/{skipped}", capture, attack_s,
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
