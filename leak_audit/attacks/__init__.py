"""Gradient-inversion attacks: the :class:`Attack` contract, the registry, and the attacks by modality.

Layout: :mod:`~leak_audit.attacks.base` (the contract: :class:`Attack`, :class:`AttackInput`,
:class:`Reconstruction`), :mod:`~leak_audit.attacks.registry` (names to classes per modality),
:mod:`~leak_audit.attacks.defaults` (which attacks an audit runs),
:mod:`~leak_audit.attacks.budget` (deadline checks), the numerics several attacks share
(:mod:`~leak_audit.attacks.spans`, :mod:`~leak_audit.attacks.lasso`, :mod:`~leak_audit.attacks.least_squares`,
:mod:`~leak_audit.attacks.optim`, :mod:`~leak_audit.attacks.labels`, :mod:`~leak_audit.attacks.evidence`), then
:mod:`leak_audit.attacks.text` (encoders: BERT, DistilBERT; decoders: Llama family, GPT-2) and :mod:`leak_audit.attacks.image` (image
classifiers). Use :func:`get_attack` to build a registered attack by name and :func:`register_attack` to
add your own :class:`Attack` subclass.
"""

from __future__ import annotations

from leak_audit.attacks.base import COSTS, Attack, AttackInput, Budget, NotApplicable, Reconstruction, Requirements
from leak_audit.attacks.defaults import (
    DEFAULT_ATTACKS, DEFAULT_DECODER_ATTACKS, DEFAULT_GENERIC_ATTACKS, DEFAULT_IMAGE_ATTACKS, check_requested, default_attacks, resolve_attacks,
)
from leak_audit.attacks.registry import available_attacks, check_attack_name, get_attack, order_attacks, register_attack
from leak_audit.models import MODALITIES

__all__ = [
    "DEFAULT_ATTACKS",
    "DEFAULT_DECODER_ATTACKS",
    "DEFAULT_GENERIC_ATTACKS",
    "DEFAULT_IMAGE_ATTACKS",
    "MODALITIES",
    "Attack",
    "AttackInput",
    "Budget",
    "COSTS",
    "NotApplicable",
    "Reconstruction",
    "Requirements",
    "available_attacks",
    "check_attack_name",
    "check_requested",
    "default_attacks",
    "get_attack",
    "order_attacks",
    "register_attack",
    "resolve_attacks",
]
