"""Image label recovery: iDLG's rule on an image classifier's last linear layer.

Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from Gradients" (2020): the label of a single example is
read from the classifier's bias gradient (or, without it, its weight gradient); at ``B > 1`` the bias
gradient gives label counts. The numerics are :mod:`leak_audit.attacks.labels`, shared with text models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from leak_audit.attacks.base import NotApplicable
from leak_audit.attacks.labels import label_counts_from_bias, label_from_weight
from leak_audit.attacks.text.labels import LabelRecovery
from leak_audit.models import ImageModelSpec

__all__ = ["ImageLabelRecovery", "idlg_label"]


def idlg_label(spec: ImageModelSpec, gradients: Mapping[str, Tensor]) -> tuple[int | None, str]:
    """The label of a single example (``B = 1``) by iDLG's rule, and where it came from.

    Returns:
        ``(label, "bias")`` from the classifier bias gradient (``argmin``, exact for cross-entropy),
        ``(label, "weight")`` from the weight gradient alone (the row whose sign differs; needs ≥ 3
        classes), or ``(None, reason)`` when neither is tapped or the rule is ambiguous.
    """
    bias = gradients.get(spec.classifier_bias) if spec.classifier_bias else None
    if bias is not None:
        return label_counts_from_bias(bias, 1).index(1), "bias"
    weight = gradients.get(spec.classifier_weight) if spec.classifier_weight else None
    if weight is None:
        return None, "soft (the last linear layer's gradient is not tapped)"
    try:
        return label_from_weight(weight), "weight"
    except NotApplicable as exc:
        return None, f"soft ({exc})"


class ImageLabelRecovery(LabelRecovery):
    """Registered image attack ``"labels"``: iDLG's label recovery (:class:`~leak_audit.attacks.text.labels.LabelRecovery`)
    on the image network's last linear layer (``ImageModelSpec.classifier_bias`` / ``classifier_weight``)."""

    modality: ClassVar[str] = "image"
