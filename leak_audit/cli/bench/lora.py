"""LoRA fine-tuning for the benchmark: wrap the model with ``peft`` and train its adapters.

``leak-audit bench text --lora-r R`` attacks the gradients of a LoRA fine-tuning run (Hu et al. 2021, via
Hugging Face ``peft``): the base model is frozen and only the adapters ``A`` (``[r, d_in]``), ``B``
(``[d_out, r]``) and the classifier head (peft's ``modules_to_save``) train. LoRA starts with ``B = 0``,
which leaves every ``lora_A`` gradient exactly zero at the first step, so leakage is measured at
initialisation and again after the adapters have trained for some steps (``--lora-steps 0,50``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leak_audit.models import lora_specs

__all__ = ["DEFAULT_TARGETS", "LoraSetup", "lora_parameter_names", "train_adapters", "wrap_lora"]

DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"),
                                                ("c_attn",))
"""Query and value projections per architecture family (BERT, Llama, DistilBERT, GPT-2), tried in order."""


@dataclass(frozen=True)
class LoraSetup:
    """The LoRA configuration of a benchmark run.

    Attributes:
        r: adapter rank.
        alpha: ``lora_alpha`` (the update is scaled by ``alpha / r``).
        targets: module names to adapt (``peft``'s ``target_modules``), e.g. ``("query", "value")``; empty: the
            model's attention query and value projections (:data:`DEFAULT_TARGETS`, the first pair it has).
        dropout: ``lora_dropout`` (applied to the adapter's input in training mode).
        steps: adapter training steps after which the batches are attacked, ascending (0: at
            initialisation, ``B = 0``).
        lr: AdamW learning rate of that training.
        train_batch_size: batch size of that training.
        causal: the model trains on next-token loss (``labels = input_ids``, -100 on padding) instead of a
            sequence classifier's labels.
    """

    r: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    dropout: float = 0.0
    steps: tuple[int, ...] = (0,)
    lr: float = 1e-3
    train_batch_size: int = 8
    causal: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        if not self.steps or any(s < 0 for s in self.steps) or list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"LoRA steps must be distinct non-negative integers in ascending order, got {self.steps}")


def wrap_lora(model: nn.Module, setup: LoraSetup, seed: int) -> nn.Module:
    """``peft.get_peft_model`` with ``setup`` on a sequence classifier or causal LM (``A`` drawn from ``seed``).

    Returns:
        The peft model, in eval mode: base weights frozen, adapters and head trainable.

    Raises:
        ValueError: a target matches no module of ``model`` (the message lists the linear layers).
    """
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in model.named_modules()}
    linear = sorted(n for n, kind in names.items() if kind in ("Linear", "Conv1D"))
    targets = setup.targets or next((pair for pair in DEFAULT_TARGETS if all(t in linear for t in pair)), ())
    missing = [t for t in targets if t not in linear]
    if missing or not targets:
        raise ValueError(f"LoRA targets {missing or list(targets)} match no linear layer; valid names: {', '.join(linear)}")
    config = LoraConfig(
        r=setup.r, lora_alpha=setup.alpha, target_modules=list(targets), lora_dropout=setup.dropout,
        task_type="CAUSAL_LM" if setup.causal else "SEQ_CLS",
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config).eval()


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the active ``lora_A`` / ``lora_B`` weights of a peft model (:func:`~leak_audit.models.lora_specs`)."""
    return [name for spec in lora_specs(model) for name in (spec.a, spec.b)]


def train_adapters(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[tuple[str, int]],
    steps: int,
    setup: LoraSetup,
    *,
    seed: int,
    train: bool,
    start: int = 0,
) -> None:
    """Train the trainable parameters of ``model`` for ``steps`` AdamW steps, in place.

    Batches of ``setup.train_batch_size`` sentences cycle through ``rows`` in order, beginning where
    ``start`` earlier steps stopped. The model is left in eval mode with its gradients cleared.

    Args:
        model: the peft model.
        tokenizer: its tokenizer.
        rows: ``(sentence, label)`` training data.
        steps: optimizer steps (0: nothing happens).
        setup: learning rate and batch size.
        seed: seeds the dropout masks of the training batches.
        train: training mode (dropout on) during the steps.
        start: steps already trained (a later call continues the cycle through ``rows``).
    """
    if steps <= 0:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setup.lr)
    size = setup.train_batch_size
    batches = itertools.islice(itertools.cycle([rows[i:i + size] for i in range(0, len(rows), size)]), start, None)
    torch.manual_seed(seed)
    model.train(train)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                batch = next(batches)
                enc = tokenizer([s for s, _ in batch], return_tensors="pt", padding=True, truncation=True)
                if setup.causal:
                    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                else:
                    labels = torch.tensor([y for _, y in batch])
                loss = model(**enc, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
