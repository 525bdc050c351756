"""The one collective the audit uses under DDP, called on the Trainer's thread only.

Audits under ``strategy="ddp"`` exchange small Python objects (a batch's token ids or images, finished
audit records) at steps every rank reaches together: the audited optimizer steps and the end of
training. ``torch.distributed.all_gather_object`` does it on any backend (gloo, NCCL); objects are moved
to the CPU before they are sent, so a receiving rank never unpickles a tensor onto another rank's GPU.
Nothing here runs on the audit worker: a collective issued from a background thread would race the
training loop's own collectives on the same process group.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["distributed", "gather_to_all"]

T = TypeVar("T")


def distributed() -> bool:
    """Whether a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_all(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` outside a multi-process group).

    A collective: every rank of the default group must call it at the same point, or the run hangs.
    ``obj`` must be picklable; tensors in it should already be on the CPU.
    """
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
