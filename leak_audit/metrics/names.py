"""Metric names, importable without torch, scipy or torchmetrics.

The gate, the audit-log reader and the CLI only need the names of the metrics a record may carry, not the
code that computes them; :mod:`leak_audit.metrics.text` and :mod:`leak_audit.metrics.image` (which do
import torch) re-export these tuples.
"""

from __future__ import annotations

__all__ = ["IMAGE_METRICS", "RECORD_METRICS", "SENTENCE_METRICS", "TEXT_METRICS"]

TEXT_METRICS: tuple[str, ...] = (
    "rouge1",
    "rouge2",
    "rougeL",
    "token_precision",
    "token_recall",
    "exact_match",
    "position_recall",
    "label_accuracy",
)
"""Keys :func:`~leak_audit.metrics.text.score_text_reconstruction` may return (all in ``[0, 1]``)."""

SENTENCE_METRICS: frozenset[str] = frozenset({"rouge1", "rouge2", "rougeL", "exact_match"})
"""The text metrics that need the batch's tokens assigned to sentences (a token bag alone reads none of them)."""

IMAGE_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "label_accuracy")
"""Keys :func:`~leak_audit.metrics.image.score_image_reconstruction` may return."""

RECORD_METRICS: tuple[str, ...] = tuple(dict.fromkeys(TEXT_METRICS + tuple(m for m in IMAGE_METRICS if m != "lpips")))
"""Every metric an audit record may carry: the text metrics and the image ones that grow with leakage
(``psnr`` in dB, ``ssim``). LPIPS is a distance (lower = more leakage) and is never a record metric (see
:mod:`leak_audit.metrics.scoring`)."""
