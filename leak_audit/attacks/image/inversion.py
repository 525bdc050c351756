"""Optimisation-based image reconstruction from gradients: the loop DLG and Inverting Gradients share.

Both attacks search for images ``x`` (``[B, C, H, W]``, in the model's input space) and, when the labels
are unknown, soft labels, such that the gradient they produce at the audited parameters matches the
observed one:

* **DLG** (Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019): squared l2 gradient distance,
  L-BFGS, random start, soft labels optimised jointly (or fixed by iDLG's rule).
* **Inverting Gradients** (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020): ``1 − cos`` gradient
  distance plus a total-variation prior, Adam on the *sign* of the gradient (their code), step size
  decayed by 10 at 3/8, 5/8 and 7/8 of the steps, images clamped to the valid box after every step,
  and the best of several restarts (lowest distance) kept.

:func:`invert_images` is a pure function of a gradient function, the observed gradients and public
metadata (batch shape, number of classes, the box of valid pixel values); it never sees the private
images. :data:`IMAGE_ATTACKS` holds the two published configurations, run by name with
:func:`reconstruct_images`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from leak_audit.attacks.budget import OutOfBudget, late
from leak_audit.attacks.optim import GradientDistance

__all__ = ["IMAGE_ATTACKS", "ImageInversion", "invert_images", "reconstruct_images", "total_variation"]

GradFn = Callable[[Tensor, Tensor, bool], Sequence[Tensor]]
"""``(images [B, C, H, W], labels [B] or soft [B, K], create_graph) -> gradients`` (the matched tensors)."""


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation of ``x`` ``[B, C, H, W]``: mean absolute difference of horizontally and
    vertically neighbouring pixels (Geiping et al. 2020's prior), a scalar."""
    if x.dim() != 4:
        raise ValueError(f"total_variation expects [B, C, H, W], got shape {tuple(x.shape)}")
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    return dx + dy


@dataclass
class ImageInversion:
    """Result of :func:`invert_images`.

    Attributes:
        images: ``[B, C, H, W]`` reconstruction in the model's input space (detached).
        labels: ``[B]`` labels used or recovered (argmax of the soft labels when they were optimised).
        distance: gradient distance of ``images`` (the objective without the prior), lowest over restarts.
        steps: gradient evaluations over all restarts.
        restarts: restarts run.
        seconds: wall-clock time.
        cut_short: the deadline stopped the search before its own end (a restart before ``max_steps`` or
            L-BFGS convergence, or restarts left to run).
    """

    images: Tensor
    labels: Tensor
    distance: float
    steps: int
    restarts: int
    seconds: float
    cut_short: bool = False


