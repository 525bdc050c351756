"""Build an audit's snapshot on the training thread, hook by hook, over the micro-batches of one step.

What is captured, and when (automatic optimization; :class:`Snapshotter`):

* ``on_train_batch_start``: every micro-batch of the audited optimizer step (:meth:`Snapshotter.add_batch`:
  read by the batch adapter, copied), collected in a :class:`BatchWindow`;
* ``on_before_optimizer_step``: the parameter values the attacks need, *before* the in-place update
  (:meth:`Snapshotter.copy_params`: trainable ones copied; frozen ones as the worker's copy rule says,
  :meth:`~leak_audit.runtime.worker.AuditWorker.frozen_copy`);
* ``on_train_batch_end`` of the micro-batch that stepped (:meth:`Snapshotter.finish`, then
  :meth:`Snapshotter.snapshot`): the gradient the optimizer applied (read from ``.grad``, accumulated and
  after Lightning's gradient clipping), or the one DP-SGD released (a step pre-hook,
  :class:`~leak_audit.capture.privacy.ReleasedGradientCapture`), or this rank's own gradient before DDP's
  all-reduce (``scope="local"``, :class:`~leak_audit.capture.tap.LocalGradientCapture`).

Under DDP with ``scope="global"`` every rank's batch is gathered to every rank at the audited step (a
collective: every rank calls :meth:`Snapshotter.finish` there), and rank 0 attacks the global batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from leak_audit.capture.batch import BatchAdapterError, ImageBatch, TextBatch
from leak_audit.capture.distributed import gather_to_all
from leak_audit.capture.privacy import DPRelease
from leak_audit.capture.snapshot import AuditSnapshot, FrozenCopy
from leak_audit.capture.tap import GradientTap, LocalGradientCapture

__all__ = ["BatchWindow", "FrozenCopyRule", "Snapshotter"]

Batch = TextBatch | ImageBatch


class FrozenCopyRule(Protocol):
    """Whoever reads the snapshot decides how it carries frozen weights: every audit worker
    (:class:`~leak_audit.runtime.worker.AuditWorker`) implements this."""

    def frozen_copy(self, name: str, param: Tensor) -> FrozenCopy:
        """``"share"``, ``"copy"`` or ``"omit"`` for the frozen parameter ``name``
        (:data:`~leak_audit.capture.snapshot.FrozenCopy`)."""
        ...


@dataclass
class BatchWindow:
    """The micro-batches of one audited optimizer step, collected until the step happens.

    Attributes:
        step: the audited optimizer step.
        batches: the micro-batches read so far, copied.
        params: parameter values before the update (``None`` until ``on_before_optimizer_step``).
        copied_bytes: bytes copied so far for this step.
        capture_seconds: seconds the training thread has spent on this step's capture so far.
        error: why the step cannot be audited (a batch the adapter could not read, micro-batches or ranks'
            batches that do not join), or ``None``.
        batch: after :meth:`Snapshotter.finish`, the joined (and, under ``scope="global"`` DDP, gathered)
            batch, or ``None`` when capture failed.
        gradients: after :meth:`Snapshotter.finish`, gradients already copied by a hook during the step (the
            released DP-SGD gradient, or the local one), else ``None``.
        unreleased: after :meth:`Snapshotter.finish` under DP-SGD, set when the optimizer skipped the step
            (a virtual step): nothing was released, there is nothing to audit.
    """

    step: int
    batches: list[Batch] = field(default_factory=list)
    params: dict[str, Tensor] | None = None
    copied_bytes: int = 0
    capture_seconds: float = 0.0
    error: BaseException | None = None
    batch: Batch | None = None
    gradients: dict[str, Tensor] | None = None
    unreleased: RuntimeError | None = None

    def problem(self) -> BaseException | None:
        """Why this step's capture failed (no batch, or the optimizer step was never seen), else ``None``."""
        if self.batch is None:
            return self.error or RuntimeError("no batch was captured for this step")
        if self.params is None:
            return RuntimeError("the optimizer step was not observed (on_before_optimizer_step did not run)")
        return None


