"""Row spaces and ranks of weight gradients: the linear algebra the span attacks share.

For a linear map ``y = W x`` applied at positions ``t``, ``∂L/∂W = Σ_t δ_t x_tᵀ``: its row space is spanned
by the map's inputs and its rank counts the distinct inputs (Petrov, Dimitrov, Baader, Müller, Vechev,
"DAGER: Exact Gradient Inversion for Large Language Models", NeurIPS 2024). :func:`span_basis` estimates
that row space (with a noise floor for float32 round-off and, under DP-SGD, for Gaussian noise, see
:func:`noise_edge`); :func:`numerical_rank` says whether a gradient's rank is informative, and
:func:`widest_gap_rank` reads a rank at the widest gap of a spectrum. Under DP-SGD, :func:`noise_threshold`
is the row norm pure noise stays below (which rows of a gradient carry signal), and
:func:`lora_input_constraints` reads the inputs' constraints from LoRA's ``B`` gradients. :func:`span_distance`
scores how well candidate inputs fall into and cover a row space (span search's objective).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "FLOAT32_EPS",
    "NOISE_EDGE_MARGIN",
    "WIDEST_GAP_FLOOR",
    "balanced_rows",
    "lora_input_constraints",
    "noise_edge",
    "noise_threshold",
    "numerical_rank",
    "span_basis",
    "span_distance",
    "widest_gap_rank",
]

NOISE_EDGE_MARGIN = 1.1
"""With DP noise, singular values above ``NOISE_EDGE_MARGIN · s(√m + √d)`` count as signal."""


def noise_edge(noise_std: float, rows: int, cols: int) -> float:
    """Largest singular value expected from pure Gaussian noise: ``s (√rows + √cols)``.

    A ``[rows, cols]`` matrix of i.i.d. ``N(0, s²)`` entries has its largest singular value at
    ``s(√rows + √cols)`` up to fluctuations of order ``s·rows^(-1/6)`` (Bai–Yin, Tracy–Widom); a signal
    direction is estimable from a noised gradient only when its singular value clears that edge.

    Raises:
        ValueError: ``noise_std < 0``.
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    return noise_std * (rows**0.5 + cols**0.5)


def noise_threshold(noise_std: float, rows: int, cols: int, alpha: float = 0.01) -> float:
    """Row-norm threshold above which a row of ``[rows, cols]`` i.i.d. ``N(0, s²)`` noise lies with
    probability at most ``alpha`` over all rows: ``s · sqrt(χ²_cols quantile at 1 − alpha/rows)``.

    Raises:
        ValueError: ``noise_std < 0`` or ``alpha`` not in ``(0, 1)``.
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if noise_std == 0:
        return 0.0
    from scipy.stats import chi2

    return float(noise_std * chi2.isf(alpha / rows, cols) ** 0.5)


def span_basis(
    grads: Sequence[Tensor], rtol: float = 1e-6, floor_factor: float = 30.0, noise_std: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Orthonormal basis of the common row space of weight gradients.

    Args:
        grads: weight gradients ``[d_out_k, d]`` of linear maps that share their input (e.g. layer 0's
            query, key and value). They are stacked row-wise.
        rtol: singular values below ``rtol · σ_max`` count as numerical zero.
        floor_factor: singular values below ``floor_factor · σ_min`` count as noise when the matrix is
            rank-deficient (float32 round-off sits near ``1e-8 · σ_max``).
        noise_std: per-coordinate std of Gaussian noise added to every gradient (DP-SGD's ``σ·C/B``);
            singular values below ``NOISE_EDGE_MARGIN ·`` :func:`noise_edge` are noise. The rank can then
            be 0: the noise drowns every direction.

    Returns:
        ``(basis, singular_values)``: ``basis`` is ``[d, r]`` float64 with orthonormal columns, ``r`` the
        estimated rank; ``singular_values`` is ``[min(Σ d_out, d)]`` float64, descending.

    Raises:
        ValueError: no gradient, mismatched input sizes, or an all-zero gradient.
    """
    if not grads:
        raise ValueError("span_basis needs at least one weight gradient")
    d = grads[0].shape[-1]
    if any(g.dim() != 2 or g.shape[-1] != d for g in grads):
        raise ValueError(f"weight gradients must be [d_out, {d}], got {[tuple(g.shape) for g in grads]}")
    stacked = torch.cat([g.detach().to(torch.float64) for g in grads], dim=0)
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        raise ValueError("the weight gradient is all zeros: this step carries no signal for the span check")
    tol = rtol * s[0]
    if noise_std > 0:
        tol = torch.maximum(tol, torch.tensor(NOISE_EDGE_MARGIN * noise_edge(noise_std, *stacked.shape),
                                              dtype=s.dtype, device=s.device))
    elif s.numel() >= d:  # square or tall: the smallest singular values show the noise floor
        tol = torch.maximum(tol, floor_factor * s[-1])
    rank = int((s > tol).sum())
    return vh[:rank].T.contiguous(), s


