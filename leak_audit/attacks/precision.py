"""Screening precision: rank many candidates in a cheaper dtype, decide between the best few in float32.

A search attack scores thousands of candidate inputs by running the model on each (span search runs
three to four encoder layers per candidate, most of its time). The *ranking* of a step's candidates
tolerates an error of a few hundredths in the score; accepting a move and certifying an exact result
(``D = 0``) do not. So the candidates are scored in bfloat16 and the few best are rescored in float32.

bfloat16 pays only where the hardware multiplies it natively (CPUs with AVX512-BF16 or AMX, recent GPUs);
elsewhere it is slower than float32. :func:`screening_dtype` therefore *measures* one representative
forward each way and keeps bfloat16 only when it is clearly faster. Measured on this project's 2-core
Xeon (AMX), ``benchmarks/screening_probe.py`` (``benchmarks/README.md``, "Screening in bfloat16"): MiniLM's
layers 0-2 on 64 candidates of an SST-2 review run 1.9-3.2× faster in bfloat16, the layer-3 span distance
``D`` moves by at most 0.02 and the candidates' ranking keeps a rank correlation of at least 0.9994.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["MIN_SPEEDUP", "SCREEN_CHOICES", "cast_floating", "screening_dtype"]

SCREEN_CHOICES: tuple[str, ...] = ("auto", "bfloat16", "off")

MIN_SPEEDUP = 1.3
"""How much faster (float32 time / bfloat16 time) a bfloat16 forward must be for ``"auto"`` to screen in it."""


def cast_floating(params: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """``params`` with every floating-point tensor cast to ``dtype`` (integer buffers unchanged), detached."""
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v) for k, v in params.items()}


def screening_dtype(choice: str, run: Callable[[torch.dtype], Tensor]) -> torch.dtype | None:
    """The dtype to screen candidates in, or ``None`` to score them all in float32.

    Args:
        choice: ``"off"`` (float32 only), ``"bfloat16"`` (always), or ``"auto"``: time ``run`` once per dtype
            after one warm-up call each and screen in bfloat16 only when it is at least :data:`MIN_SPEEDUP`
            times faster (the choice then depends on the machine, like any time-bounded result).
        run: runs one representative forward in the given dtype and returns its output (read back to the host,
            so a GPU's asynchronous work is inside the timing).

    Raises:
        ValueError: ``choice`` is not one of :data:`SCREEN_CHOICES`.
    """
    if choice not in SCREEN_CHOICES:
        raise ValueError(f"screen must be one of {SCREEN_CHOICES}, got {choice!r}")
    if choice == "off":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        float(run(dtype).float().sum())  # warm-up: kernel selection and allocation
        start = time.perf_counter()
        float(run(dtype).float().sum())
        seconds[dtype] = time.perf_counter() - start
    return torch.bfloat16 if seconds[torch.float32] >= MIN_SPEEDUP * seconds[torch.bfloat16] else None
