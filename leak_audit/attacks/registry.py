"""The attack registry: names to :class:`~leak_audit.attacks.base.Attack` classes, per modality.

Attacks are registered per modality (:attr:`~leak_audit.attacks.base.Attack.modality`); a name may exist in
both (``"dlg"``, ``"labels"``), and the modality picks the class. The built-in attacks are registered when
this module is imported: text attacks (``"token_bag"``, ``"position_match"``, ``"labels"``, ``"span_check"``, ``"span_search"``,
``"span_attention"``, ``"span_cluster"``, ``"gradient_matching"``, ``"dlg"``) read Hugging Face
encoders (BERT, DistilBERT), ``"span_decoder"`` causal decoders (Llama family, GPT-2); image attacks (``"dlg"``,
``"inverting_gradients"``, ``"labels"``) image classifiers.
:func:`get_attack` builds one by name, :func:`register_attack` adds your own subclass, :func:`order_attacks`
fixes the run order of an audit's attacks.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from leak_audit.attacks.base import COSTS, Attack
from leak_audit.attacks.image.dlg import ImageDLG
from leak_audit.attacks.image.inverting_gradients import InvertingGradients
from leak_audit.attacks.image.labels import ImageLabelRecovery
from leak_audit.attacks.text.dlg import DLG
from leak_audit.attacks.text.gradient_matching import GradientMatching
from leak_audit.attacks.text.labels import LabelRecovery
from leak_audit.attacks.text.position_match import PositionMatch
from leak_audit.attacks.text.span_attention import SpanAttention
from leak_audit.attacks.text.span_check import SpanCheck
from leak_audit.attacks.text.span_cluster import SpanCluster
from leak_audit.attacks.text.span_decoder import SpanDecoder
from leak_audit.attacks.text.span_search import SpanSearch
from leak_audit.attacks.text.token_bag import TokenBag
from leak_audit.models import MODALITIES

__all__ = ["available_attacks", "check_attack_name", "get_attack", "order_attacks", "register_attack"]

_REGISTRY: dict[str, dict[str, type[Attack]]] = {m: {} for m in MODALITIES}


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Register an :class:`Attack` subclass under its ``name`` and ``modality`` (usable as a decorator).

    Raises:
        ValueError: the name is empty, the modality or cost class unknown, or the name already registered
            to another class of the same modality.
    """
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no `name`")
    modality = getattr(cls, "modality", "text")
    _check_modality(modality)
    cost = getattr(cls, "cost", COSTS[0])
    if cost not in COSTS:
        raise ValueError(f"{cls.__name__}.cost must be one of {', '.join(COSTS)}, got {cost!r}")
    registry = _REGISTRY[modality]
    if name in registry and registry[name] is not cls:
        raise ValueError(f"a {modality} attack named {name!r} is already registered ({registry[name].__name__})")
    registry[name] = cls
    return cls


BUILT_IN: tuple[type[Attack], ...] = (
    TokenBag, PositionMatch, SpanCheck, LabelRecovery, SpanSearch, SpanAttention, SpanCluster, SpanDecoder, GradientMatching, DLG,
    ImageDLG, InvertingGradients, ImageLabelRecovery,
)
"""The attacks this package ships, registered at import (in this order)."""

for _cls in BUILT_IN:
    register_attack(_cls)


def available_attacks(modality: str = "text") -> list[str]:
    """Names of the attacks registered for ``modality`` (``"text"`` or ``"image"``).

    Raises:
        ValueError: an unknown modality.
    """
    _check_modality(modality)
    return sorted(_REGISTRY[modality])


def check_attack_name(name: str, modalities: Iterable[str] = MODALITIES) -> None:
    """Raise unless ``name`` is registered for at least one of ``modalities``.

    Raises:
        ValueError: unknown name; the message lists the closest registered names and every registered
            attack per modality.
    """
    modalities = list(modalities)
    for m in modalities:
        _check_modality(m)
    if any(name in _REGISTRY[m] for m in modalities):
        return
    elsewhere = [m for m in MODALITIES if m not in modalities and name in _REGISTRY[m]]
    if elsewhere:
        raise ValueError(
            f"attack {name!r} reads {elsewhere[0]} models, but the audited model is {' or '.join(modalities)}; "
            f"{' or '.join(modalities)} attacks: {', '.join(sorted({n for m in modalities for n in _REGISTRY[m]}))}"
        )
    known = sorted({n for m in modalities for n in _REGISTRY[m]})
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if len(modalities) == 1:
        listing = f"Registered attacks: {', '.join(available_attacks(modalities[0]))}"
    else:
        listing = "Registered attacks: " + "; ".join(f"{m}: {', '.join(available_attacks(m))}" for m in modalities)
    where = f" for {modalities[0]} models" if len(modalities) == 1 else ""
    raise ValueError(f"unknown attack {name!r}{where}.{hint} {listing}")


def get_attack(attack: str | Attack, modality: str = "text") -> Attack:
    """An attack instance from a registered name (default arguments) or an :class:`Attack` object.

    Args:
        attack: a name registered for ``modality``, or an attack object (returned as is).
        modality: ``"text"`` (default) or ``"image"``; picks the class when a name exists in both.

    Raises:
        ValueError: unknown name for this modality (the message lists the closest registered names), an
            attack object of another modality, or an unknown modality.
        TypeError: neither a string nor an :class:`Attack`.
    """
    _check_modality(modality)
    if isinstance(attack, Attack):
        if attack.modality != modality:
            raise ValueError(
                f"attack {attack!r} ({attack.name!r}) reads {attack.modality} models, but the audited model is "
                f"{modality}; {modality} attacks: {', '.join(available_attacks(modality))}"
            )
        return attack
    if not isinstance(attack, str):
        raise TypeError(f"attacks are names or Attack objects, got {type(attack).__name__}: {attack!r}")
    check_attack_name(attack, [modality])
    return _REGISTRY[modality][attack]()


def order_attacks(attacks: Iterable[Attack]) -> list[Attack]:
    """The fixed run order of an audit's attacks, whatever order they were listed in.

    Each attack runs after the attacks in its ``uses`` (when present); among those ready, the cheapest
    :attr:`~Attack.cost` class first (:data:`~leak_audit.attacks.base.COSTS`), then by name. Since every
    attack has its own time budget and random generator, the order changes no result; it puts the fast
    exact attacks' records first and lets later attacks reuse their results.
    """
    pending = sorted(attacks, key=_rank)
    names = {a.name for a in pending}
    done: list[Attack] = []
    while pending:
        finished = {d.name for d in done}
        ready = next((a for a in pending if all(u not in names or u in finished for u in a.uses)), None)
        if ready is None:  # a cycle: the rest in rank order
            done.extend(pending)
            break
        done.append(ready)
        pending.remove(ready)
    return done


def _rank(attack: Attack) -> tuple[int, str]:
    cost = getattr(attack, "cost", COSTS[0])
    return (COSTS.index(cost) if cost in COSTS else len(COSTS), attack.name)