def numerical_rank(grad: Tensor, rtol: float = 1e-5, gap: float = 1e3) -> tuple[int, bool]:
    """Numerical rank of a 2-D gradient and whether it is below full rank (so the rank is informative).

    For a linear map applied at ``n`` positions, ``∂L/∂W = Σ_t δ_t x_tᵀ`` has rank ``≤ n``. A gradient
    computed in float32 has a noise floor near ``1e-7 σ_max``; a singular value counts when it is above
    ``rtol · σ_max`` *and* no gap wider than ``gap`` separates it from the largest ones.

    Args:
        grad: ``[m, n]`` gradient.

    Returns:
        ``(rank, deficient)``; ``(0, False)`` for an all-zero or non-2-D tensor.
    """
    if grad.dim() != 2 or grad.numel() == 0:
        return 0, False
    s = torch.linalg.svdvals(grad.detach().double())
    if float(s[0]) <= 0:
        return 0, False
    keep = s > rtol * s[0]
    ratios = s[:-1] / s[1:].clamp_min(1e-300)
    big = (ratios > gap).nonzero().flatten()
    rank = int(keep.sum())
    if big.numel():
        rank = min(rank, int(big[0]) + 1)
    return rank, rank < min(grad.shape)


WIDEST_GAP_FLOOR = 1e-10
"""Gaps below ``WIDEST_GAP_FLOOR · σ_max`` are not read by :func:`widest_gap_rank`: a float32 gradient's round-off
sits near ``4e-8 σ_max`` (MiniLM's layer-0 query), and under it the spectrum can still fall off steeply (SST-2 dev
12-15 at B = 4: from ``1.4e-12`` to ``2.4e-15 σ_max`` in its last value, a wider gap than the true one at rank 99,
``1.4e-5`` to ``5.1e-8``)."""


def widest_gap_rank(s: Tensor, skip: int = 4) -> int:
    """The rank at the widest gap (largest ratio) between consecutive singular values.

    Args:
        s: ``[n]`` singular values, descending (``n ≥ 2``).
        skip: the gaps after the first ``skip`` values are not read (a few dominant directions can stand far
            above the rest without marking the rank).

    Returns:
        ``k`` such that the widest gap is between ``s[k - 1]`` and ``s[k]``, among the gaps whose upper value is
        at least :data:`WIDEST_GAP_FLOOR` ``· s[0]`` (``1`` if none is).

    Raises:
        ValueError: ``s`` is not a 1-D tensor of at least two values.
    """
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(f"need a 1-D tensor of at least two singular values, got shape {tuple(s.shape)}")
    drops = s[:-1].clamp_min(1e-300).log() - s[1:].clamp_min(1e-300).log()
    drops[: min(skip, drops.numel())] = 0
    drops[s[:-1] < WIDEST_GAP_FLOOR * s[0]] = 0  # under float32 round-off: not the inputs' rank
    return int(drops.argmax()) + 1


def lora_input_constraints(
    grads_b: Sequence[Tensor], lora_a: Sequence[Tensor], rtol: float = 1e-5, gap: float = 1e3
) -> Tensor:
    """Linear constraints every layer input of the batch satisfies, read from LoRA ``B`` gradients.

    ``∂L/∂B = s Σ_t δ_t (A x_t)ᵀ`` (``[d_out, r]``) has row space ``span{A x_t} ⊂ R^r``. While that has
    rank ``k < r`` (fewer than ``r`` distinct inputs), each unit vector ``n`` orthogonal to it gives a
    constraint ``(nᵀA) x_t = 0`` on every input.

    Args:
        grads_b: ``lora_B`` gradients ``[d_out_k, r_k]``.
        lora_a: the matching ``lora_A`` weights ``[r_k, d]`` at the audited step.
        rtol, gap: numerical-rank rule of :func:`numerical_rank`.

    Returns:
        ``[m, d]`` float64 with orthonormal rows spanning the constraints (``m = 0``: every gradient has
        full rank ``r``, the batch has at least ``r`` distinct inputs and nothing is constrained).

    Raises:
        ValueError: the two lists differ in length or a ``B`` gradient does not match its ``A``.
    """
    if len(grads_b) != len(lora_a):
        raise ValueError(f"need one lora_A weight per lora_B gradient, got {len(lora_a)} and {len(grads_b)}")
    rows = []
    d = None
    for g, a in zip(grads_b, lora_a, strict=True):
        if g.dim() != 2 or a.dim() != 2 or g.shape[1] != a.shape[0]:
            raise ValueError(f"lora_B gradient {tuple(g.shape)} does not match lora_A {tuple(a.shape)}")
        d = a.shape[1]
        k, _ = numerical_rank(g, rtol=rtol, gap=gap)
        if k == 0 or k >= g.shape[1]:
            continue  # no signal, or the batch fills R^r
        _, _, vh = torch.linalg.svd(g.detach().double(), full_matrices=True)
        rows.append(vh[k:] @ a.detach().double())  # [r - k, d]
    if not rows:
        return torch.zeros(0, d or 0, dtype=torch.float64)
    c = torch.cat(rows)
    _, sv, vh = torch.linalg.svd(c, full_matrices=False)
    keep = int((sv > 1e-10 * sv[0]).sum())
    return vh[:keep]


