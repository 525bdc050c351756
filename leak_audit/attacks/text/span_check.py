"""Span check: exact token recovery from the weight gradient of a first-layer linear map (DAGER).

Follows Petrov, Dimitrov, Baader, Müller, Vechev, "DAGER: Exact Gradient Inversion for Large Language
Models" (NeurIPS 2024). For a linear layer ``y = W x`` applied to every position ``t`` of a batch,
``∂L/∂W = Σ_t δ_t x_tᵀ``, so the row space of ``∂L/∂W`` (shape ``[d_out, d]``) is spanned by the inputs
``x_t``. While the number of distinct inputs ``r < d``, it is a proper subspace of ``R^d``. In a BERT
encoder the inputs of layer 0's query/key/value are

    x(v, i, s) = LayerNorm(E_word[v] + E_pos[i + offset] + E_type[s])            (then dropout)

so a token ``v`` sits at position ``i`` iff ``x(v, i, s)`` lies in that span: its projection residual is
(numerically) zero. We score every vocabulary token at every position and keep those in the span.

Two issues beyond the paper's decoder setting:

* **Additive embeddings at B > 1.** If tokens ``v`` and ``w`` both occur at positions ``i`` and ``j``
  somewhere in the batch, ``E[v] + P[i]`` is a linear combination of three real inputs, so false
  candidates also pass the check. Per-position *recall* stays exact; precision needs more than this
  layer (``span_attention`` uses layer 0's attention and FFN, ``span_cluster`` the query's per-token
  structure). We report the candidates and assemble sequences by rank.
* **Dropout.** In training mode the layer sees ``x ⊙ m / (1 - p)`` with a Bernoulli mask ``m``, which
  breaks exact membership. We shortlist by the plain residual and re-rank by a *trimmed* residual
  (least trimmed squares: refit after dropping the worst ``≈ p + 3σ`` share of coordinates), which is
  zero again for the true token because dropout only zeroes coordinates. Selection is by ranking plus
  an adaptive gap, never by one fixed threshold.

**LoRA** (``peft``, DAGER's LoRA mode). For ``y = W x + s·B A x`` with ``W`` frozen, ``∂L/∂A = s Bᵀ Σ_t δ_t x_tᵀ``
(``[r, d]``): its rows lie in the inputs' span and span all of it while the batch has at most ``r``
distinct inputs; stacking the ``lora_A`` gradients of layer 0's query/key/value raises that to
``r`` per adapted projection. LoRA starts with ``B = 0``, so at the first steps ``∂L/∂A = 0`` and only
``∂L/∂B = s Σ_t δ_t (A x_t)ᵀ`` (``[d_out, r]``) carries the inputs: its row space in ``R^r`` is
``span{A x_t}``, and while it has fewer than ``r`` dimensions every input satisfies ``nᵀ A x = 0`` for each
``n`` orthogonal to it (:func:`lora_input_constraints`). Candidates are then scored by their residual
against those constraints. With more distinct inputs than these ranks the span is only partly observed:
no token can be certified there (a physical limit, not a tuning one). :func:`partial_span` then
recovers tokens by joint sparse recovery: every observed direction combines the same few true inputs
(best effort, reported as ``partial``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from leak_audit.attacks.budget import late, started_late
from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements
from leak_audit.models import TextModelSpec

__all__ = [
    "EmbeddingTables",
    "SpanCheck",
    "SpanCheckResult",
    "span_basis",
    "span_check",
    "trimmed_residuals",
    "TokenScorer",
    "clipped_residuals",
    "lora_input_constraints",
    "partial_span",
    "group_lasso",
]


@dataclass(frozen=True)
class EmbeddingTables:
    """The tensors that define layer 0's inputs.

    Attributes:
        word: ``[V, d]`` token embeddings.
        position: ``[P, d]`` position embeddings.
        token_type: ``[T, d]`` segment embeddings, or ``None``.
        norm_weight, norm_bias: ``[d]`` LayerNorm affine parameters; ``norm_eps`` its epsilon.
        position_offset: index of position 0 in ``position`` (2 for RoBERTa, 0 for BERT).
    """

    word: Tensor
    position: Tensor
    token_type: Tensor | None
    norm_weight: Tensor
    norm_bias: Tensor
    norm_eps: float
    position_offset: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor], spec: TextModelSpec) -> EmbeddingTables:
        tt = params[spec.token_type_embeddings] if spec.token_type_embeddings else None
        return cls(
            word=params[spec.word_embeddings],
            position=params[spec.position_embeddings],
            token_type=tt,
            norm_weight=params[spec.norm_weight],
            norm_bias=params[spec.norm_bias],
            norm_eps=spec.norm_eps,
            position_offset=spec.position_offset,
        )

    @property
    def max_length(self) -> int:
        return int(self.position.shape[0]) - self.position_offset

    @property
    def num_token_types(self) -> int:
        return 1 if self.token_type is None else int(self.token_type.shape[0])

    def layer_inputs(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """``LayerNorm(word + position + type)`` for ``input_ids`` ``[B, L]``: returns ``[B, L, d]`` (no dropout)."""
        pos = torch.arange(input_ids.shape[-1], device=input_ids.device) + self.position_offset
        z = self.word[input_ids] + self.position[pos]
        if self.token_type is not None:
            tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            z = z + self.token_type[tt]
        return torch.nn.functional.layer_norm(z, z.shape[-1:], self.norm_weight, self.norm_bias, self.norm_eps)

    def pair_inputs(
        self, tokens: Tensor, positions: Tensor, segment: int = 0, dtype: torch.dtype = torch.float64
    ) -> Tensor:
        """``LayerNorm(E[v] + P[i] + T[segment])`` for pairs ``(tokens[n], positions[n])``: ``[n, d]`` in ``dtype``.

        ``positions`` count from 0 (``position_offset`` is added here).
        """
        e = self.word[tokens].to(dtype) + self.position[positions + self.position_offset].to(dtype)
        if self.token_type is not None:
            e = e + self.token_type[segment].to(dtype)
        return torch.nn.functional.layer_norm(
            e, e.shape[-1:], self.norm_weight.to(dtype), self.norm_bias.to(dtype), self.norm_eps
        )


LORA_EXACT_TOL = 1e-5
"""Residual fraction below which a token satisfies LoRA input constraints (:func:`lora_input_constraints`)."""

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
        rtol, gap: numerical-rank rule of :func:`~leak_audit.attacks.optim.numerical_rank`.

    Returns:
        ``[m, d]`` float64 with orthonormal rows spanning the constraints (``m = 0``: every gradient has
        full rank ``r``, the batch has at least ``r`` distinct inputs and nothing is constrained).

    Raises:
        ValueError: the two lists differ in length or a ``B`` gradient does not match its ``A``.
    """
    from leak_audit.attacks.optim import numerical_rank

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


