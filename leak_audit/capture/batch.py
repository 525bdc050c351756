"""What the audit reads from a training batch, and how a user points it at their own batch layout.

Text: the default adapter (:func:`default_batch_adapter`) understands mappings (``dict``, Hugging Face
``BatchEncoding``) with the keys ``input_ids``, ``attention_mask`` and optionally ``token_type_ids`` and
``labels`` (or ``label``). Images: :func:`default_image_batch_adapter` understands ``(images, labels)``
tuples or lists (a ``TensorDataset`` or torchvision loader) and mappings with ``pixel_values`` or
``images`` and ``labels`` (or ``label``); it reads pixels in ``[0, 1]`` or ``[0, 255]``, and normalised
images need an adapter that declares their public ``value_range`` (:attr:`ImageBatch.bounds`). For any
other layout pass ``batch_adapter=`` to
:class:`~leak_audit.LeakageAudit`, a function from your batch to a :class:`TextBatch` or an
:class:`ImageBatch`::

    def my_adapter(batch):
        ids, mask, y = batch                    # e.g. a tuple from your collate_fn
        return TextBatch(input_ids=ids, attention_mask=mask, labels=y)

    LeakageAudit(..., batch_adapter=my_adapter)
    # normalised with Normalize(0.5, 0.5): declare the box
    LeakageAudit(..., batch_adapter=lambda b: ImageBatch(b["x"], b["y"], value_range=(-1.0, 1.0)))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BatchAdapter",
    "BatchAdapterError",
    "ImageBatch",
    "TextBatch",
    "default_batch_adapter",
    "default_image_batch_adapter",
]


class BatchAdapterError(TypeError):
    """The batch could not be read as a text or image batch (the message says what was found and what is valid)."""


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

    @property
    def device(self) -> torch.device:
        """Where ``input_ids`` lives."""
        return self.input_ids.device

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


@dataclass(frozen=True)
class ImageBatch:
    """The private images of one optimizer step.

    Attributes:
        images: ``[B, C, H, W]`` floating-point model inputs, exactly as the model receives them.
        labels: ``[B]`` int64 class labels.
        value_range: ``(low, high)``, the box of valid input values, from the preprocessing (public):
            ``(0, 1)`` for pixels scaled to ``[0, 1]``, ``(-1, 1)`` after ``Normalize(0.5, 0.5)``,
            ``(min_c(-mean_c / std_c), max_c((1 - mean_c) / std_c))`` after ``Normalize(mean, std)`` of
            ``[0, 1]`` pixels. ``None``: only the standard pixel boxes ``(0, 1)`` and ``(0, 255)`` are
            recognised (see :attr:`bounds`); normalised inputs must declare it.

    Raises:
        BatchAdapterError: a wrong rank or dtype, labels that do not match ``B``, or ``low >= high``.
    """

    images: Tensor
    labels: Tensor
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dim() != 4 or not self.images.is_floating_point():
            got = f"{self.images.dtype} tensor of shape {tuple(self.images.shape)}" if isinstance(self.images, Tensor) \
                else type(self.images).__name__
            raise BatchAdapterError(f"images must be a floating-point [B, C, H, W] tensor, got {got}")
        if (not isinstance(self.labels, Tensor) or self.labels.dim() != 1
                or self.labels.dtype != torch.long or self.labels.shape[0] != self.images.shape[0]):
            got = f"{self.labels.dtype} tensor of shape {tuple(self.labels.shape)}" if isinstance(self.labels, Tensor) \
                else type(self.labels).__name__
            raise BatchAdapterError(f"labels must be an int64 [B] tensor with B = {self.images.shape[0]}, got {got}")
        if self.value_range is not None and not float(self.value_range[0]) < float(self.value_range[1]):
            raise BatchAdapterError(f"value_range must be (low, high) with low < high, got {self.value_range}")

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    @property
    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` of valid input values, the box the attacks clamp to (PSNR and SSIM use
        ``high - low`` as the data range). It is public information about the preprocessing, never a
        statistic of the private images: :attr:`value_range` when given, else one of the two standard
        pixel formats, ``(0, 1)`` when every value lies in ``[0, 1]`` or ``(0, 255)`` when every value lies
        in ``[0, 255]`` (which of the two formats a pipeline produces is public; the batch only tells
        which one this is, so a ``[0, 255]`` batch that happens to lie in ``[0, 1]`` is read as ``(0, 1)``:
        declare :attr:`value_range` to be exact).

        Raises:
            BatchAdapterError: no :attr:`value_range` was given and the values lie outside both standard
                boxes (e.g. normalised inputs): the box would have to be read off the private batch.
                Pass ``ImageBatch(images, labels, value_range=(low, high))`` through a ``batch_adapter``.
        """
        if self.value_range is not None:
            return float(self.value_range[0]), float(self.value_range[1])
        if self.images.numel() == 0:
            return 0.0, 1.0
        lo, hi = float(self.images.min()), float(self.images.max())
        for box in ((0.0, 1.0), (0.0, 255.0)):
            if box[0] <= lo and hi <= box[1]:
                return box
        raise BatchAdapterError(
            f"the images lie in [{lo:.4g}, {hi:.4g}], outside both standard pixel boxes [0, 1] and [0, 255], and no "
            "value_range was declared; the attacks' box of valid values must be public, not read off the private "
            "batch. Declare it from your preprocessing (e.g. (-1, 1) after Normalize(0.5, 0.5)): "
            "LeakageAudit(batch_adapter=lambda b: leak_audit.ImageBatch(b[0], b[1], value_range=(low, high)))."
        )

    @property
    def device(self) -> torch.device:
        """Where ``images`` lives."""
        return self.images.device

    def detached_copy(self, device: torch.device | str | None = None) -> ImageBatch:
        """An independent copy (optionally moved to ``device``)."""
        cp = (lambda t: t.detach().to(device, copy=True)) if device is not None else (lambda t: t.detach().clone())
        return ImageBatch(cp(self.images), cp(self.labels), self.value_range)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.labels))

    @staticmethod
    def concat(batches: Sequence[ImageBatch]) -> ImageBatch:
        """Join micro-batches (gradient accumulation) into one batch.

        The joined batch keeps the micro-batches' declared :attr:`value_range` (one that declares none
        takes it from the others).

        Raises:
            BatchAdapterError: the micro-batches' image shapes differ, or they declare different value ranges.
        """
        if len(batches) == 1:
            return batches[0]
        shapes = {tuple(b.images.shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise BatchAdapterError(f"micro-batches of one step have different image shapes {sorted(shapes)}")
        ranges = {tuple(map(float, b.value_range)) for b in batches if b.value_range is not None}
        if len(ranges) > 1:
            raise BatchAdapterError(f"micro-batches of one step declare different value_range {sorted(ranges)}")
        return ImageBatch(torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]),
                          ranges.pop() if ranges else None)  # type: ignore[arg-type]