def span_distance(x: Tensor, basis: Tensor) -> Tensor:
    """Span-search objective ``D`` of candidate inputs (:mod:`~leak_audit.attacks.text.span_search`).

    ``D(X) = Σ_t ‖(I − V Vᵀ) x_t‖² / ‖x_t‖² + (r − ‖Q_Xᵀ V‖²_F)``: the residual fraction of each input outside
    the row space, plus the share of the row space the inputs leave uncovered.

    Args:
        x: ``[K, N, d]``, the ``N`` layer inputs of each of ``K`` candidates.
        basis: ``[d, r]`` orthonormal basis of the gradient's row space.

    Returns:
        ``[K]``: sum of squared residual fractions plus ``r`` minus the covered share of the span
        (``0`` iff the inputs lie in and span the gradient's row space).
    """
    basis = basis.to(x.dtype)
    coef = x @ basis
    resid = ((x - coef @ basis.T).square().sum(-1) / x.square().sum(-1).clamp_min(1e-30)).sum(-1)
    # covered share ‖Q_Xᵀ V‖²_F = ‖C⁻¹ X V‖²_F with X Xᵀ = C Cᵀ (Cholesky, float64): 2.3-2.4× faster than
    # a batched QR of [K, d, N] on CPU from 24 inputs on (benchmarks/screening_probe.py). Inputs that are
    # (numerically) linearly dependent, e.g. N > d, fall back to the QR: the Cholesky factor fails, has a pivot
    # at round-off level (a repeated input: which of the two fails depends on the LAPACK build), or its
    # round-off shows as a share above min(N, r)
    wide = x.double()
    chol, info = torch.linalg.cholesky_ex(wide @ wide.transpose(1, 2))
    covered = torch.linalg.solve_triangular(chol, wide @ basis.double(), upper=False).square().sum((1, 2))
    pivots = chol.diagonal(dim1=-2, dim2=-1).abs()
    singular = (info != 0) | (pivots.amin(-1) <= 1e-6 * pivots.amax(-1))
    singular |= ~(covered <= min(x.shape[1], basis.shape[1]) + 1e-6)  # ~(≤) also catches NaN
    covered = covered.to(x.dtype)
    if bool(singular.any()):
        q, _ = torch.linalg.qr(x[singular].transpose(1, 2))  # [k, d, N]
        covered = covered.clone()
        covered[singular] = (q.transpose(1, 2) @ basis).square().sum((1, 2))
    return resid + (basis.shape[1] - covered)


FLOAT32_EPS = 2.0**-24
"""Unit round-off of float32, the dtype gradients arrive in."""


def balanced_rows(grads: Sequence[Tensor], floor: float = 1e-5) -> tuple[Tensor, float]:
    """Stacked gradient rows re-weighted so that every direction of their row space above ``floor · σ_max`` counts
    alike, and the relative residual float32 round-off alone leaves in that frame.

    A row space is unchanged by any invertible map of the rows, but a residual measured on the raw rows weighs each
    direction by its singular value. Massive activations (a decoder's first position) give a few directions singular
    values ``10⁴``-``10⁷`` times the rest (SmolLM2, LoRA r = 8, layer 0's adapters on one CoLA batch of 4: 650 and 335,
    then 0.032 down to 4.9e-5), so a pursuit that stops at a relative residual of ``1e-6`` on the raw rows never
    looks at the small directions, where most tokens are. ``Σ'⁻¹ Uᵀ R`` with ``Σ' = max(Σ, floor · σ_max)`` weighs
    the directions above the floor alike; those below, where float32 round-off of the large ones (about
    ``2⁻²⁴ ‖R‖``) competes with the signal, less.

    Args:
        grads: input-spanning rows ``[k_i, d]`` (stacked row-wise).
        floor: relative singular value below which directions are not raised to full weight.

    Returns:
        ``(rows, noise)``: the re-weighted rows ``[k, d]`` (float64) and the round-off level in their frame,
        ``2⁻²⁴ ‖R‖_F / max(σ_min, floor · σ_max) / ‖rows‖_F`` (a relative residual no pursuit can go much below).

    Raises:
        ValueError: no rows, or all of them zero.
    """
    if not grads:
        raise ValueError("balanced_rows needs at least one block of gradient rows")
    stacked = torch.cat([g.detach().to(torch.float64) for g in grads])
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        raise ValueError("the gradient rows are all zero")
    scale = s.clamp_min(floor * s[0])
    rows = (s / scale)[:, None] * vh
    noise = FLOAT32_EPS * float(torch.linalg.matrix_norm(stacked)) / float(scale[-1])  # the most raised direction's
    return rows, noise / float(torch.linalg.matrix_norm(rows))