class TokenScorer:
    """Projection residuals of every vocabulary token's layer-0 input, position by position.

    For a basis ``V`` (``[d, r]``, orthonormal) the residual fraction of a candidate input ``x`` is
    ``‖x − V Vᵀx‖ / ‖x‖``. LayerNorm is affine after centring and scaling, so for ``z = e_v + q``
    (``q`` = position + type embedding) every term of ``‖x‖²`` and ``Vᵀx`` splits into a per-token part
    computed once and a per-position part: scoring all ``V`` tokens at one position costs a few
    ``[V, d]`` mat-vecs plus a ``[V, r]`` update, instead of a LayerNorm and a ``[V, d] × [d, r]`` product.
    All arithmetic is float64 because residuals of true tokens are ~1e-7 of ``‖x‖``.

    Args:
        tables: embedding tables and LayerNorm.
        basis: ``[d, r]`` orthonormal basis of the gradient's row space.
        token_ids: candidate token ids (default: the whole vocabulary). Scores are aligned with them.
        complement: ``basis`` spans the *orthogonal complement* of the subspace instead (LoRA
            constraints, where the subspace is most of ``R^d``): the residual is then ``‖Vᵀx‖ / ‖x‖``.
    """

    def __init__(
        self, tables: EmbeddingTables, basis: Tensor, token_ids: Tensor | None = None, complement: bool = False
    ) -> None:
        f64 = torch.float64
        self.complement = complement
        self.tables = tables
        self.basis = basis.to(f64)
        self.d = int(tables.word.shape[1])
        # candidate vocabulary: every token, or a subset (e.g. the batch's token bag)
        self.token_ids = (
            torch.arange(tables.word.shape[0], device=tables.word.device)
            if token_ids is None else token_ids.long().to(tables.word.device)
        )
        word = tables.word.detach()[self.token_ids].to(f64)
        self._ce = word - word.mean(dim=1, keepdim=True)  # centred token embeddings [V, d]
        self._gamma = tables.norm_weight.detach().to(f64)
        self._beta = tables.norm_bias.detach().to(f64)
        self._g2 = self._gamma**2
        self._gb = self._gamma * self._beta
        self._gamma_basis = self._gamma[:, None] * self.basis  # [d, r]
        self._e_proj = self._ce @ self._gamma_basis  # [V, r]
        ce_sq = self._ce**2
        self._e_sq = ce_sq.sum(1)  # [V]
        self._e_g2 = ce_sq @ self._g2  # [V]
        self._e_gb = self._ce @ self._gb  # [V]
        self._beta_proj = self._beta @ self.basis  # [r]
        self._beta_sq = float((self._beta**2).sum())

    def _offset(self, position: int, token_type: int) -> Tensor:
        t = self.tables
        q = t.position[position + t.position_offset].detach().to(torch.float64)
        if t.token_type is not None:
            q = q + t.token_type[token_type].detach().to(torch.float64)
        return q

    def residuals(self, position: int, token_type: int = 0) -> Tensor:
        """Residual fraction in ``[0, 1]`` of every candidate token at ``position``.

        Returns:
            ``[K]`` float64, aligned with :attr:`token_ids`.
        """
        q = self._offset(position, token_type)
        cq = q - q.mean()
        cross = self._ce @ torch.stack([cq, self._g2 * cq], dim=1)  # [V, 2]
        var = (self._e_sq + 2 * cross[:, 0] + (cq * cq).sum()) / self.d
        inv_sigma = torch.rsqrt(var + self.tables.norm_eps)
        proj = (self._e_proj + cq @ self._gamma_basis) * inv_sigma[:, None] + self._beta_proj
        norm_sq = (
            (self._e_g2 + 2 * cross[:, 1] + (self._g2 * cq * cq).sum()) * inv_sigma**2
            + 2 * (self._e_gb + (cq * self._gb).sum()) * inv_sigma
            + self._beta_sq
        )
        proj_sq = (proj**2).sum(1)
        res_sq = proj_sq if self.complement else (norm_sq - proj_sq).clamp_min(0)
        return (res_sq / norm_sq).sqrt()

    def inputs(self, token_ids: Tensor, position: int, token_type: int = 0) -> Tensor:
        """The exact layer-0 inputs (no dropout) of ``token_ids`` ``[K]`` at ``position``: ``[K, d]`` float64."""
        t = self.tables
        z = t.word[token_ids].detach().to(torch.float64) + self._offset(position, token_type)
        return torch.nn.functional.layer_norm(z, (self.d,), self._gamma, self._beta, t.norm_eps)