BatchAdapter = Callable[[Any], TextBatch | ImageBatch]


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
        labels = torch.as_tensor(labels)
        # next-token labels ([B, L], the input ids with -100 on ignored positions) are the text itself, not
        # classes: the scoring compares the reconstructed text with input_ids
        labels = None if labels.dim() == 2 and labels.shape == ids.shape else labels.reshape(-1)
    return TextBatch(ids, mask, batch.get("token_type_ids"), labels)


_IMAGE_KEYS = ("pixel_values", "images")
_LABEL_KEYS = ("labels", "label")


def _describe(batch: Any) -> str:
    """What a batch is, for error messages: its type, keys or element types, and tensor shapes."""
    def one(x: Any) -> str:
        return f"Tensor{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__

    if isinstance(batch, Mapping):
        return f"{type(batch).__name__} with keys {{{', '.join(f'{k!r}: {one(v)}' for k, v in batch.items())}}}"
    if isinstance(batch, list | tuple):
        return f"{type(batch).__name__} of {len(batch)} ({', '.join(one(x) for x in batch[:4])}{', ...' if len(batch) > 4 else ''})"
    return one(batch)


def default_image_batch_adapter(batch: Any) -> ImageBatch:
    """Read an image batch: an ``(images, labels)`` tuple or list, or a mapping with ``pixel_values`` or
    ``images`` and ``labels`` (or ``label``). Images ``[B, C, H, W]`` floating point (``[B, H, W]`` is
    read as one channel), labels ``[B]`` integers. It declares no ``value_range``: the box is then a
    standard pixel box, and normalised images fail their audit (:attr:`ImageBatch.bounds`) until an
    adapter declares it.

    Raises:
        BatchAdapterError: another layout; the message describes the batch it got, the layouts this
            adapter reads, and how to pass a ``batch_adapter``.
    """
    if isinstance(batch, ImageBatch):
        return batch
    images = labels = None
    if isinstance(batch, Mapping):
        images = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    elif isinstance(batch, list | tuple) and len(batch) == 2:
        images, labels = batch
    if not isinstance(images, Tensor) or labels is None:
        raise BatchAdapterError(
            f"cannot read an image batch from {_describe(batch)}; the default image adapter reads an "
            "(images, labels) tuple or list, or a mapping with 'pixel_values' or 'images' and 'labels' or 'label' "
            "(images [B, C, H, W] float, labels [B] int). Pass LeakageAudit(batch_adapter=fn) with "
            "fn(batch) -> leak_audit.ImageBatch(images, labels)."
        )
    if images.dim() == 3:
        images = images[:, None]
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise BatchAdapterError(f"labels must be integer class ids, got {labels.dtype} in {_describe(batch)}")
    return ImageBatch(images, labels.reshape(-1).long())
