"""Which attacks an audit runs: the defaults per kind of model, and the user's request checked against the registry.

:class:`~leak_audit.LeakageAudit` checks the requested attacks when it is constructed
(:func:`check_requested`), before it knows the model, and resolves them once ``setup`` has decided the
modality and, for text, whether the model is a causal decoder (:func:`resolve_attacks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from leak_audit.attacks.base import Attack
from leak_audit.attacks.registry import check_attack_name, get_attack
from leak_audit.models import MODALITIES

__all__ = [
    "DEFAULT_ATTACKS", "DEFAULT_DECODER_ATTACKS", "DEFAULT_GENERIC_ATTACKS", "DEFAULT_IMAGE_ATTACKS", "check_requested", "default_attacks",
    "resolve_attacks",
]

DEFAULT_ATTACKS: tuple[str, ...] = (
    "token_bag", "position_match", "span_check", "span_attention", "span_cluster", "labels",
)
"""Text attacks run on encoders (the BERT family) when ``attacks`` is not given. ``span_cluster`` reads layer 0's
query alone (every CoLA sentence at B = 4 in 4.3 s a batch) and skips itself, at no cost, when ``span_attention``
already certified the whole batch (the full view, dropout off). ``position_match`` (B = 1, the embeddings' gradients)
costs well under a second and is the one that reads sentences under small DP-SGD noise (σ ≤ 3e-4 on MiniLM)."""
DEFAULT_DECODER_ATTACKS: tuple[str, ...] = ("span_decoder",)
"""Text attacks run on causal decoders (GPT-2, the Llama family) when ``attacks`` is not given."""
DEFAULT_GENERIC_ATTACKS: tuple[str, ...] = ("token_bag", "labels", "gradient_matching")
"""Text attacks run on a Hugging Face model no architecture family knows (the model-agnostic ones)."""
DEFAULT_IMAGE_ATTACKS: tuple[str, ...] = ("dlg",)
"""Image attacks run when ``attacks`` is not given: DLG, bounded to 1000 evaluations and 30 s per audit."""


def default_attacks(modality: str, *, causal: bool = False, generic: bool = False) -> tuple[str, ...]:
    """The attacks run when none are requested: per ``modality`` (``"text"``, ``"image"``); for text,
    :data:`DEFAULT_GENERIC_ATTACKS` on a model no family knows (``generic``), :data:`DEFAULT_DECODER_ATTACKS` on a
    ``causal`` decoder, else :data:`DEFAULT_ATTACKS`.

    Raises:
        ValueError: an unknown modality.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    if modality == "image":
        return DEFAULT_IMAGE_ATTACKS
    if generic:
        return DEFAULT_GENERIC_ATTACKS
    return DEFAULT_DECODER_ATTACKS if causal else DEFAULT_ATTACKS


def check_requested(attacks: Iterable[str | Attack] | None, modalities: Sequence[str]) -> list[str | Attack] | None:
    """Check requested attacks before the model is known: each a registered name of one of ``modalities`` or an
    :class:`Attack` of one of them, names distinct, at least one. ``None`` (the defaults) passes through.

    Raises:
        ValueError: an empty request, an unknown name (with the close matches), an attack of another modality,
            or a name given twice.
        TypeError: an entry that is neither a name nor an :class:`Attack`.
    """
    if attacks is None:
        return None
    requested = list(attacks)
    if not requested:
        raise ValueError("attacks is empty; name at least one (e.g. 'span_check', or 'dlg' for images), "
                         "or pass None for the defaults")
    for a in requested:
        if isinstance(a, str):
            check_attack_name(a, modalities)
        elif isinstance(a, Attack):
            if a.modality not in modalities:
                raise ValueError(f"attack {a!r} reads {a.modality} models; valid here: {', '.join(modalities)}")
        else:
            raise TypeError(f"attacks are names or Attack objects, got {type(a).__name__}: {a!r}")
    names = [a if isinstance(a, str) else a.name for a in requested]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks must have distinct names, got {names}")
    return requested


def resolve_attacks(
    requested: Sequence[str | Attack] | None, modality: str, *, causal: bool = False, generic: bool = False
) -> list[Attack]:
    """The :class:`Attack` objects of a request (checked by :func:`check_requested`) for the model's ``modality``;
    ``None``: :func:`default_attacks`. A name present in both modalities (``"dlg"``) gets that modality's class.

    Raises:
        ValueError: a name not registered for ``modality``.
    """
    return [get_attack(a, modality) for a in (requested or default_attacks(modality, causal=causal, generic=generic))]
