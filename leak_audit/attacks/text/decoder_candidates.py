"""Candidate tokens from a decoder's layer-0 row space: exact (DAGER's span test), per position, or ranked.

The first step of :class:`~leak_audit.attacks.text.span_decoder.SpanDecoder` (Petrov et al., "DAGER", NeurIPS
2024, §4): layer 0's attention projections read ``Norm(E[v] (+ P[i]))``, so the vocabulary rows whose input lies
in the row space of their stacked weight gradients are the batch's tokens (:func:`candidate_tokens`; per
position for learned absolute positions, :func:`candidates_by_position`). Where the row space is saturated or
noised nothing lies in it exactly and :func:`ranked_bag` keeps the rows far below the vocabulary's floor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.pursuit import relative_residual
from leak_audit.attacks.spans import span_basis
from leak_audit.models import EmbeddingTables

__all__ = ["candidate_tokens", "candidates_by_position", "ranked_bag", "unexplained"]


def candidate_tokens(
    grads: Sequence[Tensor],
    tables: EmbeddingTables,
    threshold: float,
    rtol: float = 1e-6,
    chunk: int = 8192,
    *,
    position: int | None = None,
    basis: Tensor | None = None,
    noise_std: float = 0.0,
) -> tuple[Tensor, Tensor, int]:
    """Vocabulary rows whose layer-0 input lies in the gradients' row space.

    Args:
        grads: layer 0's attention projection weight gradients as input-spanning rows ``[d_out_k, d]``
            (:func:`~leak_audit.attacks.text.span_decoder.input_rows`; they share their input).
        tables: the first-layer input tables.
        threshold: relative residual below which a row is a candidate.
        rtol: relative singular-value tolerance of the row space (:func:`~leak_audit.attacks.spans.span_basis`).
        chunk: rows ranked at once (memory).
        position: rank ``Norm(E[v] + P[position])`` (learned absolute positions); ``None``: the position-free
            ``Norm(E[v])`` (rotary positions act inside attention).
        basis: the row space's orthonormal basis ``[d, r]``, if already computed (then ``grads`` is unused).
        noise_std: DP-SGD's per-coordinate noise std: directions under the noise edge are dropped
            (:func:`~leak_audit.attacks.spans.span_basis`).

    Returns:
        ``(tokens, residuals, rank)``: candidate token ids ``[K]`` (ascending residual), their residuals
        ``[K]``, and the row space's rank.
    """
    if basis is None:
        basis, _ = span_basis(grads, rtol=rtol, noise_std=noise_std)
    res = torch.empty(tables.word.shape[0], dtype=torch.float64)
    basis32 = basis.to(device=tables.word.device, dtype=torch.float32)  # float32 suffices to rank: true rows ~1e-6
    shift = 0.0 if position is None else tables.position[position + tables.position_offset].to(torch.float32)
    for start in range(0, tables.word.shape[0], chunk):
        rows = tables.normalize(tables.word[start:start + chunk].to(torch.float32) + shift)
        proj = (rows @ basis32) @ basis32.T
        res[start:start + chunk] = (torch.linalg.vector_norm(rows - proj, dim=-1)
                                    / torch.linalg.vector_norm(rows, dim=-1).clamp_min(1e-30)).cpu().double()
    order = res.argsort()
    keep = order[res[order] < threshold]
    return keep, res[keep], int(basis.shape[1])


def candidates_by_position(
    grads: Sequence[Tensor], tables: EmbeddingTables, threshold: float, rtol: float = 1e-6, max_length: int = 512,
    deadline: float | None = None,
) -> tuple[list[Tensor], int, bool]:
    """Per position ``i = 0, 1, ...``, the tokens ``v`` whose ``Norm(E[v] + P[i])`` lies in the row space (learned
    absolute positions, GPT-2). Sentences start at position 0 and are contiguous, so the scan stops at the first
    position without a candidate (or at ``max_length``, the position table's end or ``deadline``).

    Returns:
        ``(per_position, rank, cut)``: candidate token ids ``[K_i]`` per position, the row space's rank, and
        whether the deadline stopped the scan (the later positions are then unknown, not empty).
    """
    basis, _ = span_basis(grads, rtol=rtol)
    out: list[Tensor] = []
    for i in range(min(max_length, tables.max_length)):
        if late(deadline):
            return out, int(basis.shape[1]), True
        tokens, _, _ = candidate_tokens(grads, tables, threshold, position=i, basis=basis)
        if tokens.numel() == 0:
            break
        out.append(tokens)
    return out, int(basis.shape[1]), False


def ranked_bag(grads: Sequence[Tensor], tables: EmbeddingTables, rtol: float = 1e-6, margin: float = 0.8,
               quantile: float = 0.01, noise_std: float = 0.0) -> tuple[Tensor, float]:
    """A partial token bag from a *saturated* or *noised* row space, by ranking.

    Saturated: fewer dimensions than inputs (LoRA beyond its rank). Noised: DP-SGD's Gaussian noise fills every
    direction; the directions above the noise edge (``noise_std``) are kept, and they too mix the inputs.

    Every vocabulary row's position-free input ``Norm(E[v])`` is ranked by its relative residual to the row
    space. Rows of tokens absent from the batch pile up at a common floor (their shared direction lies in the
    span), the batch's dominant tokens sit well below it; the floor is the residual at the ``quantile`` of the
    vocabulary, and the bag holds the rows below ``margin`` times it.

    Returns:
        ``(tokens, floor)``: token ids ``[K]`` (ascending residual) and the floor (a relative residual).
    """
    rows, residuals, rank = candidate_tokens(grads, tables, threshold=1.0 + 1e-9, rtol=rtol, noise_std=noise_std)
    if rank == 0:  # the noise drowns every direction
        return rows[:0], 1.0
    if rows.numel() == 0:
        return rows, 1.0
    floor = float(residuals[min(int(quantile * tables.word.shape[0]), rows.numel() - 1)])
    return rows[residuals < margin * floor], floor


def unexplained(grads: Sequence[Tensor], tables: EmbeddingTables, tokens: Tensor) -> float:
    """How much of the rows the candidates' position-free inputs leave unexplained (rotary decoders).

    DAGER's premise: the rows of layer 0's gradients are combinations of the batch's inputs. When the candidate test
    is right, the candidates' inputs ``Norm(E[v])`` span the rows to round-off (~1e-7). A large remainder means the
    test passed too few tokens, e.g. when a rank read at a relative singular-value tolerance misses directions that
    massive first-position activations push far below the largest (SmolLM2, LoRA r = 8: 650 to 4.9e-5 in one CoLA
    batch of 4, read as rank 11 of 16 with two candidates).

    Args:
        grads: the input-spanning rows ``[k_i, d]``.
        tables: the first-layer input tables.
        tokens: candidate token ids ``[K]``.

    Returns:
        ``‖R − R P‖ / ‖R‖`` for the stacked rows ``R`` and the projector ``P`` onto the candidates' inputs
        (:func:`~leak_audit.attacks.pursuit.relative_residual`: 1.0 without candidates, 0.0 for zero rows).
    """
    rows = torch.cat([g.detach().to(torch.float64) for g in grads])
    inputs = tables.normalize(tables.word[tokens.to(tables.word.device)].to(torch.float64)).to(rows.device)
    return relative_residual(rows, inputs)