def trimmed_residuals(
    x: Tensor, basis: Tensor, trim: int, iterations: int = 6, keep: int | None = None, prune_after: int = 2
) -> Tensor:
    """Least-trimmed-squares residual fraction of each row of ``x`` against ``span(basis)``.

    Each row is fitted by least squares, its ``trim`` worst coordinates are dropped and the fit is
    repeated (``iterations`` C-steps, Rousseeuw & Van Driessen 2006). A vector whose coordinates were
    partly zeroed by dropout before entering the span gets a residual near zero again.

    Args:
        x: ``[K, d]`` float64 candidate inputs.
        basis: ``[d, r]`` float64 orthonormal basis.
        trim: number of coordinates dropped per row, ``0 ≤ trim < d - r``.
        iterations: refits after the first least-squares fit. Six C-steps ranked every true token of
            8 real CoLA batches (B=4, dropout on, 318 tokens) above all false ones; three missed 4.
        keep: after ``prune_after`` C-steps, refine only the ``keep`` rows with the lowest residual so
            far; the others keep their current residual. C-steps never increase a row's trimmed
            residual, so pruned rows are only ranked lower than their fully refined score would put them.
        prune_after: C-steps run on every row before pruning.

    Returns:
        ``[K]`` residual fraction on the kept coordinates.
    """
    k, d = x.shape
    r = basis.shape[1]
    if trim <= 0:
        return (x - (x @ basis) @ basis.T).norm(dim=1) / x.norm(dim=1)
    if trim >= d - r:
        raise ValueError(f"trim={trim} leaves fewer coordinates than the span's rank r={r} (d={d})")
    coef = x @ basis  # plain least squares (basis is orthonormal)
    rows = torch.arange(k, device=x.device)  # rows still refined
    out = torch.empty(k, dtype=x.dtype, device=x.device)
    eye = torch.eye(trim, dtype=x.dtype, device=x.device)
    for step in range(iterations):
        if keep is not None and step == prune_after and rows.numel() > keep:
            score = _trimmed_score(x, coef, basis, trim)
            out[rows] = score
            best = score.topk(keep, largest=False).indices
            rows, x, coef = rows[best], x[best], coef[best]
        resid = x - coef @ basis.T
        drop = resid.abs().topk(trim, dim=1).indices  # [K, m]
        u = basis[drop]  # [K, m, r]: rows of the basis at the dropped coordinates
        x_drop = torch.gather(x, 1, drop)  # [K, m]
        # Normal equations on the kept rows: (I - UᵀU) c = Vᵀx - Uᵀx_S; solved with Woodbury:
        # (I - UᵀU)⁻¹ = I + Uᵀ (I - UUᵀ)⁻¹ U, which needs an m×m solve instead of r×r.
        y = x @ basis - torch.einsum("kmr,km->kr", u, x_drop)
        inner = eye - u @ u.transpose(1, 2) + 1e-10 * eye
        coef = y + torch.einsum("kmr,km->kr", u, torch.linalg.solve(inner, torch.einsum("kmr,kr->km", u, y)))
    out[rows] = _trimmed_score(x, coef, basis, trim)
    return out


def _trimmed_score(x: Tensor, coef: Tensor, basis: Tensor, trim: int) -> Tensor:
    """Residual fraction of ``x ≈ coef @ basisᵀ`` on all but the ``trim`` worst coordinates: ``[K]``."""
    resid = x - coef @ basis.T
    kept = torch.ones_like(x, dtype=torch.bool)
    kept.scatter_(1, resid.abs().topk(trim, dim=1).indices, False)
    return (resid * kept).norm(dim=1) / (x * kept).norm(dim=1)


@dataclass
class SpanCheckResult:
    """Output of :func:`span_check`.

    Attributes:
        candidates: per position, ``(token_id, token_type, score)`` of the tokens judged present,
            best first. ``score`` is the (trimmed) residual fraction, 0 for an exact member.
        best: per position, the best-ranked token id (even if judged absent), for inspection.
        sequences: assembled sequences (exact at B=1; by rank at B>1).
        rank: estimated dimension of the span (number of distinct inputs).
        threshold: the score below which a candidate counts as present.
        length: number of positions scanned that hold at least one token.
        dropout_mode: whether the gradient was read as a training-mode (dropout-on) one.
        partial: the span was only partly observed (more distinct inputs than its rank) and the
            candidates are a ranking (:func:`partial_span`), not certified members.
        cut_short: the deadline stopped the work before its own end (the scan had not reached the end of
            the sequences, or the joint fit had not converged): the candidates are those found so far.
        progress: how far it got, a short string (e.g. ``"scanned 7 positions, 7 with tokens"``).
    """

    candidates: list[list[tuple[int, int, float]]]
    best: list[tuple[int, float]]
    sequences: list[list[int]]
    rank: int
    threshold: float
    length: int
    dropout_mode: bool = False
    partial: bool = False
    cut_short: bool = False
    progress: str = ""


def _trim_count(dropout: float, d: int) -> int:
    """Coordinates to drop in the trimmed fit: the expected number zeroed by dropout plus 3 σ."""
    if dropout <= 0:
        return 0
    return int(math.ceil(d * dropout + 3 * math.sqrt(d * dropout * (1 - dropout))))


