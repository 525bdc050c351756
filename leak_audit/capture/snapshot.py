"""What one audit carries from the training thread to the worker."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from leak_audit.capture.batch import ImageBatch, TextBatch
from leak_audit.capture.privacy import DPState

__all__ = ["AuditSnapshot", "FrozenCopy"]

FrozenCopy = Literal["share", "copy", "omit"]
"""What a snapshot holds of a frozen parameter, as the worker decides
(:meth:`~leak_audit.runtime.worker.AuditWorker.frozen_copy`): ``"share"`` the live tensor (the worker reads
it in place), ``"copy"`` a clone, ``"omit"`` nothing (the worker already holds it)."""


@dataclass(frozen=True)
class AuditSnapshot:
    """Everything one audit needs, copied at one optimizer step on the training thread.

    The fields cannot be reassigned; derive a changed snapshot with :func:`dataclasses.replace` (as
    :meth:`to` does). The dicts are the capture's own copies, shared with the worker: never mutate them.

    Attributes:
        step: the optimizer step the gradient belongs to (``trainer.global_step`` before the update).
        epoch: the training epoch.
        time: wall-clock time of the capture, seconds since the epoch.
        gradients: ``{parameter_name: grad}``, the gradient the optimizer applied (after gradient
            accumulation and clipping), for the tapped parameters the attacks use.
        params: ``{parameter_name: tensor}``, parameter values *before* the update, for the parameters the
            attacks need (embedding tables, LayerNorm, ...). Trainable ones are copies; frozen ones are
            shared, copied or left out as the worker's copy rule says
            (:meth:`~leak_audit.runtime.worker.AuditWorker.frozen_copy`).
        batch: the private inputs (a :class:`~leak_audit.capture.batch.TextBatch` or an
            :class:`~leak_audit.capture.batch.ImageBatch`), used to recompute gradients (``recompute="eval"``) and
            to score reconstructions; never given to an attack (only its public shape and value box).
        modules: the tapped module names.
        copied_bytes: bytes copied on the training thread for this snapshot.
        dp: with DP-SGD (Opacus), the DP state at this step: the gradients are then the released ones
            (clipped, noised, scaled), and ``dp.noise_std`` is their per-coordinate noise level.
        audit: the audit's number in the run (1, 2, ...; 0 outside a training run), as in
            :attr:`~leak_audit.results.records.AuditRecord.audit`.
        capture_seconds: seconds the training thread spent copying this snapshot (every micro-batch of the
            step included).
    """

    step: int
    epoch: int
    time: float
    gradients: dict[str, Tensor]
    params: dict[str, Tensor]
    batch: TextBatch | ImageBatch
    modules: tuple[str, ...]
    copied_bytes: int = 0
    dp: DPState | None = None
    audit: int = 0
    capture_seconds: float = 0.0

    def to(self, device: torch.device | str) -> AuditSnapshot:
        """This snapshot with its tensors on ``device`` (itself when they are all there already)."""
        device = torch.device(device)
        tensors = [*self.gradients.values(), *self.params.values()]
        if all(t.device == device for t in tensors) and self.batch.device == device:
            return self
        return replace(
            self,
            gradients={k: v.to(device) for k, v in self.gradients.items()},
            params={k: v.to(device) for k, v in self.params.items()},
            batch=self.batch.detached_copy(device) if self.batch.device != device else self.batch,
        )

    @property
    def batch_size(self) -> int:
        """``B``, the examples in :attr:`batch`."""
        return self.batch.batch_size

    @property
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the DP noise in ``gradients`` (0 without DP)."""
        return self.dp.noise_std if self.dp is not None else 0.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Public shape of one example: ``(C, H, W)`` for images, ``()`` for text."""
        return tuple(int(s) for s in self.batch.images.shape[1:]) if isinstance(self.batch, ImageBatch) else ()

    @property
    def input_range(self) -> tuple[float, float] | None:
        """Public ``(low, high)`` box of valid image values (:attr:`ImageBatch.bounds`: the declared
        ``value_range`` or a standard pixel box, never the batch's own min/max), ``None`` for text.

        Raises:
            BatchAdapterError: image values outside ``[0, 1]`` and ``[0, 255]`` with no declared
                ``value_range``; the auditor records each attack of the audit as failed with this message.
        """
        return self.batch.bounds if isinstance(self.batch, ImageBatch) else None
