"""The eager argument checks of :class:`~leak_audit.LeakageAudit`: every bad value fails at construction.

Each check names the argument, the value given and what would be valid, as Lightning's own callbacks do.
The choices are module constants, so the CLI help and the checks cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import torch

from leak_audit.gate.breach import BREACH_ACTIONS
from leak_audit.models import MODALITIES
from leak_audit.runtime.worker import WORKER_KINDS

__all__ = ["MODALITY_CHOICES", "RECOMPUTE_CHOICES", "SCOPES", "check_options"]

MODALITY_CHOICES: tuple[str, ...] = ("auto", *MODALITIES)
"""``modality``: decided from the model (``"auto"``) or given."""
RECOMPUTE_CHOICES: tuple[str, ...] = ("observed", "eval")
"""``recompute``: the gradient the optimizer applied, or the step re-run with dropout off."""
SCOPES: tuple[str, ...] = ("global", "local")
"""``scope`` under DDP: the all-reduced gradient, or each rank's own."""


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_options(
    *,
    every_n_steps: Any,
    recompute: Any,
    log_samples: Any,
    max_pending: Any,
    max_seconds: Any,
    worker_threads: Any,
    worker_niceness: Any,
    delta: Any,
    batch_adapter: Any,
    modality: Any,
    network: Any,
    worker: Any,
    on_breach: Any,
    wandb_alert: Any,
    scope: Any,
    attack_device: Any,
    canaries: Any = 0,
) -> torch.device | None:
    """Check the arguments of :class:`~leak_audit.LeakageAudit` (see its docstring for their meaning).

    Returns:
        ``attack_device`` as a :class:`torch.device` (``None`` stays ``None``).

    Raises:
        ValueError: the first argument out of range, naming it, the value and what is valid.
    """
    if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
    _one_of("recompute", recompute, RECOMPUTE_CHOICES)
    _flag("log_samples", log_samples)
    if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
        raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds!r}")
    if worker_threads is not None and worker_threads < 1:
        raise ValueError(f"worker_threads must be >= 1 or None, got {worker_threads!r}")
    if worker_niceness is not None and not 0 <= worker_niceness <= 19:
        raise ValueError(f"worker_niceness must be in 0..19 or None, got {worker_niceness!r}")
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) or None, got {delta!r}")
    if batch_adapter is not None and not callable(batch_adapter):
        raise ValueError(f"batch_adapter must be callable, got {batch_adapter!r}")
    _one_of("modality", modality, MODALITY_CHOICES)
    if network is not None and not isinstance(network, str):
        raise ValueError(f"network must be a module name (str) or None, got {network!r}")
    _one_of("worker", worker, WORKER_KINDS)
    _one_of("on_breach", on_breach, BREACH_ACTIONS)
    _flag("wandb_alert", wandb_alert)
    _one_of("scope", scope, SCOPES)
    if not isinstance(canaries, int) or isinstance(canaries, bool) or canaries < 0:
        raise ValueError(f"canaries must be an int >= 0 (0: none), got {canaries!r}")
    if attack_device is None:
        return None
    try:
        return torch.device(attack_device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"attack_device must name a torch device ('cpu', 'cuda', 'cuda:1', ...) or be None, "
                         f"got {attack_device!r}") from exc
