"""Registered image attacks: the callback-facing wrappers of :mod:`~leak_audit.attacks.image.inversion`.

* ``dlg`` (:class:`ImageDLG`): Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019): squared l2
  gradient distance, L-BFGS from a random start, soft labels optimised with the images.
* ``inverting_gradients`` (:class:`InvertingGradients`): Geiping, Bauermeister, Dröge, Moeller (NeurIPS
  2020): ``1 − cos`` gradient distance plus total variation, signed Adam with step decay, restarts.
* ``labels`` (:class:`ImageLabelRecovery`): iDLG (Zhao, Mopuri, Bilen 2020) label recovery from the last
  linear layer's gradient, exact at ``B = 1`` (label counts at ``B > 1``).

Both inversions match exactly the tapped gradients (any subset of the network's parameters), run the
network functionally at the snapshot's parameter values (:class:`~leak_audit.models.image_replica.ImageReplica`,
eval mode, batch-mean cross-entropy), clamp images to the public box of valid input values
(``AttackInput.input_range``) and stop at ``max_steps`` gradient evaluations or at the earlier of their
own ``max_seconds`` and the audit's deadline (checked before every gradient evaluation), returning the
best images so far; stopped by the audit's deadline, the result is ``timed_out`` with ``info["progress"]``
(evaluations and restarts run). At ``B = 1`` the label is
fixed first by iDLG's rule when the last linear layer's gradient is tapped, as in iDLG; otherwise soft
labels are optimised with the images (DLG).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import ClassVar

import torch
from torch import Tensor

from leak_audit.attacks.budget import started_late
from leak_audit.attacks.base import Attack, AttackInput, Budget, NotApplicable, Reconstruction, Requirements
from leak_audit.attacks.image.inversion import IMAGE_ATTACKS, invert_images
from leak_audit.attacks.labels import LabelRecovery, label_counts_from_bias, label_from_weight
from leak_audit.models.image_replica import ImageReplica
from leak_audit.models import ImageModelSpec

__all__ = ["ImageDLG", "ImageLabelRecovery", "InvertingGradients", "idlg_label"]


def idlg_label(spec: ImageModelSpec, gradients: Mapping[str, Tensor]) -> tuple[int | None, str]:
    """The label of a single example (``B = 1``) by iDLG's rule, and where it came from.

    Returns:
        ``(label, "bias")`` from the classifier bias gradient (``argmin``, exact for cross-entropy),
        ``(label, "weight")`` from the weight gradient alone (the row whose sign differs; needs ≥ 3
        classes), or ``(None, reason)`` when neither is tapped or the rule is ambiguous.
    """
    bias = gradients.get(spec.classifier_bias) if spec.classifier_bias else None
    if bias is not None:
        return label_counts_from_bias(bias, 1).index(1), "bias"
    weight = gradients.get(spec.classifier_weight) if spec.classifier_weight else None
    if weight is None:
        return None, "soft (the last linear layer's gradient is not tapped)"
    try:
        return label_from_weight(weight), "weight"
    except NotApplicable as exc:
        return None, f"soft ({exc})"


class _ImageInversionAttack(Attack):
    """Shared run of the :data:`~leak_audit.attacks.image.inversion.IMAGE_ATTACKS` configuration ``config``.

    Args:
        max_steps: gradient evaluations per restart at most (L-BFGS line-search calls included).
        max_seconds: the attack's own wall-clock budget in seconds, capped by the audit's deadline
            (:meth:`~leak_audit.attacks.base.AttackInput.budget`).
        restarts: random starts; the lowest gradient distance wins (``None``: the configuration's own).

    Raises:
        ValueError: an option out of range (the message names the value and the valid range).
    """

    modality: ClassVar[str] = "image"
    config: ClassVar[str]

    def __init__(self, *, max_steps: int = 1000, max_seconds: float = 30.0, restarts: int | None = None) -> None:
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be in (0, inf), got {max_seconds!r}")
        if restarts is not None and (not isinstance(restarts, int) or restarts < 1):
            raise ValueError(f"restarts must be an integer >= 1 or None, got {restarts!r}")
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.restarts = restarts

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_steps={self.max_steps}, max_seconds={self.max_seconds})"

    def requirements(self, spec: ImageModelSpec, tapped: Collection[str]) -> Requirements:  # type: ignore[override]
        names = frozenset(n for n in tapped if n in spec.parameter_names)
        if not names:
            where = repr(spec.network) if spec.network else "the LightningModule"
            raise NotApplicable(f"none of the tapped parameters belongs to the image network {where}")
        return Requirements(gradients=names, replica=True)

    def run(self, inp: AttackInput) -> Reconstruction:
        budget = inp.budget(self.max_seconds)
        if (late_start := started_late(self.name, budget)) is not None:
            return late_start
        with torch.enable_grad():  # the auditor runs attacks under no_grad; inversion differentiates
            return self._run(inp, budget)

    def _run(self, inp: AttackInput, budget: Budget) -> Reconstruction:
        spec, replica = inp.spec, inp.replica
        if not isinstance(spec, ImageModelSpec) or not isinstance(replica, ImageReplica):
            raise NotApplicable(f"{self.name} inverts image classifiers: it needs an ImageModelSpec and an ImageReplica")
        if len(inp.input_shape) != 3:
            raise NotApplicable(f"the image shape (C, H, W) is unknown (got {inp.input_shape})")
        names = sorted(n for n in inp.gradients if n in replica.parameter_names)
        if not names:
            raise NotApplicable("none of the tapped gradients belongs to the image network")
        targets = [inp.gradients[n] for n in names]
        device = targets[0].device
        params = dict(inp.params)
        num_classes = spec.num_labels or int(
            replica.logits(params, torch.zeros(1, *inp.input_shape, device=device)).shape[-1]
        )
        label, label_source = idlg_label(spec, inp.gradients) if inp.batch_size == 1 else (None, "soft")
        known = torch.tensor([label]) if label is not None else None

        def grad_fn(x: Tensor, y: Tensor, create_graph: bool) -> list[Tensor]:
            # candidates live on the CPU (invert_images draws them there); the copy is differentiable
            return replica.gradients(params, names, x.to(device), y.to(device), create_graph=create_graph)

        options = {**IMAGE_ATTACKS[self.config], "max_steps": self.max_steps}
        if self.restarts is not None:
            options["restarts"] = self.restarts
        res = invert_images(
            grad_fn, targets, (inp.batch_size, *inp.input_shape), num_classes, labels=known,
            bounds=inp.input_range, deadline=budget.deadline,
            generator=inp.generator, **options,  # type: ignore[arg-type]
        )
        info = {
            "steps": res.steps,
            "restarts": res.restarts,
            "distance": float(res.distance),
            "label_source": label_source,
            "matched_tensors": len(names),
            "seconds": round(res.seconds, 3),
        }
        timed_out = res.cut_short and budget.audit_bound
        if timed_out:
            info["progress"] = (
                f"{res.steps} gradient evaluations over {res.restarts} of {options.get('restarts', 1)} restarts "
                f"(at most {self.max_steps} each)"
            )
        return Reconstruction(
            attack=self.name, images=res.images, labels=[int(v) for v in res.labels.tolist()], labels_aligned=True,
            info=info, timed_out=timed_out,
        )


class ImageDLG(_ImageInversionAttack):
    """Registered image attack ``"dlg"``: DLG (Zhu et al. 2019), l2 gradient distance with L-BFGS.

    Defaults suit a background audit: 1000 evaluations (a 32×32 CIFAR-10 image on DLG's LeNet: about 5 s
    on one CPU thread), at most 30 s.
    """

    name = "dlg"
    cost = "optimisation"
    config = "dlg"


class InvertingGradients(_ImageInversionAttack):
    """Registered image attack ``"inverting_gradients"``: Geiping et al. (2020), cosine distance plus total
    variation, signed Adam (step 0.1, decayed ×0.1 at 3/8, 5/8, 7/8 of ``max_steps``), 2 restarts by default.
    """

    name = "inverting_gradients"
    cost = "optimisation"
    config = "inverting_gradients"


class ImageLabelRecovery(LabelRecovery):
    """Registered image attack ``"labels"``: iDLG's label recovery (:class:`~leak_audit.attacks.labels.LabelRecovery`)
    on the image network's last linear layer (``ImageModelSpec.classifier_bias`` / ``classifier_weight``)."""

    modality: ClassVar[str] = "image"
