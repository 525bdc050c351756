"""The contract every gradient-inversion attack follows.

An attack is a pure function of an :class:`AttackInput`: the observed gradients of the tapped
parameters, a snapshot of parameter values, the model's architecture spec and public batch metadata
(the batch size; for images also the image shape and the box of valid pixel values). It never sees the
private batch. It returns a :class:`Reconstruction`, which :mod:`leak_audit.metrics.scoring` scores against the
private batch.

Attacks belong to one modality (:attr:`Attack.modality`, ``"text"`` or ``"image"``): text attacks get a
:class:`~leak_audit.models.TextModelSpec` and a :class:`~leak_audit.models.replica.ModelReplica`, image attacks
an :class:`~leak_audit.models.ImageModelSpec` and an :class:`~leak_audit.models.image_replica.ImageReplica`.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from leak_audit.models.image_replica import ImageReplica
from leak_audit.models import ImageModelSpec, TextModelSpec
from leak_audit.models.replica import ModelReplica

__all__ = [
    "COSTS",
    "NO_TIME_LEFT",
    "Attack",
    "AttackInput",
    "Budget",
    "ModelSpec",
    "NotApplicable",
    "Reconstruction",
    "Requirements",
    "require_classifier",
    "require_encoder",
    "require_layers",
]

NO_TIME_LEFT = "started with no time left"
"""``info["progress"]`` of an attack that returned at once because the audit's deadline had passed."""
COSTS: tuple[str, ...] = ("analytic", "search", "optimisation")
"""Cost classes of attacks, cheapest first: closed-form reads of the gradient (seconds at most), discrete
or continuous searches with exact certificates, and gradient-matching optimisation (runs to its budget)."""

ModelSpec = TextModelSpec | ImageModelSpec
"""Where an audited model keeps the tensors attacks read: text or image."""


class NotApplicable(Exception):
    """The tapped gradients give this attack nothing to work with (the message says what it needs)."""


def require_layers(spec: TextModelSpec) -> None:
    """Raise :class:`NotApplicable` when the model layer does not know the model's layers (a ``"generic"``
    spec): the attack reimplements or reads the first layers by name."""
    if not spec.layers:
        raise NotApplicable(f"reads the first layers by name, and no architecture family knows this "
                            f"{spec.model_type!r} model: register one (leak_audit.models.register_family) to "
                            "read it; model-agnostic attacks: token_bag, labels, gradient_matching")


def require_encoder(spec: TextModelSpec) -> None:
    """Raise :class:`NotApplicable` for a model whose layers are unknown (:func:`require_layers`) or a causal
    decoder: the encoder span attacks assume every position sees the whole sentence and learned absolute
    positions; ``span_decoder`` reads decoders."""
    require_layers(spec)
    if spec.causal:
        raise NotApplicable(f"reads bidirectional encoders (BERT family); this {spec.model_type} model is a causal "
                            "decoder, read by span_decoder")


def require_classifier(spec: TextModelSpec) -> None:
    """Raise :class:`NotApplicable` for a language-model head: the attack matches a classifier's loss, and
    under next-token loss the labels are the text itself."""
    if spec.classifier_weight is None and spec.lm_head is not None:
        raise NotApplicable("matches a sequence classifier's loss; this model trains on next-token loss, where "
                            "the labels are the text itself (span_decoder recovers them)")


@dataclass(frozen=True)
class Requirements:
    """What an attack reads from a snapshot: gradient and parameter names (relative to the audited root)."""

    gradients: frozenset[str] = frozenset()
    params: frozenset[str] = frozenset()
    replica: bool = False
    """The attack runs the model (needs :attr:`AttackInput.replica` and every trainable parameter's value)."""
    replica_scope: tuple[str, ...] | None = None
    """With :attr:`replica`: module names whose trainable parameters the attack's forward reads (it stops
    before the others, e.g. a decoder's first layers); ``None``: every trainable parameter."""


@dataclass(frozen=True)
class Budget:
    """The time limit of one attack run: the earlier of the attack's own limit and the audit's deadline.

    Made by :meth:`AttackInput.budget` when the attack starts. An attack checks :meth:`expired` in every
    loop that can take long, and when it stops because of it and :attr:`audit_bound` is true, it returns a
    :class:`Reconstruction` with ``timed_out=True``: the audit's budget, not the attack's own stopping
    rule, ended it, so its result is partial and must not be read as "found nothing".

    Attributes:
        start: ``time.monotonic()`` when the attack started (seconds).
        deadline: ``time.monotonic()`` value at which the attack must return (``inf``: none).
        audit_bound: the audit's deadline is the earlier limit (stopping at it is a timeout).
    """

    start: float
    deadline: float
    audit_bound: bool

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() >= self.deadline

    def left(self) -> float:
        """Seconds until the deadline (``inf`` without one; negative once passed)."""
        return self.deadline - time.monotonic()

    def fraction(self, share: float) -> float:
        """The ``time.monotonic()`` value when ``share`` (in ``[0, 1]``) of the budget has passed."""
        return self.start + share * (self.deadline - self.start) if math.isfinite(self.deadline) else math.inf