def invert_images(
    grad_fn: GradFn,
    targets: Sequence[Tensor],
    shape: Sequence[int],
    num_classes: int,
    *,
    labels: Tensor | None = None,
    loss: str = "l2",
    tv_weight: float = 0.0,
    optimizer: str = "lbfgs",
    lr: float | None = None,
    max_steps: int = 300,
    restarts: int = 1,
    bounds: tuple[float, float] | None = None,
    deadline: float | None = None,
    generator: torch.Generator | None = None,
) -> ImageInversion:
    """Reconstruct a batch of images whose gradient matches ``targets``.

    Args:
        grad_fn: computes the matched gradients of a candidate batch (see :data:`GradFn`), e.g.
            :meth:`~leak_audit.models.image_replica.ImageReplica.gradients` bound to the snapshot.
        targets: the observed gradients, same order as ``grad_fn``'s output.
        shape: ``(B, C, H, W)`` of the batch (public metadata).
        num_classes: ``K``.
        labels: ``[B]`` known labels (e.g. iDLG's); ``None``: soft labels are optimised jointly (DLG).
        loss: gradient distance, ``"l2"`` (DLG) or ``"cos"`` (Inverting Gradients), see
            :class:`~leak_audit.attacks.optim.GradientDistance`.
        tv_weight: weight of :func:`total_variation` (0: none).
        optimizer: ``"lbfgs"`` (strong-Wolfe line search; each evaluation counts as a step) or ``"adam"``
            (signed gradient steps, step decay at 3/8, 5/8, 7/8 of ``max_steps``).
        lr: step size; default 1.0 for L-BFGS, 0.1 for Adam.
        max_steps: gradient evaluations per restart at most.
        restarts: independent random starts; the lowest gradient distance wins.
        bounds: ``(low, high)`` box of valid input values (e.g. ``(0, 1)`` for unnormalised pixels);
            images are clamped to it after every Adam step and at the end. ``None``: unbounded.
        deadline: ``time.monotonic()`` value after which the search stops and returns its best (checked
            before every gradient evaluation; at least one restart runs, its final scoring included), with
            ``cut_short`` set.
        generator: random source of the starts (the attack's own, never the global one).

    Returns:
        An :class:`ImageInversion`.

    Raises:
        ValueError: a bad shape, loss, optimizer or budget (the message names the value and valid ones).
    """
    if len(shape) != 4 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be (B, C, H, W) with positive sizes, got {tuple(shape)}")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: 'lbfgs', 'adam'")
    if max_steps < 1 or restarts < 1:
        raise ValueError(f"max_steps and restarts must be >= 1, got {max_steps} and {restarts}")
    if tv_weight < 0:
        raise ValueError(f"tv_weight must be >= 0, got {tv_weight}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    b = int(shape[0])
    if labels is not None and tuple(labels.shape) != (b,):
        raise ValueError(f"labels must be [B] = [{b}], got shape {tuple(labels.shape)}")
    distance = GradientDistance(targets, loss=loss)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    lr = lr if lr is not None else (1.0 if optimizer == "lbfgs" else 0.1)
    start = time.monotonic()
    best: tuple[float, Tensor, Tensor] | None = None
    steps_total = runs = 0
    cut = False
    for _ in range(restarts):
        if best is not None and late(deadline):
            cut = True  # restarts left
            break
        runs += 1
        x = torch.randn(*[int(s) for s in shape], generator=gen)
        if bounds is not None:
            lo, hi = bounds
            x = (lo + hi) / 2 + (hi - lo) / 4 * x.clamp(-2, 2)
        x.requires_grad_(True)
        z = None if labels is not None else torch.randn(b, num_classes, generator=gen).requires_grad_(True)
        leaves = [x] if z is None else [x, z]
        steps = 0

        def objective() -> Tensor:
            """Gradient distance plus the total-variation prior (differentiable w.r.t. the leaves)."""
            lab = labels if z is None else z.softmax(-1)
            d = distance(grad_fn(x, lab, True))
            return d + tv_weight * total_variation(x) if tv_weight > 0 else d

        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(
                leaves, lr=lr, max_iter=20, history_size=100, line_search_fn="strong_wolfe",
                tolerance_grad=1e-12, tolerance_change=1e-14,
            )

            def closure() -> Tensor:
                nonlocal steps, cut
                if steps >= max_steps:
                    raise OutOfBudget
                if late(deadline):
                    cut = True
                    raise OutOfBudget
                opt.zero_grad()
                total = objective()
                total.backward()
                steps += 1
                return total

            try:
                while steps < max_steps:
                    before = steps
                    opt.step(closure)
                    if steps == before:
                        break
            except OutOfBudget:
                pass
        else:
            opt = torch.optim.Adam(leaves, lr=lr)
            milestones = [int(max_steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            while steps < max_steps:
                if late(deadline):
                    cut = True
                    break
                opt.zero_grad()
                objective().backward()
                x.grad.sign_()  # type: ignore[union-attr]
                opt.step()
                sched.step()
                steps += 1
                if bounds is not None:
                    with torch.no_grad():
                        x.clamp_(*bounds)
        steps_total += steps
        final = x.detach() if bounds is None else x.detach().clamp(*bounds)
        lab = labels if z is None else z.detach().softmax(-1)
        d = float(distance(grad_fn(final, lab, False)))
        if not math.isfinite(d):
            d = math.inf
        if best is None or d < best[0]:
            final_labels = labels if z is None else z.detach().argmax(-1)
            best = (d, final, final_labels)
    assert best is not None
    return ImageInversion(best[1], best[2], best[0], steps_total, runs, time.monotonic() - start, cut_short=cut)


IMAGE_ATTACKS: dict[str, dict[str, object]] = {
    "dlg": {"loss": "l2", "optimizer": "lbfgs", "max_steps": 3000},
    "inverting_gradients": {"loss": "cos", "tv_weight": 1e-4, "optimizer": "adam", "max_steps": 3000, "restarts": 2},
}
"""The published configurations of :func:`invert_images`: DLG (Zhu et al. 2019) and Inverting Gradients
(Geiping et al. 2020, their CIFAR settings: ``tv = 1e-4``, signed Adam at step size 0.1; 2 restarts here
against their 4 to 8, for a CPU budget). ``max_steps`` is per restart."""


def reconstruct_images(
    attack: str,
    grad_fn: GradFn,
    targets: Sequence[Tensor],
    shape: Sequence[int],
    num_classes: int,
    *,
    labels: Tensor | None = None,
    max_steps: int | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    deadline: float | None = None,
    generator: torch.Generator | None = None,
) -> ImageInversion:
    """Run the named configuration of :data:`IMAGE_ATTACKS` (``max_steps`` overrides its default).

    Raises:
        ValueError: an unknown attack (the message lists the valid names), or see :func:`invert_images`.
    """
    if attack not in IMAGE_ATTACKS:
        raise ValueError(f"unknown image attack {attack!r}; valid: {', '.join(IMAGE_ATTACKS)}")
    options = dict(IMAGE_ATTACKS[attack])
    if max_steps is not None:
        options["max_steps"] = max_steps
    return invert_images(grad_fn, targets, shape, num_classes, labels=labels, bounds=bounds, deadline=deadline,
                         generator=generator, **options)  # type: ignore[arg-type]
