"""Label recovery from the classifier's last-layer gradient (iDLG and a batch variant).

For cross-entropy with logits ``W h + b`` and mean reduction over ``B`` examples,

    ∂L/∂b = (1/B) Σ_b (p_b − y_b),        ∂L/∂W = (1/B) Σ_b (p_b − y_b) h_bᵀ,

with ``p_b`` the softmax output and ``y_b`` the one-hot label.

* ``B = 1`` (iDLG, Zhao, Mopuri, Bilen 2020, "iDLG: Improved Deep Leakage from Gradients"): the only
  negative entry of ``p − y`` is at the true label, so the label is ``argmin ∂L/∂b``. From ``∂L/∂W``
  alone every row is ``(p_c − y_c) h``; the true row is the one whose sign differs from all others
  (needs ≥ 3 classes: with 2 classes the rows are ``±`` each other and the label is ambiguous).
* ``B > 1`` (label counts, after Wainakh et al. 2022, "User-Level Label Leakage from Gradients in
  Federated Learning", and Geng et al. 2021): ``n_c = B (p̄_c − ∂L/∂b_c)``; with no access to the inputs
  the mean prediction ``p̄`` is estimated as uniform, and counts are rounded to sum to ``B``. The result
  is the batch's label *multiset*, not which example carries which label.

These numerics serve text and image models alike; the registered attacks are
:class:`~leak_audit.attacks.text.labels.LabelRecovery` and :class:`~leak_audit.attacks.image.labels.ImageLabelRecovery`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from leak_audit.attacks.base import NotApplicable

__all__ = ["label_counts_from_bias", "label_from_weight"]


def label_counts_from_bias(bias_grad: Tensor, batch_size: int, mean_prediction: Tensor | None = None) -> list[int]:
    """Per-class label counts from the classifier bias gradient.

    Args:
        bias_grad: ``[C]`` gradient of the classifier bias (loss averaged over the batch).
        batch_size: ``B``.
        mean_prediction: ``[C]`` estimate of the batch's mean softmax output ``p̄``; uniform if ``None``.

    Returns:
        ``C`` non-negative counts summing to ``B``. At ``B = 1`` the single count is at ``argmin bias_grad``.

    Raises:
        ValueError: ``bias_grad`` is not 1-D with at least 2 entries, or ``batch_size < 1``.
    """
    if bias_grad.dim() != 1 or bias_grad.numel() < 2:
        raise ValueError(f"expected a [C] bias gradient with C >= 2, got shape {tuple(bias_grad.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = bias_grad.detach().double().cpu()
    c = g.numel()
    if batch_size == 1:
        counts = [0] * c
        counts[int(g.argmin())] = 1
        return counts
    p = torch.full((c,), 1.0 / c, dtype=torch.float64) if mean_prediction is None else mean_prediction.double().cpu()
    est = (batch_size * (p - g)).clamp_min(0)
    est = est * (batch_size / est.sum()) if est.sum() > 0 else torch.full((c,), batch_size / c, dtype=torch.float64)
    floor = est.floor()
    counts = floor.long()
    remainder = est - floor
    for idx in remainder.argsort(descending=True)[: batch_size - int(counts.sum())]:
        counts[idx] += 1
    return counts.tolist()


def label_from_weight(weight_grad: Tensor) -> int:
    """iDLG label of a single example from the classifier weight gradient ``[C, d]``.

    Raises:
        NotApplicable: fewer than 3 classes (the two rows differ only in sign), or an all-zero gradient.
    """
    if weight_grad.dim() != 2:
        raise ValueError(f"expected a [C, d] weight gradient, got shape {tuple(weight_grad.shape)}")
    c = weight_grad.shape[0]
    if c < 3:
        raise NotApplicable(
            "with 2 classes the weight gradient's rows are negatives of each other, so the label is "
            "ambiguous without the classifier bias; tap the classifier module (weight and bias)"
        )
    g = weight_grad.detach().double()
    ref = g[int(g.norm(dim=1).argmax())]
    if float(ref.norm()) == 0:
        raise NotApplicable("the classifier weight gradient is all zeros")
    signs = torch.sign(g @ ref)
    majority = 1.0 if float((signs > 0).sum()) > c / 2 else -1.0
    odd = (signs != majority).nonzero().flatten()
    return int(odd[0]) if odd.numel() else int(g.norm(dim=1).argmax())
