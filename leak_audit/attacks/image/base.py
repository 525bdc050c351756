"""The registered-attack wrapper the image inversions share (:class:`ImageInversionAttack`).

:class:`~leak_audit.attacks.image.dlg.ImageDLG` (Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019)
and :class:`~leak_audit.attacks.image.inverting_gradients.InvertingGradients` (Geiping, Bauermeister, Dröge,
Moeller, "Inverting Gradients - How easy is it to break privacy in federated learning?", NeurIPS 2020) run
:func:`~leak_audit.attacks.image.inversion.invert_images` with their published configuration. Both match
exactly the tapped gradients (any subset of the network's parameters), run the network functionally at the
snapshot's parameter values (:class:`~leak_audit.models.image_replica.ImageReplica`, eval mode, batch-mean
cross-entropy), clamp images to the public box of valid input values (``AttackInput.input_range``) and stop
at ``max_steps`` gradient evaluations or at the earlier of their own ``max_seconds`` and the audit's
deadline (checked before every gradient evaluation), returning the best images so far; stopped by the
audit's deadline, the result is ``timed_out`` with ``info["progress"]`` (evaluations and restarts run). At
``B = 1`` the label is fixed first by iDLG's rule (:func:`~leak_audit.attacks.image.labels.idlg_label`) when
the last linear layer's gradient is tapped, as in iDLG; otherwise soft labels are optimised with the images
(DLG).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

import torch
from torch import Tensor

from leak_audit.attacks.base import Attack, AttackInput, Budget, NotApplicable, Reconstruction, Requirements
from leak_audit.attacks.image.inversion import IMAGE_ATTACKS, invert_images
from leak_audit.attacks.image.labels import idlg_label
from leak_audit.models.image_replica import ImageReplica
from leak_audit.models import ImageModelSpec

__all__ = ["ImageInversionAttack"]


class ImageInversionAttack(Attack):
    """Registered-attack wrapper of :func:`~leak_audit.attacks.image.inversion.invert_images`: runs the
    :data:`~leak_audit.attacks.image.inversion.IMAGE_ATTACKS` configuration named by the subclass's ``config``.

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