@dataclass(frozen=True)
class AttackInput:
    """Everything an attack may use.

    Attributes:
        gradients: ``{parameter_name: grad}``, the observed gradients (same shapes as the parameters).
        params: ``{parameter_name: value}``, parameter values at the audited step.
        spec: where the model's tensors are, see :class:`~leak_audit.models.TextModelSpec` and
            :class:`~leak_audit.models.ImageModelSpec`.
        batch_size: number of examples ``B`` behind the gradient (public metadata).
        priors: results of attacks that ran earlier in the same audit, by attack name.
        generator: the attack's private random generator (never the global one).
        deadline: ``time.monotonic()`` value after which the attack must return its best so far, with
            ``Reconstruction.timed_out`` set if it had not finished (see :meth:`budget`).
        replica: the model's architecture, to run at ``params`` (attacks whose requirements ask for it).
        noise_std: per-coordinate standard deviation of Gaussian noise in ``gradients`` (DP-SGD's
            ``σ·C/B``, public), ``0.0`` without DP: the noise floor for rank estimation.
        input_shape: shape of one example, public metadata: ``(C, H, W)`` for images; ``()`` for text
            (text attacks infer sequence lengths).
        input_range: ``(low, high)`` box of valid input values for images (public: the preprocessing),
            ``None`` for text.
    """

    gradients: Mapping[str, Tensor]
    params: Mapping[str, Tensor]
    spec: ModelSpec
    batch_size: int
    priors: Mapping[str, Reconstruction] = field(default_factory=dict)
    generator: torch.Generator | None = None
    deadline: float | None = None
    replica: ModelReplica | ImageReplica | None = None
    noise_std: float = 0.0
    input_shape: tuple[int, ...] = ()
    input_range: tuple[float, float] | None = None

    def time_left(self) -> float:
        """Seconds until the deadline (``inf`` without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def budget(self, own_seconds: float = math.inf) -> Budget:
        """The attack's :class:`Budget` from now: ``own_seconds`` (the attack's own time limit, part of
        its definition; ``inf``: none) capped by the audit's :attr:`deadline`."""
        start = time.monotonic()
        own = start + own_seconds
        audit = math.inf if self.deadline is None else self.deadline
        return Budget(start=start, deadline=min(own, audit), audit_bound=audit < own)


@dataclass
class Reconstruction:
    """What an attack recovered. Every field is optional; metrics use what is present.

    Attributes:
        attack: the attack's name.
        sequences: ``B'`` recovered token-id sequences (special tokens included), in the attack's order.
        token_bag: the recovered *set* of token ids, without order or counts.
        position_candidates: for each position ``i``, the token ids the attack found there (any sentence).
        labels: recovered labels; aligned with ``sequences`` (or ``images``) when ``labels_aligned`` is
            true, otherwise an unordered multiset of the batch's labels.
        images: ``[B', C, H, W]`` reconstructed images in the model's input space (image attacks).
        info: diagnostics (ranks, scores, counts), numbers or short strings. A timed-out attack says how
            far it got under ``info["progress"]`` (a short string, e.g. ``"scanned 4096 of 30522 tokens"``).
        timed_out: the audit's time budget stopped the attack before its own stopping rule did (see
            :class:`Budget`): the result is partial, a lower bound on what the attack finds, recorded with
            status ``timeout`` and never as a measured value.
    """

    attack: str
    sequences: list[list[int]] | None = None
    token_bag: list[int] | None = None
    position_candidates: list[list[int]] | None = None
    labels: list[int] | None = None
    labels_aligned: bool = False
    images: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False


class Attack(ABC):
    """Base class of registered attacks.

    Subclasses set :attr:`name`, implement :meth:`requirements` (raising :class:`NotApplicable` when the
    tapped parameters do not suffice) and :meth:`run`. :attr:`uses` lists attacks whose results the attack
    consumes from ``AttackInput.priors`` when they ran first. :attr:`modality` (``"text"`` by default or
    ``"image"``) says which models the attack reads; names are unique per modality. :attr:`cost` (one of
    :data:`COSTS`) places the attack in an audit's fixed run order: cheap analytic attacks first, then
    searches, then optimisation, whatever order the user listed them in.
    """

    name: ClassVar[str]
    uses: ClassVar[tuple[str, ...]] = ()
    modality: ClassVar[str] = "text"
    cost: ClassVar[str] = "analytic"

    @abstractmethod
    def requirements(self, spec: ModelSpec, tapped: Collection[str]) -> Requirements:
        """The gradients (a subset of ``tapped``) and parameters this attack reads.

        Raises:
            NotApplicable: the tapped parameters give the attack nothing to work with.
        """

    @abstractmethod
    def run(self, inp: AttackInput) -> Reconstruction:
        """Reconstruct what the gradients reveal."""

    def __call__(self, inp: AttackInput) -> Reconstruction:
        """Run the attack; called past the audit's deadline (``inp.deadline``), it returns the empty, timed-out
        result at once instead (``info["progress"]`` is :data:`NO_TIME_LEFT`), so :meth:`run` need not check."""
        if inp.deadline is not None and time.monotonic() >= inp.deadline:
            return Reconstruction(attack=self.name, timed_out=True, info={"progress": NO_TIME_LEFT})
        return self.run(inp)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