def clipped_residuals(
    scorer: TokenScorer,
    position: int,
    token_type: int = 0,
    kappa: float = 1.0,
    chunk: int = 4096,
    deadline: float | None = None,
) -> Tensor | None:
    """Outlier-robust residual of every candidate token at ``position``: ``[K]``, aligned with ``scorer.token_ids``
    (``None`` when ``deadline``, a ``time.monotonic()`` value checked between chunks, passed first).

    ``sqrt(Σ_j min(r_j², κ² · mean(x²)) / ‖x‖²)`` with ``r = x − V Vᵀx``. Clipping caps the cost of a
    coordinate that dropout zeroed; without it a token whose input concentrates in a few outlier
    dimensions (BERT's ``[CLS]`` puts ~87% of ``‖x‖²`` in 4 of 384) drops out of the shortlist whenever one
    of them is dropped. Used only to shortlist, in float32, ``chunk`` vocabulary rows at a time so the
    intermediate ``[chunk, d]`` tensors stay in cache.
    """
    t = scorer.tables
    basis = scorer.basis.to(torch.float32)
    q = t.position[position + t.position_offset].detach().float()
    if t.token_type is not None:
        q = q + t.token_type[token_type].detach().float()
    word = t.word.detach()[scorer.token_ids]
    gamma = t.norm_weight.detach().float()
    beta = t.norm_bias.detach().float()
    out = torch.empty(word.shape[0], dtype=torch.float32, device=word.device)
    for lo in range(0, word.shape[0], chunk):
        if lo and late(deadline):
            return None
        x = torch.nn.functional.layer_norm(word[lo : lo + chunk].float() + q, (scorer.d,), gamma, beta, t.norm_eps)
        r = torch.addmm(x, x @ basis, basis.T, alpha=-1.0)
        sq = x.square_()
        total = sq.sum(1)
        cap = (kappa**2 / scorer.d) * total
        out[lo : lo + chunk] = (torch.minimum(r.square_(), cap[:, None]).sum(1) / total).sqrt_()
    return out


