"""Scoring candidate layer-0 inputs against a gradient's row space: the span check's residuals.

The span check (Petrov, Dimitrov, Baader, Müller, Vechev, "DAGER: Exact Gradient Inversion for Large Language
Models", NeurIPS 2024) keeps a token ``v`` at position ``i`` when its first-layer input ``x(v, i, s)``
(:class:`~leak_audit.models.EmbeddingTables`) lies in the row space of a first-layer weight gradient. This
module computes how far every candidate lies from that span:

* :class:`TokenScorer`: the exact projection residual of every vocabulary token at one position, in
  float64, with the LayerNorm split into per-token and per-position parts (the exact-gradient test);
* :func:`clipped_residuals`: an outlier-capped residual in float32 chunks, to shortlist under dropout;
* :func:`trimmed_residuals`: least-trimmed-squares residuals (Rousseeuw & Van Driessen 2006), zero again
  for a true input whose coordinates dropout zeroed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from leak_audit.attacks.budget import OutOfBudget, late
from leak_audit.models import EmbeddingTables

__all__ = ["BLOCK", "SCORER_CHUNK", "TokenScorer", "clipped_residuals", "trimmed_residuals"]

BLOCK = 32
"""Positions whose per-position products :class:`TokenScorer` computes together (one matrix product over the
``[V, d]`` token table instead of one mat-vec per position)."""

SCORER_CHUNK = 4096
"""Tokens whose per-token terms :class:`TokenScorer` computes between two deadline checks (about 50 ms of
float64 products on one core for MiniLM's 384 dimensions; the whole 30,522-token vocabulary took 0.41 s in
one step, and 1.9 s once on a loaded machine)."""


class TokenScorer:
    """Projection residuals of every vocabulary token's layer-0 input, position by position.

    For a basis ``V`` (``[d, r]``, orthonormal) the residual fraction of a candidate input ``x`` is
    ``‖x − V Vᵀx‖ / ‖x‖``. LayerNorm is affine after centring and scaling, so for ``z = e_v + q``
    (``q`` = position + type embedding) every term of ``‖x‖²`` and ``Vᵀx`` splits into a per-token part
    computed once and a per-position part: scoring all ``V`` tokens at one position costs a few
    ``[V, d]`` and ``[V, r]`` mat-vecs, instead of a LayerNorm and a ``[V, d] × [d, r]`` product.
    All arithmetic is float64 because residuals of true tokens are ~1e-7 of ``‖x‖``.

    Args:
        tables: embedding tables and LayerNorm.
        basis: ``[d, r]`` orthonormal basis of the gradient's row space.
        token_ids: candidate token ids (default: the whole vocabulary). Scores are aligned with them.
        complement: ``basis`` spans the *orthogonal complement* of the subspace instead (LoRA
            constraints, where the subspace is most of ``R^d``): the residual is then ``‖Vᵀx‖ / ‖x‖``.
        deadline: ``time.monotonic()`` value checked between chunks of :data:`SCORER_CHUNK` tokens.

    Raises:
        OutOfBudget: the deadline passed before every token's terms were computed (nothing is kept).
    """

    def __init__(
        self,
        tables: EmbeddingTables,
        basis: Tensor,
        token_ids: Tensor | None = None,
        complement: bool = False,
        *,
        deadline: float | None = None,
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
        self._gamma = tables.norm_weight.detach().to(f64)
        self._beta = tables.norm_bias.detach().to(f64)
        self._g2 = self._gamma**2
        self._gb = self._gamma * self._beta
        self._gamma_basis = self._gamma[:, None] * self.basis  # [d, r]
        # per-token terms, a chunk of the vocabulary at a time (one [V, d] x [d, r] float64 product is the
        # scorer's one long step): centred embeddings, their projections, ‖e‖², ⟨e², γ²⟩ and ⟨e, γβ⟩
        parts: list[tuple[Tensor, ...]] = []
        for lo in range(0, max(self.token_ids.numel(), 1), SCORER_CHUNK):  # one (empty) chunk at least
            if late(deadline):
                raise OutOfBudget
            word = tables.word.detach()[self.token_ids[lo : lo + SCORER_CHUNK]].to(f64)
            ce = word - word.mean(dim=1, keepdim=True)
            ce_sq = ce**2
            parts.append((ce, ce @ self._gamma_basis, ce_sq.sum(1), ce_sq @ self._g2, ce @ self._gb))
        self._ce, self._e_proj, self._e_sq, self._e_g2, self._e_gb = (torch.cat(p) for p in zip(*parts))
        self._beta_proj = self._beta @ self.basis  # [r]
        self._beta_sq = float((self._beta**2).sum())
        # ‖s(e + c) + b‖² = s²(‖e‖² + 2⟨e, c⟩ + ‖c‖²) + 2s(⟨e, b⟩ + ⟨c, b⟩) + ‖b‖²: a [V, r] mat-vec per position
        self._e_proj_sq = (self._e_proj**2).sum(1)  # [V]
        self._e_proj_beta = self._e_proj @ self._beta_proj  # [V]
        self._blocks: dict[tuple[int, int], tuple[int, Tensor, Tensor]] = {}

    def _offset(self, position: int, token_type: int) -> Tensor:
        t = self.tables
        q = t.position[position + t.position_offset].detach().to(torch.float64)
        if t.token_type is not None:
            q = q + t.token_type[token_type].detach().to(torch.float64)
        return q

    def _block(self, position: int, token_type: int) -> tuple[int, Tensor, Tensor]:
        """The per-position token products of the :data:`BLOCK` positions around ``position``, in two matrix
        products (not ``2·BLOCK`` mat-vecs over the ``[V, d]`` table): ``(first position, [V, 2, n], [V, n])``,
        ``⟨e, q⟩, ⟨e, γ²⊙q⟩`` and ``⟨e Γ V, q Γ V⟩`` for the block's centred offsets ``q``."""
        key = (token_type, position // BLOCK)
        if key not in self._blocks:
            lo = key[1] * BLOCK
            hi = min(lo + BLOCK, self.tables.position.shape[0] - self.tables.position_offset)
            cq = torch.stack([self._offset(p, token_type) for p in range(lo, hi)])
            cq = cq - cq.mean(1, keepdim=True)  # [n, d]
            cross = (self._ce @ torch.cat([cq, self._g2 * cq]).T).view(-1, 2, hi - lo)
            if len(self._blocks) >= 2:  # span checks walk positions in order: keep the last two blocks
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[key] = (lo, cross, self._e_proj @ (cq @ self._gamma_basis).T)
        return self._blocks[key]

    def residuals(self, position: int, token_type: int = 0) -> Tensor:
        """Residual fraction in ``[0, 1]`` of every candidate token at ``position``.

        Returns:
            ``[K]`` float64, aligned with :attr:`token_ids`.
        """
        q = self._offset(position, token_type)
        cq = q - q.mean()
        lo, cross, e_c = self._block(position, token_type)
        cross, e_c = cross[:, :, position - lo], e_c[:, position - lo]  # [V, 2], [V]
        var = (self._e_sq + 2 * cross[:, 0] + (cq * cq).sum()) / self.d
        inv_sigma = torch.rsqrt(var + self.tables.norm_eps)
        c = cq @ self._gamma_basis  # [r]
        proj_sq = (
            (self._e_proj_sq + 2 * e_c + (c * c).sum()) * inv_sigma**2
            + 2 * (self._e_proj_beta + (c * self._beta_proj).sum()) * inv_sigma
            + (self._beta_proj**2).sum()
        )
        norm_sq = (
            (self._e_g2 + 2 * cross[:, 1] + (self._g2 * cq * cq).sum()) * inv_sigma**2
            + 2 * (self._e_gb + (cq * self._gb).sum()) * inv_sigma
            + self._beta_sq
        )
        # both are differences of expanded terms here: clamp their round-off below 0
        res_sq = proj_sq.clamp_min(0) if self.complement else (norm_sq - proj_sq).clamp_min(0)
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
