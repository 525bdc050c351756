"""Group lasso by FISTA: the convex sparse solver of the span attacks (the greedy one: :mod:`~leak_audit.attacks.pursuit`).

``min_Y ½‖T − A(Y)‖² + λ Σ_g w_g ‖Y_g‖₂`` solved by FISTA (Beck & Teboulle, "A Fast Iterative
Shrinkage-Thresholding Algorithm for Linear Inverse Problems", SIAM J. Imaging Sci. 2009) with group
soft-thresholding, optionally reweighted between rounds (reweighted ℓ1, Candès, Wakin & Boyd, "Enhancing
Sparsity by Reweighted ℓ1 Minimization", J. Fourier Anal. Appl. 2008). Two data layouts use it:

* **Shared atoms** (``targets [k, d]``, ``atoms [n, d]``, coefficients ``W [k, n]``): every row of the
  target is a combination of the same few atoms, a group is one atom's column ``W[:, a]``. The convex
  (ℓ2,1) relaxation of joint sparse recovery from multiple measurement vectors (Cotter, Rao, Engan,
  Kreutz-Delgado 2005; Tropp 2006); :func:`~leak_audit.attacks.text.span_check.partial_span` uses it.
* **Per-head atoms** (``targets [m, H, d_h]``, ``atoms [N, H, d_h]``): head ``h`` of a target is explained by
  head ``h`` of the atoms, a group is one atom's coefficients over the ``H`` heads, either per target (``m``
  independent problems: :mod:`~leak_audit.attacks.text.span_cluster`) or over the heads and all targets at
  once (``joint=True``, one problem whose targets are the members of one sentence:
  :mod:`~leak_audit.attacks.text.word_order`). Both maps are batched matrix products over the heads.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from leak_audit.attacks.budget import late

__all__ = ["LassoFit", "group_lasso"]


class LassoFit(NamedTuple):
    """Result of :func:`group_lasso`.

    Attributes:
        norms: group norms ``‖Y_g‖₂`` (the support scores): ``[n]`` for shared atoms, ``[m, N]`` per head
            (``[1, N]`` with ``joint``).
        cut: the deadline stopped the iterations before their own end (convergence, ``iterations`` and
            ``rounds``): ``norms`` are those reached so far.
    """

    norms: Tensor
    cut: bool


class _SharedAtoms:
    """``targets [k, d]`` as ``W [k, n] @ atoms [n, d]``; a group is a column of ``W``."""

    def __init__(self, targets: Tensor, atoms: Tensor) -> None:
        self.targets, self.atoms = targets, atoms
        self.problems = 1

    def lipschitz(self) -> float:
        return float(torch.linalg.matrix_norm(self.atoms, 2)) ** 2

    def zeros(self) -> Tensor:
        return torch.zeros(self.targets.shape[0], self.atoms.shape[0], dtype=self.atoms.dtype, device=self.atoms.device)

    def apply(self, coef: Tensor) -> Tensor:
        return coef @ self.atoms

    def adjoint(self, residual: Tensor) -> Tensor:
        return residual @ self.atoms.T

    def group_norms(self, coef: Tensor) -> Tensor:
        """Group norms, broadcastable against ``coef``."""
        return coef.norm(dim=0, keepdim=True)

    def scores(self, coef: Tensor) -> Tensor:
        """Group norms ``[n]``."""
        return coef.norm(dim=0)

    def threshold(self, lam: float, lipschitz: float, weights: Tensor | None) -> float | Tensor:
        return lam * float(self.adjoint(self.targets).norm(dim=0).max()) / lipschitz


class _HeadAtoms:
    """``targets [m, H, d_h]``, each head explained by the same head of ``atoms [N, H, d_h]``.

    Coefficients are kept as ``[H, N, m]``, so both maps are one batched matrix product over the heads (an
    einsum over the natural ``[m, N, H]`` layout, with the atoms repeated per member for a joint fit, took
    55.4 s of a 90 s SST-2 audit where this takes 18.7 s: benchmarks/README.md, "A slower machine, and the
    speed-ups of 2026-12-06"). A group is one atom's coefficients over
    the heads, per target (``joint=False``: ``m`` independent problems, scores ``[m, N]``), or over the heads and
    every target together (``joint=True``: one problem, scores ``[1, N]``).
    """

    def __init__(self, targets: Tensor, atoms: Tensor, joint: bool) -> None:
        self.targets = targets.permute(1, 2, 0).contiguous()  # H x d_h x m
        self.d = atoms.permute(1, 2, 0).contiguous()  # H x d_h x N
        self.dt = self.d.transpose(1, 2).contiguous()  # H x N x d_h
        self.joint = joint
        self.problems = 1 if joint else targets.shape[0]

    def lipschitz(self) -> float:
        return float(torch.linalg.matrix_norm(self.d, 2).max()) ** 2

    def zeros(self) -> Tensor:
        h, _, m = self.targets.shape
        return torch.zeros(h, self.d.shape[2], m, dtype=self.d.dtype, device=self.d.device)

    def apply(self, coef: Tensor) -> Tensor:
        return torch.bmm(self.d, coef)

    def adjoint(self, residual: Tensor) -> Tensor:
        return torch.bmm(self.dt, residual)

    def group_norms(self, coef: Tensor) -> Tensor:
        """Group norms, broadcastable against ``coef`` ``[H, N, m]``."""
        # not Tensor.norm: over an outer dimension it is several times slower on CPU (benchmarks/README.md)
        return coef.square().sum(dim=(0, 2) if self.joint else 0, keepdim=True).sqrt()

    def scores(self, coef: Tensor) -> Tensor:
        """Group norms ``[problems, N]``."""
        return self.group_norms(coef)[0].T

    def threshold(self, lam: float, lipschitz: float, weights: Tensor | None) -> float | Tensor:
        lam0 = self.scores(self.adjoint(self.targets)).max(1).values[:, None].clamp_min(1e-300)
        if weights is None:  # every group weighs 1
            weights = torch.ones(self.problems, self.d.shape[2], dtype=self.d.dtype, device=self.d.device)
        return (lam * lam0 * weights / lipschitz).T[None]  # [1, N, problems]: broadcasts over heads (and members)


def group_lasso(
    targets: Tensor,
    atoms: Tensor,
    *,
    lam: float,
    iterations: int,
    penalty: Tensor | None = None,
    rounds: int = 1,
    eps: float = 1e-3,
    tol: float | None = None,
    check_every: int = 1,
    floor: float = 1e-300,
    lipschitz: float | None = None,
    joint: bool = False,
    deadline: float | None = None,
) -> LassoFit:
    """Group-sparse least squares by FISTA, with optional reweighting rounds.

    Solves ``min_Y ½‖targets − A(Y)‖² + λ Σ_g w_g ‖Y_g‖₂`` for the layout the shapes select (see the
    module docstring): shared atoms for 2-D ``targets [k, d]`` and ``atoms [n, d]``, per-head atoms for
    3-D ``targets [m, H, d_h]`` and ``atoms [N, H, d_h]``. ``λ`` is ``lam`` times the smallest value that
    zeroes every group (the largest group norm of ``Aᵀ targets``; per problem for per-head atoms). Each
    round runs ``iterations`` FISTA steps from the previous round's solution; after it the weights become
    ``w_g = penalty_g / (‖Y_g‖ / max ‖Y‖ + eps)`` (reweighted ℓ1), the maximum taken over penalised groups.

    Args:
        targets: ``[k, d]`` or ``[m, H, d_h]`` float rows to explain.
        atoms: ``[n, d]`` or ``[N, H, d_h]`` dictionary, same dtype as ``targets``.
        lam: ``λ`` as a share of the smallest all-zero ``λ``, in ``(0, 1)``.
        iterations: FISTA steps per round at most.
        penalty: ``[N]`` base weights of the groups (0: unpenalised), per-head atoms only; ``None``: every
            group weighs 1 and ``rounds`` must be 1.
        rounds: reweighting rounds.
        eps: reweighting floor.
        tol: stop when the relative change ``‖Y_new − Y‖ / ‖Y_new‖`` falls below it (``None``: never test).
        check_every: the deadline is checked before iterations ``check_every, 2·check_every, …`` of a round
            (and before iteration 0 too when ``check_every`` is 1), so at least ``check_every`` run.
        floor: smallest group norm the shrinkage divides by.
        lipschitz: the step's Lipschitz constant (largest squared spectral norm of the atoms, per head)
            when the caller knows it; default: computed.
        joint: per-head atoms only: one group per atom over the heads *and every target* (one problem: the
            targets are parts of one signal, e.g. the members of one sentence), instead of one per target.
        deadline: ``time.monotonic()`` value after which the iterations stop (``None``: none).

    Returns:
        A :class:`LassoFit`: the group norms and whether the deadline cut the fit.

    Raises:
        ValueError: shapes that are neither layout or disagree, ``lam`` outside ``(0, 1)``, ``penalty``
            with shared atoms or of the wrong size, ``rounds > 1`` without ``penalty``, or ``iterations``,
            ``rounds`` or ``check_every`` below 1 (``iterations`` may be 0).
    """
    problem: _SharedAtoms | _HeadAtoms
    if targets.dim() == 2 and atoms.dim() == 2 and targets.shape[1] == atoms.shape[1]:
        problem = _SharedAtoms(targets, atoms)
    elif targets.dim() == 3 and atoms.dim() == 3 and targets.shape[1:] == atoms.shape[1:]:
        problem = _HeadAtoms(targets, atoms, joint)
    else:
        raise ValueError(
            f"target [k, d] and atoms [n, d] must share d (or targets [m, H, d_h] and atoms [N, H, d_h] share H, "
            f"d_h), got {tuple(targets.shape)} and {tuple(atoms.shape)}"
        )
    if not 0 < lam < 1:
        raise ValueError(f"lam must be in (0, 1), got {lam}")
    if iterations < 0 or rounds < 1 or check_every < 1:
        raise ValueError(
            f"need iterations >= 0, rounds >= 1, check_every >= 1; got {iterations}, {rounds}, {check_every}"
        )
    if penalty is not None and (isinstance(problem, _SharedAtoms) or tuple(penalty.shape) != (atoms.shape[0],)):
        raise ValueError(
            f"penalty [N] goes with per-head atoms [N, H, d_h], got {tuple(penalty.shape)} and {tuple(atoms.shape)}"
        )
    if penalty is None and rounds > 1:
        raise ValueError("reweighting rounds need a penalty")
    if joint and isinstance(problem, _SharedAtoms):
        raise ValueError("joint groups go with per-head atoms [N, H, d_h]; shared atoms [n, d] are one problem already")
    lip = problem.lipschitz() if lipschitz is None else lipschitz
    weights = None if penalty is None else penalty[None].expand(problem.problems, -1)
    y = problem.zeros()
    for r in range(rounds):
        threshold = problem.threshold(lam, lip, weights)
        z, t = y.clone(), 1.0
        for it in range(iterations):
            if (check_every == 1 or (it and it % check_every == 0)) and late(deadline):
                return LassoFit(problem.scores(y), True)
            v = z - problem.adjoint(problem.apply(z) - problem.targets) / lip
            y_new = v * (1 - threshold / problem.group_norms(v).clamp_min(floor)).clamp_min(0)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            z = y_new + (t - 1) / t_new * (y_new - y)
            if tol is not None:
                change = float((y_new - y).norm()) / max(float(y_new.norm()), 1e-30)
                y, t = y_new, t_new
                if change < tol:
                    break
            else:
                y, t = y_new, t_new
        if penalty is not None and r + 1 < rounds:
            g = problem.scores(y)
            top = g[:, penalty > 0].max(1, keepdim=True).values.clamp_min(1e-300)
            weights = penalty[None] / (g / top + eps)
    return LassoFit(problem.scores(y), False)