def span_check(
    grads: Sequence[Tensor],
    tables: EmbeddingTables,
    batch_size: int,
    *,
    dropout: float = 0.0,
    sep_token_id: int | None = None,
    shortlist: int = 256,
    exact_tol: float = 1e-3,
    min_gap: float = 4.0,
    max_length: int | None = None,
    patience: int = 2,
    deadline: float | None = None,
    vocabulary: Tensor | None = None,
    token_types: Sequence[int] | None = None,
    prune: bool = True,
    noise_std: float = 0.0,
    constraints: Tensor | None = None,
) -> SpanCheckResult:
    """Recover per-position tokens from first-layer weight gradients and assemble sequences.

    Args:
        grads: weight gradients ``[d_out, d]`` of linear maps whose input is the embedding output
            (layer 0's query, key and/or value, or their ``lora_A`` gradients ``[r, d]``). May be empty
            when ``constraints`` are given.
        tables: the embedding tables and LayerNorm at the audited step.
        batch_size: ``B``, number of sequences behind the gradient.
        dropout: the model's embedding dropout probability in training mode. If the gradient has exact
            span members (it was computed with dropout off) it is ignored; otherwise candidates are
            shortlisted by :func:`clipped_residuals` and re-ranked by :func:`trimmed_residuals`.
        sep_token_id: id of the end-of-sequence token (``[SEP]``); sequences end after it.
        shortlist: tokens per position re-ranked by the trimmed residual.
        exact_tol: residual fraction below which a token is in the span when gradients are exact.
        min_gap: with dropout, the present tokens must score at least ``min_gap`` times lower than the
            next candidate (scores are floored at ``exact_tol``).
        max_length: positions to scan at most (default: the model's maximum).
        patience: stop after this many consecutive positions without any present token (after the
            first ``4 · patience`` positions when none has shown a token at all).
        deadline: ``time.monotonic()`` value after which the work stops (checked between setup stages,
            positions, token types and vocabulary chunks); the result then holds the positions scanned in
            full and has ``cut_short`` set.
        vocabulary: candidate token ids (e.g. the token bag recovered from the word-embedding gradient);
            default: every token.
        token_types: segment ids to try (e.g. the rows of the token-type embedding with a nonzero
            gradient); default: every row of the token-type table.
        prune: with dropout, refine only the ``max(6B, 48)`` best candidates per position after two
            C-steps (3x faster on B=8 batches, same recall on real sentences).
        noise_std: per-coordinate std of DP noise in ``grads`` (0: none). With noise the rank counts only
            directions above the noise edge (:func:`span_basis`), no residual is exactly zero, and tokens
            are selected by ranking (the largest gap among the best scores, as with dropout), never by
            ``exact_tol``. When no direction clears the edge the result is empty (rank 0).
        constraints: ``[m, d]`` orthonormal rows ``c`` with ``c·x_t = 0`` for every input
            (:func:`lora_input_constraints`), used when ``grads`` is empty: candidates are scored by
            their residual against them (exact gradients only). ``rank`` is then ``d - m``.

    Returns:
        A :class:`SpanCheckResult`.

    Raises:
        ValueError: see :func:`span_basis`; neither gradients nor constraints; constraints with DP noise.
    """
    complement = not grads
    if complement:
        if constraints is None or constraints.shape[0] == 0:
            raise ValueError("span_check needs first-layer weight gradients or LoRA input constraints")
        if noise_std > 0:
            raise ValueError("LoRA input constraints are exact rank deficits: they do not survive DP noise")
        basis = constraints.T.contiguous()
        d = basis.shape[0]
        rank = d - basis.shape[1]
        # a few constraints leave most of R^d: a random token sits within 1e-3 of it far more often than in
        # a low-rank span (true tokens score ~1e-7 here, as with exact gradients)
        exact_tol = min(exact_tol, LORA_EXACT_TOL)
    else:
        basis, _ = span_basis(grads, noise_std=noise_std)
        rank = basis.shape[1]
        d = basis.shape[0]
    if rank == 0:  # DP noise drowns every direction: nothing to check
        return SpanCheckResult([], [], [], 0, float("nan"), 0, dropout_mode=False)

    def cut_before_scan(stage: str) -> SpanCheckResult:
        return SpanCheckResult([], [], [], rank, float("nan"), 0, cut_short=True,
                               progress=f"stopped {stage}: no position scanned")

    if late(deadline):
        return cut_before_scan("after the span basis")
    noisy = noise_std > 0
    scorer = TokenScorer(tables, basis, vocabulary, complement=complement)
    ids_map = scorer.token_ids
    limit = min(max_length or tables.max_length, tables.max_length)
    # Exact gradients (dropout off, or a model without dropout): some token at the first positions is
    # an exact span member. Otherwise read the gradient as a training-mode (dropout-on) one.
    # every stacked row independent (e.g. lora_A gradients with more tokens than r): the span may be only
    # partly observed; exact members can still show (tokens == rank), dropout-robust refits cannot help
    saturated = not complement and rank >= sum(int(g.shape[0]) for g in grads)
    segments = list(range(tables.num_token_types)) if token_types is None else sorted({int(t) for t in token_types})
    if not segments or not all(0 <= t < tables.num_token_types for t in segments):
        raise ValueError(f"token_types must be a non-empty subset of 0..{tables.num_token_types - 1}, got {token_types}")

    def exact_members_show() -> bool | None:  # some token at the first positions lies in the span
        for p in range(min(3, limit)):
            for tt in segments:
                if late(deadline):
                    return None  # the deadline passed first
                if float(scorer.residuals(p, tt).min()) < exact_tol:
                    return True
        return False

    trim = 0 if noisy or complement or saturated else _trim_count(dropout, d)
    if trim:
        shows = exact_members_show()
        if shows is None:
            return cut_before_scan("while testing for exact span members")
        if shows:
            trim = 0
    if trim and trim >= d - rank - 8:
        trim = 0  # too many inputs to refit on the kept coordinates: fall back to plain residuals
    if saturated and not noisy and rank <= d // 2:
        shows = exact_members_show()
        if shows is None:
            return cut_before_scan("while testing for exact span members")
        if not shows:
            # more distinct inputs than observed directions (and a slice small enough to say something): no
            # token is certified; recover them by joint sparse recovery instead
            return partial_span(scorer, batch_size, min(limit, PARTIAL_SCAN), segments, sep_token_id, deadline)
    # with dropout, after two C-steps only the best candidates are refined further (B true ones at most)
    refine = max(6 * batch_size, 48) if prune else None
    # Rank >= d/4 and a candidate set small enough to score whole: keep the B best per occupied position.
    crowded = rank >= d // 4 and ids_map.numel() <= shortlist
    candidates: list[list[tuple[int, int, float]]] = []
    best: list[tuple[int, float]] = []
    misses = 0
    cut = False  # the deadline stopped the scan (a position it interrupted is dropped)
    for pos in range(limit):
        ids_l, types_l, scores_l = [], [], []
        for tt in segments:
            if late(deadline):
                cut = True
                break
            if trim:
                n = ids_map.numel()
                if n > shortlist:
                    clipped = clipped_residuals(scorer, pos, tt, deadline=deadline)
                    if clipped is None or late(deadline):
                        cut = True
                        break
                    idx = clipped.topk(min(shortlist, n), largest=False).indices
                else:
                    idx = torch.arange(n)
                ids = ids_map[idx]
                score = trimmed_residuals(scorer.inputs(ids, pos, tt), basis, trim, keep=refine)
            else:
                res = scorer.residuals(pos, tt)
                top = res.topk(min(max(shortlist, 4 * batch_size), res.numel()), largest=False)
                ids, score = ids_map[top.indices], top.values
            ids_l.append(ids)
            types_l.append(torch.full_like(ids, tt))
            scores_l.append(score)
        if cut:
            break
        ids, types, scores = _best_per_token(torch.cat(ids_l), torch.cat(types_l), torch.cat(scores_l))
        best.append((int(ids[0]), float(scores[0])))
        present = _present(
            scores, exact_tol, min_gap, robust=trim > 0 or noisy, batch_size=batch_size, crowded=crowded,
            noisy=noisy,
        )
        candidates.append([(int(ids[j]), int(types[j]), float(scores[j])) for j in range(present)])
        misses = 0 if present else misses + 1
        if misses >= patience and (any(candidates) or pos + 1 >= 4 * patience):
            break  # the sequences ended, or nothing stands out even where [CLS] must be (noise)
    scanned = len(candidates)
    while candidates and not candidates[-1]:
        candidates.pop()
    length = len(candidates)
    threshold = exact_tol if not (trim or noisy) else float("nan")
    sequences = _assemble(candidates, batch_size, sep_token_id)
    progress = f"scanned {scanned} positions, {length} with tokens" + (
        "; the deadline stopped the scan before the sequences ended" if cut else ""
    )
    return SpanCheckResult(candidates, best[:length], sequences, rank, threshold, length, dropout_mode=trim > 0,
                           cut_short=cut, progress=progress)


PARTIAL_SCAN = 64
"""Positions :func:`partial_span` considers (from 0)."""

PARTIAL_CANDIDATES = 32
"""Tokens per position (at least; ``8B`` at batch size ``B``) that :func:`partial_span` passes to the joint fit."""

PARTIAL_KEEP = 0.15
"""An atom counts as present when its group-lasso weight is at least this share of the largest one."""


