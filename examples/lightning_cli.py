"""Fine-tune all-MiniLM-L6-v2 from a LightningCLI YAML, with LeakageAudit configured in the YAML.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml --data.data cola_dev.tsv
    python examples/lightning_cli.py fit --print_config          # every option, LeakageAudit's included

The callback is an ordinary ``trainer.callbacks`` entry (``class_path: leak_audit.LeakageAudit`` and its
``init_args``); its ``policy`` may be the path of a policy TOML (the release gate's) or the rules inline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_classification import SequenceClassifier, default_model_path, make_loader  # noqa: E402

from leak_audit.demos.datasets import read_tsv, synthetic_pii_dataset  # noqa: E402


class Classifier(SequenceClassifier):
    """The example's sequence classifier; ``model_path`` defaults to the bundled all-MiniLM-L6-v2."""

    def __init__(self, model_path: str | None = None, num_labels: int = 2, lr: float = 5e-5) -> None:
        super().__init__(model_path or default_model_path(), num_labels=num_labels, lr=lr)


class Sentences(L.LightningDataModule):
    """Labelled sentences from a TSV (``sentence``, ``label``), or the seeded fake-PII demo set.

    Args:
        data: TSV path; ``None``: :func:`~leak_audit.demos.datasets.synthetic_pii_dataset`.
        n: examples to use.
        batch_size: sentences per step.
        max_length: tokens per sentence after truncation.
        seed: data order (and the demo set).
        model_path: the tokenizer's folder (default: the bundled all-MiniLM-L6-v2).
    """

    def __init__(self, data: str | None = None, n: int = 256, batch_size: int = 8, max_length: int = 64,
                 seed: int = 0, model_path: str | None = None) -> None:
        super().__init__()
        self.data, self.n, self.batch_size, self.max_length, self.seed = data, n, batch_size, max_length, seed
        self.model_path = model_path

    def train_dataloader(self) -> DataLoader:
        from transformers import AutoTokenizer

        rows = read_tsv(self.data, limit=self.n) if self.data else synthetic_pii_dataset(self.n, seed=self.seed)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path or default_model_path())
        return make_loader(rows, tokenizer, self.batch_size, self.max_length, self.seed)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(Classifier, Sentences, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
