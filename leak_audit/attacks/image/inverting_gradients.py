"""Registered image attack ``"inverting_gradients"``: Inverting Gradients on image classifiers.

Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients - How easy is it to break privacy in federated
learning?" (NeurIPS 2020): ``1 − cos`` gradient distance plus total variation, signed Adam with step decay,
the best of several restarts. The loop is :func:`~leak_audit.attacks.image.inversion.invert_images`; the
wrapper is :class:`~leak_audit.attacks.image.base.ImageInversionAttack`.
"""

from __future__ import annotations

from leak_audit.attacks.image.base import ImageInversionAttack

__all__ = ["InvertingGradients"]


class InvertingGradients(ImageInversionAttack):
    """Registered image attack ``"inverting_gradients"``: Geiping et al. (2020), cosine distance plus total
    variation, signed Adam (step 0.1, decayed ×0.1 at 3/8, 5/8, 7/8 of ``max_steps``), 2 restarts by default.
    """

    name = "inverting_gradients"
    cost = "optimisation"
    config = "inverting_gradients"