def group_lasso(
    target: Tensor, atoms: Tensor, lam: float = 0.05, iterations: int = 2000, tol: float = 1e-7,
    deadline: float | None = None,
) -> Tensor:
    """Row-sparse least squares: ``min_W ½‖target − W·atoms‖² + λ · Σ_a ‖W[:, a]‖`` (``W`` is ``[k, n]``).

    The convex (ℓ2,1) relaxation of joint sparse recovery from multiple measurement vectors (Cotter,
    Rao, Engan, Kreutz-Delgado 2005; Tropp 2006): every row of ``target`` is a combination of the same
    few atoms. Solved by FISTA (Beck & Teboulle 2009) with group soft-thresholding.

    Args:
        target: ``[k, d]`` rows to explain.
        atoms: ``[n, d]`` dictionary (unit rows).
        lam: ``λ`` as a share of the largest atom correlation ``max_a ‖target · atoms_aᵀ‖`` (at a share
            of 1 the solution is 0).
        iterations: FISTA steps at most; ``tol``: stop when the relative change of ``W`` is below it.
        deadline: ``time.monotonic()`` value after which the iterations stop (checked every 10 steps; at
            least 10 run), so an audit's ``max_seconds`` holds; the weights are then those reached so far.

    Returns:
        ``[n]`` the norm of each atom's weights ``‖W[:, a]‖`` (0 for atoms left out).

    Raises:
        ValueError: ``target`` and ``atoms`` disagree on ``d``, or ``lam`` is not in ``(0, 1)``.
    """
    return _group_lasso(target, atoms, lam, iterations, tol, deadline)[0]


