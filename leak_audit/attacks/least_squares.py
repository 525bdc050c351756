"""Batched least-squares solvers of the span-attention attacks: nonlinear (Levenberg–Marquardt) and L1.

* :func:`levenberg_marquardt`: damped Gauss–Newton with Marquardt's diagonal scaling (Marquardt, "An
  Algorithm for Least-Squares Estimation of Nonlinear Parameters", SIAM J. Appl. Math. 1963), one problem
  per row, for the layer-0 context and FFN-input solves.
* :func:`l1_fit`: L1 regression by iteratively reweighted least squares; :func:`l1_fit_orthonormal`: the
  same for an orthonormal design by scaled ADMM (Boyd et al., "Distributed Optimization and Statistical
  Learning via the Alternating Direction Method of Multipliers", 2011). L1 treats the coordinates dropout
  zeroed as outliers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from leak_audit.attacks.budget import late

__all__ = ["l1_fit", "l1_fit_orthonormal", "levenberg_marquardt"]


def levenberg_marquardt(
    residual: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    theta: Tensor,
    scale: float,
    iters: int,
    tol: float,
    deadline: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Batched Levenberg-Marquardt (Marquardt's diagonal damping), one problem per row of ``theta``.

    Args:
        residual: ``(rows [m], theta [m, r]) -> (residuals [m, k], Jacobians [m, k, r])`` for problems
            ``rows``.
        theta: ``[n, r]`` starting points (updated in place).
        scale: divides the squared residual to give the loss; rows stop below ``tol``.
        deadline: ``time.monotonic()`` value after which no new iteration starts (the points reached so
            far are returned).

    Returns:
        ``(theta [n, r], loss [n])``.
    """
    n = theta.shape[0]
    lam = torch.full((n,), 1e-3, device=theta.device)
    r, jac = residual(torch.arange(n, device=theta.device), theta)
    f = r.square().sum(-1)
    active = torch.arange(n, device=theta.device)
    for _ in range(iters):
        active = active[f[active] / scale >= tol]
        if active.numel() == 0 or late(deadline):
            break
        ja = jac[active]
        jt = ja.transpose(1, 2)
        jtj = (jt @ ja).double()
        jtr = (jt @ r[active][..., None]).double()
        a = jtj + lam[active].double()[:, None, None] * torch.diag_embed(jtj.diagonal(dim1=1, dim2=2) + 1e-12)
        chol, info = torch.linalg.cholesky_ex(a)
        step = torch.cholesky_solve(jtr, chol)[..., 0].float()
        step = torch.where((info == 0)[:, None], step, torch.zeros_like(step))
        cand = theta[active] - step
        rn, jn = residual(active, cand)
        fn = rn.square().sum(-1)
        ok = fn < f[active]
        upd = active[ok]
        theta[upd], r[upd], jac[upd], f[upd] = cand[ok], rn[ok], jn[ok], fn[ok]
        lam[active] = torch.where(ok, lam[active] / 3, lam[active] * 4).clamp(1e-9, 1e6)
    return theta, f / scale


def l1_fit(a: Tensor, b: Tensor, weights: Tensor | None = None, iters: int = 60) -> Tensor:
    """Batched L1 regression ``min_s Σ_k w_k |a_k · s − b_k|`` by iteratively reweighted least squares.

    Args:
        a: ``[m, r]`` shared design, or ``[n, m, r]`` one per problem; ``b``: ``[n, m]``.
        weights: ``[n, m]`` coordinate weights ``w_k`` (default ones).

    Returns:
        ``[n, r]`` the solutions (float64). A problem whose reweighted system turns singular keeps its last
        solution.
    """
    a = a.double()
    b = b.double()
    batched = a if a.dim() == 3 else a.expand(b.shape[0], *a.shape)
    prior = torch.ones_like(b) if weights is None else weights.double()
    w = prior
    eye = torch.eye(batched.shape[-1], dtype=torch.float64, device=batched.device)
    sol = b.new_zeros(b.shape[0], batched.shape[-1])
    eps = 1.0
    for _ in range(iters):
        ata = batched.transpose(1, 2) @ (w[..., None] * batched)
        atb = batched.transpose(1, 2) @ (w * b)[..., None]
        chol, info = torch.linalg.cholesky_ex(ata + 1e-12 * ata.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye)
        step = torch.cholesky_solve(atb, chol)[..., 0]
        # a system the weights made singular keeps its last solution
        sol = torch.where(((info == 0) & step.isfinite().all(-1))[:, None], step, sol)
        res = (batched @ sol[..., None])[..., 0] - b
        scale = b.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        w = prior / res.abs().clamp_min(eps * 1e-3 * scale)
        eps = max(eps * 0.5, 1e-7)
    return sol


def l1_fit_orthonormal(basis: Tensor, b: Tensor, weights: Tensor, iters: int) -> Tensor:
    """Batched weighted L1 regression ``min_s Σ_k w_k |(basis s)_k − b_k|`` for an orthonormal ``basis``.

    Scaled ADMM on ``z = basis·s − b``: the ``s``-update is a projection (``basis`` has orthonormal
    columns), the ``z``-update a weighted soft threshold, so an iteration costs ``O(n d r)`` instead of
    the ``O(n d r²)`` of reweighted least squares (10-20× faster on MiniLM's layer-0 spans).

    Args:
        basis: ``[d, r]`` orthonormal columns; ``b``: ``[n, d]``; ``weights``: ``[n, d]``.

    Returns:
        ``[n, r]`` the coefficients (float64).
    """
    b = b.double()
    rho = 1.0 / b.abs().mean(-1, keepdim=True).clamp_min(1e-30)
    thr = weights.double() / rho
    z = torch.zeros_like(b)
    u = torch.zeros_like(b)
    sol = b @ basis
    for _ in range(iters):
        sol = (b + z - u) @ basis
        v = sol @ basis.T - b + u
        z = v.sign() * (v.abs() - thr).clamp_min(0.0)
        u = v - z
    return sol
