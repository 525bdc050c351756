"""The batch's token bag, and its length, from *saturated* first-layer gradients by joint sparse recovery.

A LoRA adapter's ``A`` gradient ``s·Bᵀ Σ_t δ_t x_tᵀ`` is ``[r, d]``: once a batch has more distinct layer-0
inputs than the stacked adapters have rows, no single input lies in their row space and the span check
(:mod:`~leak_audit.attacks.text.span_check`, DAGER's test) accepts nothing exactly. The rows are still
combinations of the batch's inputs alone, and every input ``Norm(E[v] + P[i] + T[s])`` lies in the span of
three atoms: its token's, its position's and the normalisation's bias
(:meth:`~leak_audit.models.EmbeddingTables.additive_atoms`). So the sparsest set of such atoms whose span holds
the rows is the batch's distinct tokens, its occupied positions ``0 … n − 1`` and the bias: joint sparse
recovery over ``V + L + 1`` atoms (:mod:`~leak_audit.attacks.pursuit`, rank-aware ORMP), not over the
``V · L`` (token, position) pairs. Rotary decoders have no position atoms (their layer-0 inputs carry no
position) and RMSNorm no bias: the atoms are then the vocabulary's rows alone.

Measured (pretrained MiniLM, LoRA r = 8 on query/value after 50 steps, the 16 rows of layer 0's two
``lora_A`` gradients; ``benchmarks/README.md``): every distinct token exact on all 48 CoLA and SST-2 batches of
4 and 8 sentences (relative residual ~1e-7; 0.8-1.2 s per CoLA batch, 2.2-6.1 s per SST-2 batch, 2 cores). Which token sits at
which position is *not* determined by layer 0: every (token, position) input lies in the same
``tokens + positions + 1``-dimensional span, so any set of that many pairs fits the rows.

The pursuit stops at ``(d + k)/2`` atoms (``k`` the rows' rank: 200 on MiniLM, 296 on SmolLM2 for ``2r = 16``
rows): beyond it two different supports can span the same rows, so a fit is no evidence of the bag. Without that
bound, training-mode gradients under ``lora_dropout`` (whose masked inputs no vocabulary set spans) "closed" on
several hundred tokens (SmolLM2, CoLA B = 4: 574 for 32; docs/decoders.md, LoRA dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from leak_audit.attacks.pursuit import joint_support, prune_support
from leak_audit.models import EmbeddingTables

__all__ = ["SparseBag", "sparse_bag"]


@dataclass(frozen=True)
class SparseBag:
    """What :func:`sparse_bag` read.

    Attributes:
        tokens: distinct token ids ``[K]``, ascending (on the CPU).
        length: the longest sequence's length (the last occupied position plus one); 0 without position atoms
            (rotary or position-free models) or when no position was picked.
        residual: the rows' relative residual outside the picked atoms' span (near ``1e-7`` when complete; the
            pursuit stops unclosed at the uniqueness bound ``(d + rank)/2`` atoms, ``rank`` the rows').
        cut: the deadline stopped the pursuit (the bag is what was read so far).
    """

    tokens: Tensor
    length: int
    residual: float
    cut: bool


def sparse_bag(
    rows: Sequence[Tensor],
    tables: EmbeddingTables,
    tol: float = 1e-6,
    deadline: float | None = None,
    segments: tuple[int, ...] = (0,),
    patience: int | None = None,
    prune: bool = True,
) -> SparseBag:
    """The batch's tokens (and length) as the sparsest atom set whose span holds ``rows``.

    Args:
        rows: layer 0's input-spanning gradient rows ``[k_i, d]`` (e.g. ``lora_A`` of the query and value).
        tables: the first-layer tables at the audited step.
        tol: relative residual at which the pursuit stops (float32 gradients: round-off near ``1e-7``).
        deadline: ``time.monotonic()`` value after which it stops.
        segments: segment ids whose position atoms are offered (BERT: ``(0,)`` for single sentences).
        patience: stop once this many picks in a row left the residual above 0.9 of what it was (rows with
            round-off well above ``tol``, :func:`~leak_audit.attacks.spans.balanced_rows`); ``None``: no such stop.
        prune: drop the picks the final fit does not need; ``False`` keeps every pick (a superset of the bag where
            the rows are noisy, for a later pursuit to choose from).

    Returns:
        A :class:`SparseBag`.

    Raises:
        ValueError: ``rows`` is empty.
    """
    if not rows:
        raise ValueError("sparse_bag needs at least one block of gradient rows")
    targets = torch.cat([r.to(torch.float64) for r in rows])
    tokens, positions, bias = tables.additive_atoms(segments)
    device = targets.device
    atoms = torch.cat([tokens, positions, bias[None]]).to(device)
    vocab, per_segment = tokens.shape[0], tables.max_length
    # past (d + rank)/2 atoms a support that spans the rows is no longer unique (two such supports share a subspace
    # that holds the rows), so a fit that needs more is no evidence of the bag: stop there, unclosed
    cap = (targets.shape[1] + int(torch.linalg.matrix_rank(targets))) // 2
    picked, residual, cut = joint_support(targets, atoms, tol=tol, max_atoms=cap, deadline=deadline, patience=patience)
    if not picked:
        return SparseBag(torch.zeros(0, dtype=torch.long), 0, residual, cut)
    index = torch.tensor(picked, dtype=torch.long, device=device)
    kept = (index[prune_support(targets, atoms[index], tol=tol)] if prune else index).cpu()
    bag = kept[kept < vocab].sort().values
    occupied = [(int(k) - vocab) % per_segment for k in kept if vocab <= k < vocab + positions.shape[0]]
    return SparseBag(bag, max(occupied) + 1 if occupied else 0, residual, cut)
