"""Registered image attack ``"dlg"``: Deep Leakage from Gradients on image classifiers.

Zhu, Liu, Han, "Deep Leakage from Gradients" (NeurIPS 2019): squared l2 gradient distance, L-BFGS from a
random start, soft labels optimised with the images (or fixed by iDLG's rule at ``B = 1``). The loop is
:func:`~leak_audit.attacks.image.inversion.invert_images`; the wrapper is
:class:`~leak_audit.attacks.image.base.ImageInversionAttack`.
"""

from __future__ import annotations

from leak_audit.attacks.image.base import ImageInversionAttack

__all__ = ["ImageDLG"]


class ImageDLG(ImageInversionAttack):
    """Registered image attack ``"dlg"``: DLG (Zhu et al. 2019), l2 gradient distance with L-BFGS.

    Defaults suit a background audit: 1000 evaluations (a 32×32 CIFAR-10 image on DLG's LeNet: about 5 s
    on one CPU thread), at most 30 s.
    """

    name = "dlg"
    cost = "optimisation"
    config = "dlg"
