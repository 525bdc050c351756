"""DP-SGD gradients for the benchmark, produced by Opacus itself, and ε for one epoch.

:class:`DPGradients` makes the gradient DP-SGD releases for one batch exactly as a training run with
Opacus 1.6 does (``PrivacyEngine.make_private(wrap_model=False)``, flat per-sample clipping to
``max_grad_norm``, Gaussian noise ``σ·C``, division by the batch size), and reads it with the same step
pre-hook the callback uses (:class:`~leak_audit.capture.privacy.ReleasedGradientCapture`). The wrapped optimizer
is SGD with learning rate 0, so the model never changes between batches.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from leak_audit.capture.batch import TextBatch
from leak_audit.capture.privacy import DPState, ReleasedGradientCapture, epsilon_for

__all__ = ["DPGradients", "epoch_epsilon"]


def epoch_epsilon(noise_multiplier: float, batch_size: int, dataset_size: int, delta: float = 1e-5) -> float:
    """ε at ``delta`` after one epoch of DP-SGD: ``ceil(N/B)`` steps at sample rate ``B/N``.

    Uses Opacus's RDP accountant (an upper bound). Opacus's default PRV accountant is tighter but failed
    here at small σ (MemoryError asking for 880 GiB at σ = 0.01, B = 1, N = 1043; 49 s at σ = 0.1).
    ``inf`` at σ = 0.

    Raises:
        ValueError: ``batch_size`` or ``dataset_size`` < 1, ``batch_size > dataset_size``, ``delta`` not in
            ``(0, 1)``, or a negative noise multiplier.
    """
    if batch_size < 1 or dataset_size < batch_size:
        raise ValueError(f"need 1 <= batch_size <= dataset_size, got {batch_size} and {dataset_size}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), batch_size / dataset_size, math.ceil(dataset_size / batch_size))]
    return epsilon_for(acc, delta)[0]


class DPGradients:
    """Released DP-SGD gradients of single batches of a Hugging Face sequence classifier.

    Args:
        model: the classifier; every parameter is trained (flat clipping over all of them).
        noise_multiplier: σ (``>= 0``).
        max_grad_norm: ``C`` (``> 0``), the per-sample L2 clipping norm.
        train: dropout on (training mode) or off (training mode with every dropout probability set to 0,
            since Opacus's per-sample hooks only record in training mode).

    Use as a context manager: leaving it removes Opacus's hooks, restores the dropout probabilities and
    puts the model back in eval mode.

    Raises:
        ValueError: ``noise_multiplier < 0`` or ``max_grad_norm <= 0``.
    """

    def __init__(self, model: nn.Module, noise_multiplier: float, max_grad_norm: float, *, train: bool) -> None:
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.model = model
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.train = train
        self._dropout: dict[nn.Dropout, float] = {}
        self._hooks: Any = None

    def __enter__(self) -> DPGradients:
        import warnings

        from opacus import PrivacyEngine

        self.model.train()
        if not self.train:
            self._dropout = {m: m.p for m in self.model.modules() if isinstance(m, nn.Dropout)}
            for m in self._dropout:
                m.p = 0.0
        params = [p for p in self.model.parameters() if p.requires_grad]
        dummy = torch.utils.data.DataLoader(list(range(2)), batch_size=1)  # sample rate: set per batch below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG turned off": seeded noise is the point here
            engine = PrivacyEngine()
            self._hooks, self.optimizer, _ = engine.make_private(
                module=self.model, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=dummy,
                noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm, poisson_sampling=False,
                wrap_model=False,
            )
        self.capture = ReleasedGradientCapture(self.optimizer, dict(self.model.named_parameters()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.capture.remove()
        if self._hooks is not None:
            self._hooks.cleanup()
        for m, p in self._dropout.items():
            m.p = p
        self.model.zero_grad(set_to_none=True)
        self.model.eval()

    def __call__(
        self, tokenizer: Any, batch: Sequence[tuple[str, int]], names: Collection[str], *, seed: int
    ) -> tuple[TextBatch, dict[str, torch.Tensor], DPState]:
        """One released gradient of the batch-mean cross-entropy on ``batch``.

        Args:
            tokenizer: the model's tokenizer (padding to the longest sentence).
            batch: ``B`` ``(sentence, label)`` pairs.
            names: parameter names whose gradients to return.
            seed: seeds the dropout masks (``torch.manual_seed``) and Opacus's noise generator.

        Returns:
            ``(TextBatch, {name: released grad}, DPState)``; the state's ``noise_std`` is ``σ·C/B``.
        """
        enc = tokenizer([s for s, _ in batch], return_tensors="pt", padding=True, truncation=True)
        labels = torch.tensor([y for _, y in batch], dtype=torch.long)
        ids = enc["input_ids"]
        b, n = ids.shape
        # per-sample position and token-type ids: HF broadcasts [1, L] buffers, which per-sample clipping rejects
        types = enc.get("token_type_ids")
        types = torch.zeros_like(ids) if types is None else types
        opt = self.optimizer
        opt.expected_batch_size = b
        opt.generator = torch.Generator().manual_seed(seed)
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with torch.enable_grad():
            loss = self.model(input_ids=ids, attention_mask=enc["attention_mask"], token_type_ids=types,
                              position_ids=torch.arange(n).expand(b, n), labels=labels).loss
            loss.backward()
        self.capture.arm([k for k in names if k in self.capture.parameters])
        opt.step()
        grads = self.capture.take() or {}
        opt.zero_grad(set_to_none=True)
        std = self.noise_multiplier * self.max_grad_norm / b
        state = DPState(self.noise_multiplier, self.max_grad_norm, b, std, None, (), None)
        return TextBatch(ids, enc["attention_mask"], enc.get("token_type_ids"), labels), grads, state