class Snapshotter:
    """The training-thread side of a run's audits: one :class:`BatchWindow` at a time, then its snapshot.

    Args:
        tap: the tapped parameters (:class:`~leak_audit.capture.tap.GradientTap`).
        gradient_names: tapped parameters whose gradients the attacks read.
        param_names: parameters whose values the attacks read.
        params: ``{name: parameter}`` of the whole audited module.
        adapter: the batch adapter, ``batch -> TextBatch`` or ``batch -> ImageBatch``.
        modality: ``"text"`` or ``"image"``: which batch type ``adapter`` must return.
        pad_token_id: text: pads micro-batches of different lengths when they are joined (``None``: 0).
        device: where the attacks run; frozen weights on another device are copied there once.
        release: under DP-SGD, the released-gradient hook (:func:`~leak_audit.capture.privacy.attach_dp_release`).
        local: with ``scope="local"``, the backward hooks that sum this rank's own gradient.
        gather: whether every rank's batch is gathered (``scope="global"`` with several processes).
        rank: this process's rank (names it in a gather error).
        recompute: ``"eval"`` copies no gradient (the worker recomputes it).
    """

    def __init__(
        self,
        tap: GradientTap,
        gradient_names: Collection[str],
        param_names: Collection[str],
        params: Mapping[str, torch.nn.Parameter],
        *,
        adapter: Callable[[Any], Batch],
        modality: str,
        pad_token_id: int | None = None,
        device: torch.device | None = None,
        release: DPRelease | None = None,
        local: LocalGradientCapture | None = None,
        gather: bool = False,
        rank: int = 0,
        recompute: str = "observed",
    ) -> None:
        self.tap = tap
        self.gradient_names = frozenset(gradient_names)
        self.param_names = frozenset(param_names)
        self.params = dict(params)
        self.adapter = adapter
        self.modality = modality
        self.pad_token_id = pad_token_id
        self.device = device
        self.release = release
        self.local = local
        self.gather = gather
        self.rank = rank
        self.recompute = recompute
        self.window: BatchWindow | None = None
        self._frozen: dict[str, Tensor] = {}  # frozen weights copied once to another attack device

    def add_batch(self, step: int, batch: Any) -> None:
        """Copy one micro-batch of the audited ``step`` (the first one opens its window and arms the gradient
        hooks). A batch the adapter cannot read fails the audit (``window.error``), never training."""
        t0 = time.perf_counter()
        if self.window is None or self.window.step != step:
            self.window = BatchWindow(step)
            if self.release is not None:
                self.release.capture.arm(self.gradient_names)
            if self.local is not None:
                self.local.arm(self.gradient_names)
        try:
            read = self.adapter(batch)
            expected = ImageBatch if self.modality == "image" else TextBatch
            if not isinstance(read, expected):
                raise BatchAdapterError(f"batch_adapter returned {type(read).__name__}; a {self.modality} model "
                                        f"needs a leak_audit.{expected.__name__}")
            self.window.batches.append(read.detached_copy())
        except Exception as exc:  # noqa: BLE001 - a bad batch fails the audit, not training
            self.window.error = exc
        self.window.capture_seconds += time.perf_counter() - t0

    def copy_params(self, step: int, worker: FrozenCopyRule) -> None:
        """Copy the parameter values the attacks need before the optimizer updates them in place, once per
        audited ``step``: trainable ones are cloned; frozen ones follow the worker's copy rule (shared,
        cloned, or left out), and are copied once to the attack device when it is another one."""
        w = self.window
        if w is None or w.step != step or w.params is not None:
            return
        t0 = time.perf_counter()
        w.params = {}
        for name in self.param_names:
            p = self.params[name]
            rule: FrozenCopy = "copy" if p.requires_grad else worker.frozen_copy(name, p)
            if rule == "omit":  # the worker holds it already
                continue
            if rule == "copy":  # trainable (the update is in place), or a frozen weight the worker cannot share
                w.params[name] = p.detach().clone()
                w.copied_bytes += p.numel() * p.element_size()
            elif self.device is not None and p.device != self.device:  # shared, but attacked elsewhere: copy once
                if name not in self._frozen:
                    self._frozen[name] = p.detach().to(self.device)
                w.params[name] = self._frozen[name]
            else:  # shared: frozen, it never changes
                w.params[name] = p.detach()
        w.capture_seconds += time.perf_counter() - t0

    def finish(self) -> BatchWindow:
        """Close the window of the step that just happened: take the hooks' gradients, join the micro-batches
        and, under ``scope="global"`` DDP, gather every rank's batch (a collective: every rank calls this at
        the audited step). The window's :meth:`~BatchWindow.problem` says whether it can be audited.

        Raises:
            RuntimeError: no window is open.
        """
        w, self.window = self.window, None
        if w is None:
            raise RuntimeError("no audited step is being captured")
        released = self.release.capture.take() if self.release is not None else None  # never kept past its step
        local = self.local.take() if self.local is not None else None
        w.gradients = released if self.release is not None else local
        if self.release is not None and released is None:
            w.unreleased = RuntimeError("the DP optimizer skipped this step (a virtual step): nothing was released")
        w.batch = self._join(w)
        if self.gather:
            w.batch = self._gather(w)
        return w

    def snapshot(self, w: BatchWindow, epoch: int, audit: int) -> tuple[AuditSnapshot, torch.cuda.Event | None]:
        """The snapshot of a finished window that has no :meth:`~BatchWindow.problem`, and the CUDA event the
        worker waits on before reading it (recorded on the training stream after the copies; ``None`` on CPU).

        The gradients are the hooks' (DP-SGD's released gradient, or the local one), none with
        ``recompute="eval"`` (the worker recomputes them), or else copied now from ``.grad``.
        """
        assert w.batch is not None and w.params is not None
        t0 = time.perf_counter()
        dp = self.release.state() if self.release is not None else None
        if w.gradients is not None:
            grads = w.gradients
        elif self.recompute == "eval":
            grads = {}
        else:
            grads = self.tap.capture(self.gradient_names)
        copied = w.copied_bytes + sum(g.numel() * g.element_size() for g in grads.values())
        ready = None
        cuda = [t for t in grads.values() if t.is_cuda]
        if cuda:  # after the copies, on the training stream of the gradients' GPU
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(cuda[0].device))
        snap = AuditSnapshot(
            step=w.step,
            epoch=epoch,
            time=time.time(),
            gradients=grads,
            params=w.params,
            batch=w.batch,
            modules=self.tap.modules,
            copied_bytes=copied + w.batch.nbytes(),
            dp=dp,
            audit=audit,
            capture_seconds=w.capture_seconds + time.perf_counter() - t0,
        )
        return snap, ready

    def empty_snapshot(self, w: BatchWindow, epoch: int, audit: int) -> AuditSnapshot:
        """A snapshot of ``w`` without tensors, to record a failed or skipped audit of it."""
        batch: Batch
        if w.batches:
            batch = w.batches[0]
        elif self.modality == "image":
            batch = ImageBatch(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long))
        else:
            empty = torch.zeros(0, 0, dtype=torch.long)
            batch = TextBatch(empty, empty)
        return AuditSnapshot(step=w.step, epoch=epoch, time=time.time(), gradients={}, params={}, batch=batch,
                             modules=self.tap.modules, audit=audit)

    def close(self) -> None:
        """Remove the DP-SGD hook and disarm the local hooks (end of training)."""
        if self.release is not None:
            self.release.capture.remove()
        if self.local is not None:
            self.local.take()

    def _concat(self, batches: Sequence[Batch]) -> Batch:
        """The micro-batches of one accumulation window (or of every rank) as one batch."""
        if all(isinstance(b, ImageBatch) for b in batches):
            return ImageBatch.concat(batches)  # type: ignore[arg-type]
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        return TextBatch.concat(batches, pad)  # type: ignore[arg-type]

    def _join(self, w: BatchWindow) -> Batch | None:
        """The window's micro-batches as one batch; ``None`` (with ``w.error`` set) when capture failed."""
        if w.error is None and w.batches:
            try:
                return self._concat(w.batches)
            except Exception as exc:  # noqa: BLE001 - micro-batches that do not join fail the audit
                w.error = exc
        return None

    def _gather(self, w: BatchWindow) -> Batch | None:
        """Every rank's batch, joined in rank order (a collective); ``None`` (with ``w.error``) on failure."""
        mine: Batch | str = (
            w.batch.detached_copy("cpu") if w.batch is not None else f"rank {self.rank}: {w.error or 'no batch seen'}"
        )
        parts = gather_to_all(mine)
        bad = [p for p in parts if isinstance(p, str)]
        if bad:
            w.error = RuntimeError("; ".join(bad))  # type: ignore[arg-type]
            return None
        try:
            return self._concat(parts)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001
            w.error = exc
            return None