def _group_lasso(
    target: Tensor, atoms: Tensor, lam: float, iterations: int, tol: float, deadline: float | None
) -> tuple[Tensor, bool]:
    """:func:`group_lasso`, and whether the deadline stopped it before convergence or ``iterations``."""
    if target.dim() != 2 or atoms.dim() != 2 or target.shape[1] != atoms.shape[1]:
        raise ValueError(f"target [k, d] and atoms [n, d] must share d, got {tuple(target.shape)} and {tuple(atoms.shape)}")
    if not 0 < lam < 1:
        raise ValueError(f"lam must be in (0, 1), got {lam}")
    lipschitz = float(torch.linalg.matrix_norm(atoms, 2)) ** 2
    threshold = lam * float((target @ atoms.T).norm(dim=0).max()) / lipschitz
    w = torch.zeros(target.shape[0], atoms.shape[0], dtype=atoms.dtype, device=atoms.device)
    z, t = w.clone(), 1.0
    for it in range(iterations):
        if it and it % 10 == 0 and late(deadline):
            return w.norm(dim=0), True
        v = z + (target - z @ atoms) @ atoms.T / lipschitz
        w_next = v * (1 - threshold / v.norm(dim=0, keepdim=True).clamp_min(1e-30)).clamp_min(0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = w_next + (t - 1) / t_next * (w_next - w)
        change = float((w_next - w).norm()) / max(float(w_next.norm()), 1e-30)
        w, t = w_next, t_next
        if change < tol:
            break
    return w.norm(dim=0), False


def partial_span(
    scorer: TokenScorer,
    batch_size: int,
    positions: int,
    segments: Sequence[int] = (0,),
    sep_token_id: int | None = None,
    deadline: float | None = None,
) -> SpanCheckResult:
    """Token recovery when the gradient shows only part of the inputs' span (joint sparse recovery).

    With more distinct inputs ``T`` than observed directions ``k`` (``lora_A`` gradients of rank ``r`` per
    adapter and ``T > r``, where DAGER's LoRA mode stops) the observed subspace ``S = span(basis)`` is a
    ``k``-dimensional slice of ``span{x_t}``: no token lies in ``S``, but every row of ``S`` is a combination
    of the same ``T`` true inputs. Two steps:

    1. **Shortlist.** Score every candidate ``(v, i)`` by its energy fraction in ``S``, ``1 − res(v, i)²``
       (:class:`TokenScorer`), minus the token's mean over the scanned positions (this removes what a
       token shares with every input: frequent subwords, LayerNorm's outlier dimensions), and keep the
       best ``max(32, 8B)`` tokens per position.
    2. **Joint fit.** Explain ``S`` by the fewest shortlisted inputs (:func:`group_lasso`, the ℓ2,1
       relaxation of multiple-measurement-vector sparse recovery). At each position the inputs with a
       weight of at least :data:`PARTIAL_KEEP` of the largest are present (``B`` at most); the scan ends
       at two positions in a row with none once a ``[SEP]`` was kept, and sequences end after theirs.

    On 12 real CoLA sentences of 17–23 tokens (MiniLM, LoRA r = 8 on query/value, ``k = 16``) the
    shortlist puts a true token first at 37% of positions, the joint fit at 84% (90% when told the
    sentence length).

    Args:
        scorer: residuals against the observed subspace (its ``basis`` is ``[d, k]`` orthonormal).
        batch_size: ``B``: at most ``B`` tokens per position are kept.
        positions: positions scanned (from 0).
        segments: token types tried (a token keeps its best-scoring type).
        sep_token_id: end-of-sequence token id: sequences end after it.
        deadline: ``time.monotonic()`` value after which the scan stops and the joint fit ends early
            (:func:`group_lasso` stops iterating; the weights reached so far decide); the result then has
            ``cut_short`` set.

    Returns:
        A :class:`SpanCheckResult` with ``partial = True`` and ``threshold = nan``; a candidate's score is
        ``1 −`` its weight relative to the largest (0 for the strongest input).

    Raises:
        ValueError: ``positions < 1`` or ``batch_size < 1``.
    """
    if positions < 1:
        raise ValueError(f"positions must be >= 1, got {positions}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    residual_rows, type_rows = [], []
    for pos in range(positions):
        if residual_rows and late(deadline):
            break
        best, which = torch.stack([scorer.residuals(pos, tt) for tt in segments]).min(0)  # [K]
        residual_rows.append(best)
        type_rows.append(torch.as_tensor(segments, device=which.device)[which])
    energy = 1 - torch.stack(residual_rows) ** 2  # [P, K]
    centred = energy - energy.mean(0, keepdim=True)
    n_pos = centred.shape[0]
    per_pos = min(max(PARTIAL_CANDIDATES, 8 * batch_size), centred.shape[1])
    short = centred.topk(per_pos, dim=1).indices  # [P, C] columns of scorer.token_ids
    ids_map = scorer.token_ids
    types = torch.stack(type_rows)
    x = torch.empty(n_pos, per_pos, scorer.d, dtype=torch.float64, device=scorer.basis.device)
    for p in range(n_pos):
        cols = short[p]
        col_types = types[p, cols]
        for tt in col_types.unique().tolist():
            same = col_types == tt
            x[p, same] = scorer.inputs(ids_map[cols[same]], p, tt)
    x = x.view(n_pos * per_pos, scorer.d)
    x = x / x.norm(dim=1, keepdim=True)
    weight, fit_cut = _group_lasso(scorer.basis.T, x, 0.05, 2000, 1e-7, deadline)
    weight = weight.view(n_pos, per_pos)
    weight = weight / weight.max().clamp_min(1e-30)
    candidates: list[list[tuple[int, int, float]]] = []
    empty, seen_sep = 0, False
    for pos in range(n_pos):
        w, order = weight[pos].sort(descending=True)
        keep = [j for j, wj in zip(order.tolist(), w.tolist(), strict=True) if wj >= PARTIAL_KEEP][:batch_size]
        col = short[pos]
        candidates.append([(int(ids_map[col[j]]), int(types[pos, col[j]]), 1.0 - float(weight[pos, j])) for j in keep])
        seen_sep = seen_sep or any(c[0] == sep_token_id for c in candidates[-1])
        empty = 0 if keep else empty + 1
        if empty >= 2 and (seen_sep or sep_token_id is None):
            break
    while candidates and not candidates[-1]:
        candidates.pop()
    top = weight[: len(candidates)].argmax(1)
    best = [(int(ids_map[short[p, j]]), 1.0 - float(weight[p, j])) for p, j in enumerate(top.tolist())]
    sequences = _assemble(candidates, batch_size, sep_token_id)
    progress = f"scanned {n_pos} of {positions} positions; joint fit " + ("cut" if fit_cut else "converged")
    return SpanCheckResult(
        candidates, best, sequences, int(scorer.basis.shape[1]), float("nan"), len(candidates), partial=True,
        cut_short=n_pos < positions or fit_cut, progress=progress,
    )


def _best_per_token(ids: Tensor, types: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort by score and keep each token id once (with its best-scoring token type)."""
    order = scores.argsort()
    ids, types, scores = ids[order], types[order], scores[order]
    seen: set[int] = set()
    keep = []
    for j, tok in enumerate(ids.tolist()):
        if tok not in seen:
            seen.add(tok)
            keep.append(j)
    idx = torch.tensor(keep, device=ids.device)
    return ids[idx], types[idx], scores[idx]


def _present(
    scores: Tensor,
    exact_tol: float,
    min_gap: float,
    *,
    robust: bool,
    batch_size: int,
    crowded: bool = False,
    inside_ratio: float = 0.5,
    noisy: bool = False,
) -> int:
    """How many of the sorted ``scores`` belong to tokens present at this position.

    Exact gradients: residual below ``exact_tol``. Dropout (``robust``), ranking rather than one fixed
    threshold: among the best ``4B + 16`` scores (floored at ``exact_tol``), cut at the largest ratio
    between neighbours when that ratio is at least ``min_gap``. When the span is ``crowded`` (rank
    ≥ d/4, where true tokens no longer stand out by a clear gap) and ``scores`` cover a whole candidate
    vocabulary (not a shortlist, whose median is not the bulk), the position still counts as occupied
    when its best score is below ``inside_ratio`` times the median, and its ``B`` best tokens are kept.
    With DP noise (``noisy``) a gap found after more than ``B`` candidates still marks the position as
    occupied and keeps its ``B`` best: at B = 4 on real CoLA, non-members within 1e-3 of the span sit
    between the true tokens and the gap even without noise.
    """
    if not robust:
        return int((scores < exact_tol).sum())
    s = scores[: min(len(scores), 4 * batch_size + 16)].clamp_min(exact_tol)
    if len(s) < 2:
        return 0
    ratios = s[1:] / s[:-1]
    j = int(ratios.argmax())
    if float(ratios[j]) >= min_gap and (j + 1 <= batch_size or noisy):
        return min(j + 1, batch_size)
    if crowded and float(scores[0]) < inside_ratio * float(scores.median()):
        return min(batch_size, len(scores))
    return 0


def _assemble(candidates: list[list[tuple[int, int, float]]], batch_size: int, sep_id: int | None) -> list[list[int]]:
    """Assemble ``batch_size`` sequences from per-position candidates, by rank.

    Sequence ``b`` takes the ``b``-th best candidate of each position (the best one when fewer are
    present) and ends after ``sep_id``. At ``B = 1`` this is exact; at ``B > 1`` it recovers the tokens
    at each position but not which sentence each belongs to (``span_attention`` and ``span_cluster`` do).
    """
    seqs: list[list[int]] = [[] for _ in range(max(1, batch_size))]
    done = [False] * len(seqs)
    for cands in candidates:
        if not cands:
            continue
        for b, seq in enumerate(seqs):
            if done[b]:
                continue
            tok = cands[min(b, len(cands) - 1)][0]
            seq.append(tok)
            if sep_id is not None and tok == sep_id:
                done[b] = True
    return [s for s in seqs if s]


class SpanCheck(Attack):
    """Registered attack ``"span_check"`` (DAGER's span check on layer 0's query/key/value gradients).

    Uses every tapped weight among layer 0's ``query``, ``key`` and ``value`` (their row spaces coincide,
    so stacking them only helps conditioning), plus the embedding tables and LayerNorm snapshot. When
    ``token_bag`` ran first (the word-embedding gradient is tapped), candidates are restricted to the
    recovered bag, as an attacker who sees that gradient would do; otherwise the whole vocabulary.

    Budget: no time limit of its own; the audit's deadline is checked between setup stages (span basis,
    token scorer, exact-member test), before each position and token type of the scan, and between
    vocabulary chunks of the dropout shortlist. Stopped by it, it returns the positions scanned so far with
    ``timed_out`` set and ``info["progress"]`` (e.g. ``"scanned 7 positions, 7 with tokens; ..."``).

    Args:
        shortlist: tokens per position re-ranked when gradients carry dropout.
        exact_tol: residual fraction below which a token counts as present for exact gradients.
    """

    name = "span_check"
    uses = ("token_bag",)

    def __init__(self, shortlist: int = 256, exact_tol: float = 1e-3) -> None:
        if shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {shortlist}")
        if not 0 < exact_tol < 1:
            raise ValueError(f"exact_tol must be in (0, 1), got {exact_tol}")
        self.shortlist = shortlist
        self.exact_tol = exact_tol

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        if not spec.layers:
            raise NotApplicable("the model has no encoder layers")
        usable = [n for n in spec.layers[0].input_projections if n in tapped]
        adapters = [a for a in spec.layers[0].lora if a.a in tapped or a.b in tapped]
        if not usable and not adapters:
            raise NotApplicable(
                "needs the weight gradient of layer 0's attention query, key or value, or of a LoRA adapter on "
                f"one of them (e.g. {spec.layers[0].modules[0]!r}); none of them is tapped"
            )
        lora = [n for a in adapters for n in (a.a, a.b) if n in tapped]
        # the token-type embedding's gradient, when tapped, says which segment ids occur
        extra = [spec.token_type_embeddings] if spec.token_type_embeddings in tapped else []
        return Requirements(
            gradients=frozenset(usable + lora + extra),
            params=frozenset(spec.embedding_params) | {a.a for a in adapters if a.b in tapped},
        )

    def run(self, inp: AttackInput) -> Reconstruction:
        budget = inp.budget()
        if (late_start := started_late(self.name, budget)) is not None:
            return late_start
        spec = inp.spec
        grads = [inp.gradients[n] for n in spec.layers[0].input_projections if n in inp.gradients]
        adapters = spec.layers[0].lora
        # lora_A gradients span the inputs like the frozen weight's would; they are exactly 0 while B = 0
        grads += [g for a in adapters if (g := inp.gradients.get(a.a)) is not None and bool(g.any())]
        constraints = None
        if not grads:
            pairs = [(inp.gradients[a.b], inp.params[a.a]) for a in adapters if a.b in inp.gradients and a.a in inp.params]
            if not pairs:
                raise NotApplicable("no gradient of layer 0's query/key/value (or of their LoRA adapters) in this snapshot")
            if inp.noise_std > 0:
                raise NotApplicable("with B = 0 only lora_B's exact rank deficit locates the inputs; DP noise hides it")
            constraints = lora_input_constraints([g for g, _ in pairs], [a for _, a in pairs])
            if constraints.shape[0] == 0:
                ranks = [min(g.shape) for g, _ in pairs]
                raise NotApplicable(
                    f"lora_A gradients are zero (B = 0) and every lora_B gradient has full rank {ranks}: the batch has "
                    "at least r distinct inputs, more than the adapters' rank can show"
                )
        tables = EmbeddingTables.from_params(inp.params, spec)
        bag = inp.priors.get("token_bag")
        vocabulary = torch.tensor(bag.token_bag, dtype=torch.long) if bag is not None and bag.token_bag else None
        token_types = None
        tt_grad = inp.gradients.get(spec.token_type_embeddings) if spec.token_type_embeddings else None
        if tt_grad is not None and bool(tt_grad.any()):
            token_types = tt_grad.abs().sum(dim=1).nonzero().flatten().tolist()
        result = span_check(
            grads,
            tables,
            inp.batch_size,
            dropout=spec.dropout,
            sep_token_id=spec.sep_token_id,
            shortlist=self.shortlist,
            exact_tol=self.exact_tol,
            deadline=budget.deadline,
            vocabulary=vocabulary,
            token_types=token_types,
            noise_std=inp.noise_std,
            constraints=constraints,
        )
        timed_out = result.cut_short and budget.audit_bound
        return Reconstruction(
            attack=self.name,
            sequences=result.sequences,
            position_candidates=[[tok for tok, _, _ in c] for c in result.candidates],
            timed_out=timed_out,
            info={
                **({"progress": result.progress} if timed_out else {}),
                "rank": result.rank,
                "length": result.length,
                "grads_used": len(grads),
                "lora_constraints": 0 if constraints is None else int(constraints.shape[0]),
                "dropout_mode": int(result.dropout_mode),
                "partial": int(result.partial),
                "vocabulary": int(vocabulary.numel()) if vocabulary is not None else spec.vocab_size,
            },
        )
