"""Gradient-inversion attacks, one per module, and their registry.

Use :func:`get_attack` to build one by name (``"token_bag"``, ``"span_check"``, ``"span_attention"``, ``"span_cluster"``, ``"labels"``,
``"span_search"``, ...) and
:func:`register_attack` to add your own :class:`Attack` subclass.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements
from leak_audit.attacks.dlg import DLG
from leak_audit.attacks.gradient_matching import GradientMatching
from leak_audit.attacks.labels import LabelRecovery
from leak_audit.attacks.span_attention import SpanAttention
from leak_audit.attacks.span_check import SpanCheck
from leak_audit.attacks.span_cluster import SpanCluster
from leak_audit.attacks.span_search import SpanSearch
from leak_audit.attacks.token_bag import TokenBag

__all__ = [
    "Attack",
    "AttackInput",
    "NotApplicable",
    "Reconstruction",
    "Requirements",
    "available_attacks",
    "get_attack",
    "order_attacks",
    "register_attack",
]

_REGISTRY: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Register an :class:`Attack` subclass under its ``name`` (usable as a decorator).

    Raises:
        ValueError: the name is empty or already registered to another class.
    """
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"an attack named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


for _cls in (TokenBag, SpanCheck, LabelRecovery, SpanSearch, SpanAttention, SpanCluster, GradientMatching, DLG):
    register_attack(_cls)


def available_attacks() -> list[str]:
    """Names of the registered attacks."""
    return sorted(_REGISTRY)


def get_attack(attack: str | Attack) -> Attack:
    """An attack instance from a registered name (default arguments) or an :class:`Attack` object.

    Raises:
        ValueError: unknown name (the message lists the closest registered names).
        TypeError: neither a string nor an :class:`Attack`.
    """
    if isinstance(attack, Attack):
        return attack
    if not isinstance(attack, str):
        raise TypeError(f"attacks are names or Attack objects, got {type(attack).__name__}: {attack!r}")
    if attack not in _REGISTRY:
        close = difflib.get_close_matches(attack, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown attack {attack!r}.{hint} Registered attacks: {', '.join(available_attacks())}")
    return _REGISTRY[attack]()


def order_attacks(attacks: Iterable[Attack]) -> list[Attack]:
    """Order attacks so that each runs after the attacks listed in its ``uses`` (stable otherwise)."""
    pending = list(attacks)
    names = {a.name for a in pending}
    done: list[Attack] = []
    while pending:
        for a in pending:
            if all(u not in names or u in {d.name for d in done} for u in a.uses):
                done.append(a)
                pending.remove(a)
                break
        else:  # a cycle: keep the given order
            done.extend(pending)
            break
    return done
