"""How much memory an audit adds while it runs: :class:`PeakMemory`, sampled beside the work."""

from __future__ import annotations

import os
import threading

import torch

__all__ = ["PeakMemory"]


def _resident_bytes() -> int | None:
    """The process's resident set size in bytes (Linux ``/proc/self/statm``), ``None`` elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """How much memory a block of work added at its peak, sampled every ``interval`` seconds.

    ``with PeakMemory(device) as peak: ...`` then ``peak.bytes``: the largest sample minus the sample at
    entry, in bytes, or ``None`` where it cannot be read. On a CUDA device the samples are the caching
    allocator's allocated bytes on that device (``torch.cuda.memory_allocated``; the global peak counter is
    not reset, so other tools reading it are not disturbed); on CPU, the process's resident set (Linux
    only). Both are process-wide: what training allocates at the same time counts too, and a spike shorter
    than ``interval`` can be missed, so treat the figure as an estimate of the audit's working memory.

    Args:
        device: where the work runs (``None`` or a CPU device: resident memory).
        interval: seconds between samples (> 0).

    Raises:
        ValueError: ``interval <= 0``.
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.02) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._cuda = dev.type == "cuda"
        self._device = dev
        self._interval = interval
        self._stop = threading.Event()
        self._start: int | None = None
        self._peak: int | None = None
        self._thread: threading.Thread | None = None
        self.bytes: int | None = None

    def _sample(self) -> int | None:
        if self._cuda:
            return int(torch.cuda.memory_allocated(self._device))
        return _resident_bytes()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._note(self._sample())

    def _note(self, value: int | None) -> None:
        if value is not None and (self._peak is None or value > self._peak):
            self._peak = value

    def __enter__(self) -> PeakMemory:
        self._start = self._peak = self._sample()
        if self._start is not None:
            self._thread = threading.Thread(target=self._loop, name="leak-audit-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._note(self._sample())
        if self._start is not None and self._peak is not None:
            self.bytes = max(0, self._peak - self._start)
