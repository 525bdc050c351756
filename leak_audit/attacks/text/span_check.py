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
from collections.abc import Collection, Sequence
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from leak_audit.attacks.budget import OutOfBudget, late
from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements, require_encoder
from leak_audit.attacks.gaps import lora_sentence_gap
from leak_audit.attacks.lasso import group_lasso
from leak_audit.attacks.spans import lora_input_constraints, span_basis
from leak_audit.attacks.text.sparse_bag import SparseBag, sparse_bag
from leak_audit.attacks.text.token_scores import TokenScorer, clipped_residuals, trimmed_residuals
from leak_audit.models import EmbeddingTables, TextModelSpec
from leak_audit.results.records import LOWER_BOUND

__all__ = ["LORA_EXACT_TOL", "PARTIAL_CANDIDATES", "PARTIAL_KEEP", "PARTIAL_SCAN", "SpanCheck", "SpanCheckResult",
           "partial_span", "span_check"]


LORA_EXACT_TOL = 1e-5
"""Residual fraction below which a token satisfies LoRA input constraints
(:func:`~leak_audit.attacks.spans.lora_input_constraints`)."""


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
        bag: with a partly observed span, the exact distinct tokens and length read by
            :func:`~leak_audit.attacks.text.sparse_bag.sparse_bag` (``None`` when it did not close, was cut by
            the deadline, or a vocabulary was given).
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
    bag: SparseBag | None = None


def _trim_count(dropout: float, d: int) -> int:
    """Coordinates to drop in the trimmed fit: the expected number zeroed by dropout plus 3 σ."""
    if dropout <= 0:
        return 0
    return int(math.ceil(d * dropout + 3 * math.sqrt(d * dropout * (1 - dropout))))


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

    noisy = noise_std > 0
    try:  # the scorer checks the deadline first, then between vocabulary chunks
        scorer = TokenScorer(tables, basis, vocabulary, complement=complement, deadline=deadline)
    except OutOfBudget:
        return cut_before_scan("while scoring the vocabulary")
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
            # token is certified; recover them by joint sparse recovery instead: first the exact bag and length
            # over token and position atoms, then (token, position) pairs among those
            bag = sparse_bag(grads, tables, deadline=deadline, segments=tuple(segments)) if vocabulary is None else None
            if bag is not None and not bag.cut and bag.residual <= BAG_ACCEPT and bag.tokens.numel():
                scorer = TokenScorer(tables, basis, bag.tokens.to(basis.device), complement=False)
                limit = min(limit, bag.length) if bag.length else limit
            else:
                bag = None
            result = partial_span(scorer, batch_size, min(limit, PARTIAL_SCAN), segments, sep_token_id, deadline)
            return dataclasses.replace(result, bag=bag)
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


BAG_ACCEPT = 1e-4
"""Relative residual below which a :func:`~leak_audit.attacks.text.sparse_bag.sparse_bag` bag is used (complete: ~1e-7)."""

PARTIAL_SCAN = 64
"""Positions :func:`partial_span` considers (from 0)."""

PARTIAL_CANDIDATES = 32
"""Tokens per position (at least; ``8B`` at batch size ``B``) that :func:`partial_span` passes to the joint fit."""

PARTIAL_KEEP = 0.15
"""An atom counts as present when its group-lasso weight is at least this share of the largest one."""


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
    2. **Joint fit.** Explain ``S`` by the fewest shortlisted inputs (:func:`~leak_audit.attacks.lasso.group_lasso`,
       the ℓ2,1 relaxation of multiple-measurement-vector sparse recovery). At each position the inputs with a
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
            (the group lasso stops iterating; the weights reached so far decide); the result then has
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
    # FISTA as measured: the deadline checked every 10 steps, the shrinkage's norm floored at 1e-30
    weight, fit_cut = group_lasso(
        scorer.basis.T, x, lam=0.05, iterations=2000, tol=1e-7, check_every=10, floor=1e-30, deadline=deadline
    )
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
        require_encoder(spec)
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
        if bag is not None and bag.timed_out:  # a pursuit the deadline cut: a partial bag would hide tokens
            bag = None
        vocabulary = torch.tensor(bag.token_bag, dtype=torch.long) if bag is not None and bag.token_bag else None
        length = bag.info.get("length") if bag is not None and vocabulary is not None else None  # LoRA bags know it
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
            max_length=int(length) if isinstance(length, int) and length > 0 else None,
            noise_std=inp.noise_std,
            constraints=constraints,
        )
        timed_out = result.cut_short and budget.audit_bound
        return Reconstruction(
            attack=self.name, sequences=result.sequences, timed_out=timed_out,
            position_candidates=[[tok for tok, _, _ in c] for c in result.candidates],
            info={
                **({"progress": result.progress} if timed_out else {}),
                "rank": result.rank, "length": result.length, "grads_used": len(grads),
                "lora_constraints": 0 if constraints is None else int(constraints.shape[0]),
                "dropout_mode": int(result.dropout_mode),
                "partial": int(result.partial),
                "vocabulary": int(vocabulary.numel()) if vocabulary is not None else spec.vocab_size,
                **({LOWER_BOUND: gap} if (gap := lora_sentence_gap(spec, inp.gradients, inp.batch_size)) else {}),
                **({"bag": int(result.bag.tokens.numel()), "bag_length": result.bag.length,
                    "bag_residual": float(f"{result.bag.residual:.3g}")} if result.bag is not None else {}),
            },
        )
