"""Group lasso by FISTA: the convex sparse solver of the span attacks (the greedy one: :mod:`~leak_audit.attacks.pursuit`).

``min_Y ½‖T − A(Y)‖² + λ Σ_g w_g ‖Y_g‖₂`` solved by FISTA (Beck & Teboulle, "A Fast Iterative
Shrinkage-Thresholding Algorithm for Linear Inverse Problems", SIAM J. Imaging Sci. 2009) with group
soft-thresholding, optionally reweighted between rounds (reweighted ℓ1, Candès, Wakin & Boyd, "Enhancing
Sparsity by Reweighted ℓ1 Minimization", J. Fourier Anal. Appl. 2008). Two data layouts use it:

* **Shared atoms** (``targets [k, d]``, ``atoms [n, d]``, coefficients ``W [k, n]``): every row of the
  target is a combination of the same few atoms, a group is one atom's column ``W[:, a]``. The convex
  (ℓ2,1) relaxation of joint sparse recovery from multiple measurement vectors (Cotter, Rao, Engan,
  Kreutz-Delgado 2005; Tropp 2006); :func:`~leak_audit.attacks.text.span_check.partial_span` uses it.
* **Per-head atoms** (``targets [m, H, d_h]``, ``atoms [N, H, d_h]``, coefficients ``[m, N, H]``): ``m``
  independent problems, head ``h`` of a target is explained by head ``h`` of the atoms, a group is one
  atom's coefficients over the ``H`` heads; :mod:`~leak_audit.attacks.text.span_cluster` and
  :mod:`~leak_audit.attacks.text.word_order` use it.

Each layout keeps the exact floating-point arithmetic its attack was measured with (matrix products or
einsums, where the threshold is a Python float or a tensor, the norm floor): the numbers the attacks
produce do not depend on which layout the solver code was written for.
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
        norms: group norms ``‖Y_g‖₂`` (the support scores): ``[n]`` for shared atoms, ``[m, N]`` per head.
        cut: the deadline stopped the iterations before their own end (convergence, ``iterations`` and
            ``rounds``): ``norms`` are those reached so far.
    """

    norms: Tensor
    cut: bool


class _SharedAtoms:
    """``targets [k, d]`` as ``W [k, n] @ atoms [n, d]``; a group is a column of ``W``."""

    group_dim = 0

    def __init__(self, targets: Tensor, atoms: Tensor) -> None:
        self.targets, self.atoms = targets, atoms

    def lipschitz(self) -> float:
        return float(torch.linalg.matrix_norm(self.atoms, 2)) ** 2

    def zeros(self) -> Tensor:
        return torch.zeros(self.targets.shape[0], self.atoms.shape[0], dtype=self.atoms.dtype, device=self.atoms.device)

    def apply(self, coef: Tensor) -> Tensor:
        return coef @ self.atoms

    def adjoint(self, residual: Tensor) -> Tensor:
        return residual @ self.atoms.T

    def threshold(self, lam: float, lipschitz: float, weights: Tensor | None) -> float | Tensor:
        return lam * float(self.adjoint(self.targets).norm(dim=0).max()) / lipschitz


class _HeadAtoms:
    """``targets [m, H, d_h]``, each head explained by the same head of ``atoms [N, H, d_h]``; coefficients
    ``[m, N, H]``, a group is one atom's coefficients over the heads."""

    group_dim = 2

    def __init__(self, targets: Tensor, atoms: Tensor) -> None:
        self.targets = targets
        self.d = atoms.permute(1, 2, 0)  # H x d_h x N
        self.n_atoms, self.heads = atoms.shape[0], atoms.shape[1]

    def lipschitz(self) -> float:
        return float(torch.linalg.matrix_norm(self.d, 2).max()) ** 2

    def zeros(self) -> Tensor:
        t = self.targets
        return torch.zeros(t.shape[0], self.n_atoms, self.heads, dtype=t.dtype, device=t.device)

    def apply(self, coef: Tensor) -> Tensor:
        return torch.einsum("hdn,mnh->mhd", self.d, coef)

    def adjoint(self, residual: Tensor) -> Tensor:
        return torch.einsum("hdn,mhd->mnh", self.d, residual)

    def threshold(self, lam: float, lipschitz: float, weights: Tensor | None) -> float | Tensor:
        lam0 = self.adjoint(self.targets).norm(dim=2).max(1).values[:, None].clamp_min(1e-300)
        return (lam * lam0 * weights / lipschitz)[..., None]


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
        penalty: ``[N]`` base weights of the groups (0: unpenalised), per-head atoms only; ``None`` (shared
            atoms): every group weighs 1 and ``rounds`` must be 1.
        rounds: reweighting rounds.
        eps: reweighting floor.
        tol: stop when the relative change ``‖Y_new − Y‖ / ‖Y_new‖`` falls below it (``None``: never test).
        check_every: the deadline is checked before iterations ``check_every, 2·check_every, …`` of a round
            (and before iteration 0 too when ``check_every`` is 1), so at least ``check_every`` run.
        floor: smallest group norm the shrinkage divides by.
        lipschitz: the step's Lipschitz constant (largest squared spectral norm of the atoms, per head)
            when the caller knows it; default: computed.
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
        problem = _HeadAtoms(targets, atoms)
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
    lip = problem.lipschitz() if lipschitz is None else lipschitz
    weights = None if penalty is None else penalty[None].expand(targets.shape[0], -1)
    y = problem.zeros()
    dim = problem.group_dim
    for r in range(rounds):
        threshold = problem.threshold(lam, lip, weights)
        z, t = y.clone(), 1.0
        for it in range(iterations):
            if (check_every == 1 or (it and it % check_every == 0)) and late(deadline):
                return LassoFit(y.norm(dim=dim), True)
            v = z - problem.adjoint(problem.apply(z) - targets) / lip
            y_new = v * (1 - threshold / v.norm(dim=dim, keepdim=True).clamp_min(floor)).clamp_min(0)
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
            g = y.norm(dim=dim)
            top = g[:, penalty > 0].max(1, keepdim=True).values.clamp_min(1e-300)
            weights = penalty[None] / (g / top + eps)
    return LassoFit(y.norm(dim=dim), False)
