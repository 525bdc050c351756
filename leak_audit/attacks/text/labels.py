"""Registered attack ``"labels"``: labels from a text classifier's last-layer gradient.

iDLG (Zhao, Mopuri, Bilen 2020) at ``B = 1`` and label counts at ``B > 1``; the formulas and their sources
are in :mod:`leak_audit.attacks.labels`. The image attack of the same name subclasses this one
(:class:`~leak_audit.attacks.image.labels.ImageLabelRecovery`).
"""

from __future__ import annotations

from collections.abc import Collection

from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements, require_classifier
from leak_audit.attacks.labels import label_counts_from_bias, label_from_weight
from leak_audit.models import TextModelSpec

__all__ = ["LabelRecovery"]


class LabelRecovery(Attack):
    """Registered attack ``"labels"``: labels from the classifier's last-layer gradient.

    Uses the classifier bias gradient when tapped (exact at ``B = 1``, counts at ``B > 1``); otherwise the
    weight gradient (iDLG, ``B = 1``, ≥ 3 classes). Analytic (a few vector operations, no time limit of
    its own): it only checks that the audit's deadline has not passed when it starts (then it returns at
    once, timed out).
    """

    name = "labels"

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        require_classifier(spec)
        names = [n for n in (spec.classifier_bias, spec.classifier_weight) if n is not None and n in tapped]
        if not names:
            raise NotApplicable(
                f"needs the classifier's gradient ({spec.classifier_weight or 'no classifier found'}), "
                "which is not tapped"
            )
        return Requirements(gradients=frozenset(names))

    def run(self, inp: AttackInput) -> Reconstruction:
        spec = inp.spec
        bias = inp.gradients.get(spec.classifier_bias) if spec.classifier_bias else None
        weight = inp.gradients.get(spec.classifier_weight) if spec.classifier_weight else None
        if bias is not None:
            counts = label_counts_from_bias(bias, inp.batch_size)
            labels = [c for c, n in enumerate(counts) for _ in range(n)]
            source = "bias"
        elif weight is not None:
            if inp.batch_size != 1:
                raise NotApplicable("label recovery from the weight gradient alone needs B = 1; tap the bias too")
            labels = [label_from_weight(weight)]
            source = "weight"
        else:
            raise NotApplicable("no classifier gradient in this snapshot")
        return Reconstruction(attack=self.name, labels=labels, labels_aligned=False, info={"source": source})
