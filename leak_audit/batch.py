"""What the audit reads from a training batch, and how a user points it at their own batch layout.

The default adapter understands mappings (``dict``, Hugging Face ``BatchEncoding``) with the keys
``input_ids``, ``attention_mask`` and optionally ``token_type_ids`` and ``labels`` (or ``label``).
For any other layout pass ``batch_adapter=`` to :class:`~leak_audit.LeakageAudit`, a function from your
batch to a :class:`TextBatch`::

    def my_adapter(batch):
        ids, mask, y = batch                    # e.g. a tuple from your collate_fn
        return TextBatch(input_ids=ids, attention_mask=mask, labels=y)

    LeakageAudit(..., batch_adapter=my_adapter)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchAdapterError", "TextBatch", "default_batch_adapter", "BatchAdapter"]


class BatchAdapterError(TypeError):
    """The batch could not be read as a text batch."""


@dataclass(frozen=True)
class TextBatch:
    """The private inputs of one optimizer step.

    Attributes:
        input_ids: ``[B, L]`` int64 token ids, padded.
        attention_mask: ``[B, L]`` 0/1, 1 on real tokens.
        token_type_ids: ``[B, L]`` int64 segment ids, or ``None``.
        labels: ``[B]`` int64 class labels, or ``None``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor | None = None
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise BatchAdapterError(f"input_ids must be [B, L], got shape {tuple(self.input_ids.shape)}")
        if self.attention_mask.shape != self.input_ids.shape:
            raise BatchAdapterError(
                f"attention_mask shape {tuple(self.attention_mask.shape)} != input_ids shape "
                f"{tuple(self.input_ids.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def sequences(self) -> list[list[int]]:
        """The unpadded token ids of each example (special tokens included)."""
        ids = self.input_ids.detach().cpu()
        mask = self.attention_mask.detach().cpu().bool()
        return [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]

    def detached_copy(self, device: torch.device | str | None = None) -> TextBatch:
        """An independent copy (optionally moved to ``device``)."""

        def cp(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.detach().to(device, copy=True) if device is not None else t.detach().clone()

        return TextBatch(cp(self.input_ids), cp(self.attention_mask), cp(self.token_type_ids), cp(self.labels))  # type: ignore[arg-type]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[Tensor]:
        return [t for t in (self.input_ids, self.attention_mask, self.token_type_ids, self.labels) if t is not None]

    @staticmethod
    def concat(batches: Sequence[TextBatch], pad_token_id: int = 0) -> TextBatch:
        """Join micro-batches (gradient accumulation) into one batch, right-padding to the longest."""
        if len(batches) == 1:
            return batches[0]
        length = max(b.input_ids.shape[1] for b in batches)

        def pad(t: Tensor, value: int) -> Tensor:
            return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

        ids = torch.cat([pad(b.input_ids, pad_token_id) for b in batches])
        mask = torch.cat([pad(b.attention_mask, 0) for b in batches])
        tt = (
            torch.cat([pad(b.token_type_ids, 0) for b in batches])  # type: ignore[arg-type]
            if all(b.token_type_ids is not None for b in batches)
            else None
        )
        labels = torch.cat([b.labels for b in batches]) if all(b.labels is not None for b in batches) else None  # type: ignore[misc]
        return TextBatch(ids, mask, tt, labels)


BatchAdapter = Callable[[Any], TextBatch]


def default_batch_adapter(batch: Any) -> TextBatch:
    """Read a mapping batch with ``input_ids``, ``attention_mask`` [, ``token_type_ids``, ``labels``].

    Raises:
        BatchAdapterError: the batch is not a mapping with ``input_ids``; the message says how to pass a
            ``batch_adapter``.
    """
    if isinstance(batch, TextBatch):
        return batch
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        keys = list(batch.keys()) if isinstance(batch, Mapping) else None
        raise BatchAdapterError(
            f"cannot read a text batch from {type(batch).__name__}"
            + (f" with keys {keys}" if keys is not None else "")
            + "; the default adapter expects a mapping with 'input_ids' and 'attention_mask'. "
            "Pass LeakageAudit(batch_adapter=fn) with fn(batch) -> leak_audit.TextBatch."
        )
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    labels = batch.get("labels", batch.get("label"))
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
    return TextBatch(ids, mask, batch.get("token_type_ids"), labels)
