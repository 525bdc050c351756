"""Assignment descent: the last few long sentences of a batch from layer 0's query gradient that is left.

:func:`~leak_audit.attacks.text.peeling.peel` removes sentences one by one once a proposal certifies them.
It stalls when two or more sentences of about 25 tokens or more are left: their keys fill most of each
32-dimensional head of MiniLM, so the pair pursuit's key-span test cannot tell their tokens apart
(measured on SST-2's first 64, B = 4: the ten batches left open held two or more sentences over ~25
tokens). This module reads them in three steps, none of which needs the key span.

1. **Placement** (:func:`place_pairs`). The gradient left, ``G = Σ_t δq_t x_tᵀ``, has the row space
   ``span{x_t}`` of its inputs ``x_t = LN(E[v] + P[i] + T)``, of rank the number of distinct
   ``(token, position)`` pairs (DAGER's layer-0 span test, Petrov et al. 2024, on a weight gradient of its
   own). Each candidate pair is ranked per position by its input's distance to that row space, and each
   position keeps as many tokens as sentences reach it; the ``[SEP]`` positions give the lengths. With two
   or three sentences left, the inputs of false pairs lie off the row space (the bipartite token–position
   graph of so few sentences has few cycles), so the ranking is right at (nearly) every position: SST-2 dev
   33–34 (39 and 27 tokens), all 39 positions (``tests/attacks/text/test_assignment_descent.py``). With
   four long sentences the graph's cycles bring nearly every pair into the span; :func:`place_pairs` then
   returns ``None`` (its separation check) rather than guess.
2. **Position assignment** (:mod:`~leak_audit.attacks.text.position_assignment`). Each sentence's own
   certificate (the columns of the tokens that occur once, predicted by one forward/backward of it) is a cost
   of that sentence alone, so each position's tokens go to the sentences by an optimal assignment, with swaps
   of prefixes, suffixes and runs between two sentences where no position's reassignment helps. It returns at
   the first sentence it certifies.
3. **Descent** (:func:`assignment_descent`). Which of a position's tokens belongs to which sentence is read
   by the exact-gradient certificate of :mod:`~leak_audit.attacks.text.peeling`: the gradient left is fitted
   by the hypotheses' logit gradients ``J_{S,c}``, and a local search lowers the relative residual. Its
   moves swap two sentences' tokens at one position, swap runs of up to 8 positions or whole prefixes, and
   replace a token at an uncertain position by the next candidate there. Each step takes the best move at
   the position where the fit's residual sits most (all of a position's moves from one batched forward).
   It starts from the proposal peeling could not certify (each token to the sentence whose guess holds it)
   and stops once one sentence fits on its own tokens (peeling's certificate). The true sentences fit exactly
   (residual ~1e-6).

:class:`~leak_audit.attacks.text.span_cluster.SpanCluster` calls :func:`complete` when a peeling round
certifies nothing; its sentences are then certified like any proposal. Cost: a few seconds to a minute
per open batch on 2 CPU cores (benchmarks/README.md, "Which audits of this view are lower bounds").
The code is ours.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.spans import widest_gap_rank
from leak_audit.attacks.text.position_assignment import assign_by_position
from leak_audit.attacks.text.query_columns import additive_atoms
from leak_audit.models import EmbeddingTables

__all__ = ["Placement", "assignment_descent", "complete", "factored_inner_products", "pair_distances", "place_pairs"]

SEP_GAP = 4.0
"""The ``[SEP]`` positions are the closest ``n ≤ B`` positions of ``[SEP]``'s input to the row space, cut at the
widest ratio between consecutive distances, which must be at least this (measured on MiniLM, SST-2: true
7e-6 to 3e-5, next 2e-4 to 5e-2)."""

CACHE = 512
"""Sentences whose logit gradients the descent keeps (least recently used dropped first; the moves of one
position are kept together)."""

VERIFY = 3
"""Moves per group whose residual, ranked by the inner products of the factored gradients, is confirmed by an
exact least-squares fit (the first that lowers the current residual is taken)."""

SEPARATION = 1.5
"""Placement gives up when more than this many candidate pairs per placed pair lie as close to the row space
as the closest 90% of the placed ones (a span that holds nearly every pair: too many sentences left)."""


@dataclass
class Placement:
    """What :func:`place_pairs` read from a row space.

    Attributes:
        lengths: the sentences' lengths, longest first (``[CLS]`` and ``[SEP]`` included).
        slots: per position ``p``, the tokens placed there, one per sentence longer than ``p``, closest first
            (a token may repeat when two sentences share it there).
        alternatives: per position, the next candidates by distance (for the descent's replace moves).
        uncertain: positions whose last pick is within a factor 3 of the next candidate, or that repeat a token.
        rank: the row space's rank; separation: candidates as close as the closest 90% of the placed pairs,
            per such pair (1 when the ranking is clean).
        inputs: ``[d, m]`` float64, the layer-0 inputs of the ``m`` distinct placed pairs; tokens and
            positions: ``[m]`` their token ids and positions.
        bag: the candidate tokens; atoms: ``[d, |bag| + length + 1]`` float64, their additive atoms
            (:func:`~leak_audit.attacks.text.query_columns.additive_atoms`), over which a gradient splits
            into one column per token (the peeling certificate's columns).
    """

    lengths: list[int]
    slots: list[list[int]]
    alternatives: list[list[int]]
    uncertain: list[int]
    rank: int
    separation: float
    inputs: Tensor
    tokens: Tensor
    positions: Tensor
    bag: list[int]
    atoms: Tensor


def pair_distances(
    grad: Tensor, tables: EmbeddingTables, bag: Sequence[int], length: int, segment: int = 0
) -> tuple[Tensor, int, Tensor]:
    """How far every (bag token, position) pair's layer-0 input lies from a first-layer gradient's row space.

    Args:
        grad: ``[d_out, d]`` the gradient of a linear map of layer 0's inputs; its rank is read at the widest
            gap of its spectrum (:func:`~leak_audit.attacks.spans.widest_gap_rank`).
        tables: embedding tables and LayerNorm; bag: the token ids; length: positions ``0 … length − 1``.

    Returns:
        ``(distances, rank, inputs)``: ``[|bag|, length]`` relative distances (CPU), the rank read, and the
        ``[|bag| · length, d]`` float64 inputs (token-major).
    """
    g = grad.detach().double()
    s, vh = torch.linalg.svd(g, full_matrices=False)[1:]
    rank = widest_gap_rank(s)
    basis = vh[:rank].T
    nb = len(bag)
    toks = torch.tensor(list(bag), dtype=torch.long).repeat_interleave(length)
    poss = torch.arange(length).repeat(nb)
    x = tables.pair_inputs(toks.to(tables.word.device), poss.to(tables.word.device), segment).double().to(g.device)
    dist = ((x - (x @ basis) @ basis.T).norm(dim=1) / x.norm(dim=1).clamp_min(1e-300)).view(nb, length).cpu()
    return dist, rank, x


def place_pairs(
    grad: Tensor,
    tables: EmbeddingTables,
    bag: Sequence[int],
    length: int,
    batch_size: int,
    *,
    cls_token_id: int,
    sep_token_id: int,
    segment: int = 0,
) -> Placement | None:
    """Place the tokens of ``batch_size`` sentences at their positions from a first-layer weight gradient.

    Args:
        grad: ``[d_out, d]`` the gradient of a linear map of layer 0's inputs (the query weight), of these
            sentences only (exact: dropout off, no noise; peel the others first).
        tables: embedding tables and LayerNorm at the audited step.
        bag: the token ids that may occur; ``length``: the longest sentence's length bound.
        batch_size: the number of sentences in ``grad`` (≥ 2).

    Returns:
        A :class:`Placement`, or ``None`` when the row space does not single out the pairs (no ``[SEP]``
        position, more ``[SEP]`` positions than sentences, a rank within 8 of ``d``, or a separation above
        :data:`SEPARATION`).

    Raises:
        ValueError: ``batch_size < 2``, or ``[SEP]`` / ``[CLS]`` not in ``bag``.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (one sentence is read by the span check), got {batch_size}")
    bag = [int(v) for v in bag]
    if sep_token_id not in bag or cls_token_id not in bag:
        raise ValueError(f"the bag must hold [CLS] ({cls_token_id}) and [SEP] ({sep_token_id})")
    g = grad.detach().double()
    dist, rank, x = pair_distances(g, tables, bag, length, segment)
    if rank >= g.shape[1] - 8:
        return None
    nb = len(bag)
    sep_row = dist[bag.index(sep_token_id), 1:]
    ranked = sep_row.argsort()[: batch_size + 1]
    near = sep_row[ranked].clamp_min(1e-300)
    if near.numel() < 2:
        return None
    # the [SEP] positions are the closest ones up to the widest gap (1 to B of them: equal lengths share one)
    n = int((near[1:] / near[:-1]).argmax()) + 1
    if float(near[n] / near[n - 1]) < SEP_GAP:
        return None
    ends = sorted(int(p) + 1 for p in ranked[:n])
    order = dist.argsort(0)  # per position, bag indices closest first
    best: tuple[int, list[int], list[list[int]]] | None = None
    # sentences sharing a length share a [SEP] position: try each way to give the b lengths to the positions
    for extra in itertools.combinations_with_replacement(ends, batch_size - len(ends)):
        lengths = sorted([p + 1 for p in [*ends, *extra]], reverse=True)
        slots = [[cls_token_id] * batch_size]
        for p in range(1, lengths[0]):
            k = sum(n > p for n in lengths)
            slots.append([bag[int(j)] for j in order[:k, p]])
        # the rank counts distinct pairs: positions with fewer distinct tokens than sentences repeat one
        excess = sum(len(c) for c in slots[1:]) + 1 - rank
        if best is None or abs(excess) < abs(best[0]):
            best = (excess, lengths, slots)
    assert best is not None
    excess, lengths, slots = best
    uncertain: set[int] = set()
    alternatives: list[list[int]] = [[]]
    jumps: list[tuple[float, int]] = []  # how far the last pick sits behind the one before it
    for p in range(1, lengths[0]):
        k = len(slots[p])
        col = dist[:, p]
        last = float(col[order[k - 1, p]])
        nxt = float(col[order[k, p]]) if k < nb else float("inf")
        alternatives.append([bag[int(j)] for j in order[k : k + 2, p]])
        if nxt < 3 * last:
            uncertain.add(p)
        if k > 1:
            jumps.append((last / max(float(col[order[k - 2, p]]), 1e-300), p))
    # more picks than distinct pairs: the positions whose last pick jumps furthest likely repeat a token
    uncertain.update(p for _, p in sorted(jumps, reverse=True)[: max(excess, 0)])
    picked = [(bag.index(v), p) for p in range(1, lengths[0]) for v in slots[p]]
    near = torch.tensor([float(dist[j, p]) for j, p in picked]).quantile(0.9)  # robust to a few weak picks
    close = int((dist[:, 1 : lengths[0]] <= near).sum())
    separation = close / (0.9 * len(picked))
    if separation > SEPARATION:
        return None
    distinct = sorted({(bag.index(v), p) for p in range(lengths[0]) for v in slots[p]}, key=lambda jp: jp[::-1])
    inputs = x.view(nb, length, -1)[[j for j, _ in distinct], [p for _, p in distinct]].T.contiguous()
    tokens = torch.tensor([bag[j] for j, _ in distinct], dtype=torch.long)
    positions = torch.tensor([p for _, p in distinct], dtype=torch.long)
    atoms = additive_atoms(tables, bag, length, segment).to(g.device)
    return Placement(
        lengths, slots, alternatives, sorted(uncertain), rank, separation, inputs, tokens, positions, bag, atoms
    )


def assignment_descent(
    grad: Tensor,
    placement: Placement,
    contributions: Callable[[list[list[int]]], list[tuple[Tensor, Tensor]]],
    *,
    cls_token_id: int,
    sep_token_id: int,
    start: Sequence[Sequence[int]] = (),
    steps: int = 200,
    span: int = 8,
    tol: float = 1e-5,
    own_tol: float = 1e-4,
    by_position: bool = True,
    deadline: float | None = None,
) -> tuple[list[list[int]], float]:
    """Assign the placed tokens to sentences by the exact-gradient certificate of all of them together.

    Args:
        grad: ``[d_out, d]`` the gradient of these sentences only (as given to :func:`place_pairs`).
        placement: the placed tokens and lengths.
        contributions: ``sentences -> [(outputs [C − 1, n, d_out], inputs [n, d]), ...]``, the logit
            gradients of each sentence as factors, ``J_c = outputs[c]ᵀ inputs``
            (:func:`~leak_audit.attacks.text.peeling.batched_logit_factors`; the moves at one position are
            evaluated together, and ranked by the factors' inner products before an exact fit confirms the
            best of them, :data:`VERIFY`).
        start: earlier guesses of these sentences (e.g. the last proposal peeling could not certify): each
            position's tokens start with the sentence whose guess holds them (else in closest-first order).
        steps: improving moves at most. Each step evaluates the uncertain positions' replacements, then the
            moves at each position in turn, starting where the fit's residual sits most (the residual split
            over the placed pairs' inputs), and takes the best move of the first group that lowers the
            certificate's residual; the search stops when none does or the residual falls below ``tol``.
        span: the longest run ``[p, q)`` of positions two sentences swap in one move (besides whole prefixes).
        own_tol: the search also stops once one sentence fits the gradient on its own tokens (those no other
            sentence of the hypothesis holds, each split over the additive atoms as peeling's certificate
            does) within this relative residual (the peeling certificate then removes it and the rest is read
            again).
        by_position: first reassign each position's tokens by the sentences' own certificates
            (:func:`~leak_audit.attacks.text.position_assignment.assign_by_position`, certified below ``own_tol``,
            or 1e-4 when ``own_tol`` is 0), then search as above from there unless a sentence already fits on
            its own tokens.
        deadline: ``time.monotonic()`` value after which it stops with its best so far.

    Returns:
        ``(sentences, relative residual)``: the sentences (``[CLS]`` … ``[SEP]``) and
        ``‖G − Σ α J‖ / ‖G‖`` of the best fit (true sentences ~1e-6).
    """
    lengths, slots = placement.lengths, placement.slots
    sets = _match(lengths, slots, [set(s) - {cls_token_id, sep_token_id} for s in start])
    hyp: list[list[int]] = [[cls_token_id] * n for n in lengths]
    for p in range(1, lengths[0]):
        owners = [i for i, n in enumerate(lengths) if n > p]
        tokens = list(slots[p])
        for i in [i for i in owners if lengths[i] == p + 1]:
            hyp[i][p] = sep_token_id
            if sep_token_id in tokens:
                tokens.remove(sep_token_id)
        rest = [i for i in owners if lengths[i] > p + 1]
        tokens = tokens + tokens[-1:] * max(len(rest) - len(tokens), 0)
        for i, v in zip(rest, _warm(tokens, [sets[i] for i in rest]), strict=False):
            hyp[i][p] = v
    target = grad.detach().double().reshape(-1, 1)
    norm = float(target.norm()) or 1.0
    tmat = target.view(grad.shape)  # [d_out, d]
    # the last CACHE sentences' logit gradients as their factors (outputs [C − 1, n, d_out], inputs [n, d]) in
    # float64 and their inner products with the target [C − 1]: 0.2 MB each for 30 tokens of MiniLM
    cache: OrderedDict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = OrderedDict()
    dots: dict[tuple[tuple[int, ...], tuple[int, ...]], Tensor] = {}  # ⟨J_a, J_b⟩ [C − 1, C − 1]

    def fill(sentences: list[list[int]]) -> None:
        new = list({tuple(s): s for s in sentences if tuple(s) not in cache}.values())
        for s, (d, x) in zip(new, contributions(new) if new else [], strict=True):
            d, x = d.detach().to(target), x.detach().to(target)
            cache[tuple(s)] = (d, x, (d * (x @ tmat.T)).sum((1, 2)))
        for s in sentences:
            cache.move_to_end(tuple(s))
        while len(cache) > max(CACHE, 2 * len(sentences)):
            cache.popitem(last=False)
        if len(dots) > 64 * CACHE * len(lengths):
            dots.clear()

    def columns(s: list[int]) -> Tensor:
        """``[d_out · d, C − 1]``: the sentence's logit gradients multiplied out."""
        if tuple(s) not in cache:
            fill([s])
        d, x = cache[tuple(s)][:2]
        return torch.einsum("cto,ti->coi", d, x).flatten(1).T

    def gram(tries: list[list[list[int]]]) -> Tensor:
        """The residuals of fitting the gradient by each hypothesis of ``tries`` (one move each), read from the
        inner products of the factored gradients (``⟨Σ δ_t x_tᵀ, Σ δ'_u x'_uᵀ⟩ = Σ_{t,u} (δ_t·δ'_u)(x_t·x'_u)``)
        instead of fitting ``d_out · d`` numbers per hypothesis. Equal to the exact fit up to the normal
        equations' round-off (1e-15 at every move taken in a scratch trace of SST-2 dev 24-27): a ranking,
        which :func:`residual` confirms."""
        missing = {}
        for h in tries:
            keys = [tuple(s) for s in h]
            for i, ka in enumerate(keys):
                for kb in keys[i:]:
                    if (ka, kb) not in dots and (kb, ka) not in dots:
                        missing[(ka, kb)] = None
        by_shape: dict[tuple[int, int], list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for ka, kb in missing:
            by_shape.setdefault((len(ka), len(kb)), []).append((ka, kb))
        for pairs in by_shape.values():
            products = factored_inner_products(
                torch.stack([cache[ka][0] for ka, _ in pairs]), torch.stack([cache[ka][1] for ka, _ in pairs]),
                torch.stack([cache[kb][0] for _, kb in pairs]), torch.stack([cache[kb][1] for _, kb in pairs]),
            )
            for pair, v in zip(pairs, products, strict=True):
                dots[pair] = v
        k = next(iter(cache.values()))[2].numel()
        n = len(tries[0]) * k
        a = torch.empty(len(tries), n, n, dtype=target.dtype, device=target.device)
        rhs = torch.empty(len(tries), n, 1, dtype=target.dtype, device=target.device)
        for m, h in enumerate(tries):
            keys = [tuple(s) for s in h]
            for i, ka in enumerate(keys):
                rhs[m, i * k : (i + 1) * k, 0] = cache[ka][2]
                for j in range(i, len(keys)):
                    kb = keys[j]
                    v = dots[(ka, kb)] if (ka, kb) in dots else dots[(kb, ka)].T
                    a[m, i * k : (i + 1) * k, j * k : (j + 1) * k] = v
                    a[m, j * k : (j + 1) * k, i * k : (i + 1) * k] = v.T
        sol = torch.linalg.lstsq(a, rhs).solution
        explained = (rhs * sol).sum((1, 2))
        return (norm**2 - explained).clamp_min(0).sqrt() / norm

    def unexplained(h: list[list[int]]) -> Tensor:
        """What the fit of the gradient by ``h``'s logit gradients leaves: ``[d_out · d, 1]``."""
        m = torch.cat([columns(s) for s in h], 1)
        return target - m @ torch.linalg.lstsq(m, target).solution

    def residual(h: list[list[int]]) -> float:
        return float(unexplained(h).norm()) / norm

    cur = residual(hyp)
    pairs = placement.inputs.to(target)  # [d, m]: the placed pairs' inputs
    shape = grad.shape

    def mismatch(h: list[list[int]]) -> Tensor:
        """Per position, how much of the gradient left over ``h``'s fit sits on the pairs placed there."""
        per_pair = torch.linalg.lstsq(pairs, unexplained(h).view(shape).T).solution.norm(dim=1)  # [m]
        out = torch.zeros(lengths[0], dtype=per_pair.dtype, device=per_pair.device)
        return out.index_add_(0, placement.positions.to(per_pair.device), per_pair).cpu()

    atoms = placement.atoms.to(target)  # [d, |bag| + length + 1]
    atom_of = {v: k for k, v in enumerate(placement.bag)}
    special = {atom_of.get(cls_token_id), atom_of.get(sep_token_id)}
    per_atom = torch.linalg.lstsq(atoms, tmat.T).solution  # [atoms, d_out]: per token Σ δ_t/σ_t
    # [atoms, d]: an input's split over the atoms (a token's column of J_c = d[c]ᵀ x is split[v] @ xᵀ @ d[c])
    split = torch.linalg.lstsq(atoms, torch.eye(atoms.shape[0], dtype=atoms.dtype, device=atoms.device)).solution

    def own_residual(sentence: list[int], own: list[int]) -> float:
        """The relative residual of fitting the gradient's columns of the atoms ``own`` (token atoms of
        ``sentence``) by the sentence's own logit gradients split over the atoms (the peeling certificate)."""
        if tuple(sentence) not in cache:
            fill([sentence])
        d, x = cache[tuple(sentence)][:2]
        a = ((split[own] @ x.T) @ d).flatten(1).T  # [|own| · d_out, C − 1]: J_c = d[c]ᵀ x on those columns
        y = per_atom[own].reshape(-1, 1)
        if not bool(y.any()):
            return 1.0  # no gradient on those columns: nothing to certify with
        return float((y - a @ torch.linalg.lstsq(a, y).solution).norm()) / float(y.norm())

    def one_exact(h: list[list[int]]) -> bool:
        """Whether some sentence of ``h`` fits the gradient on its own tokens (those no other sentence of ``h``
        holds): the peeling certificate, which then takes that sentence out."""
        for i, sentence in enumerate(h):
            others = {v for j, o in enumerate(h) if j != i for v in o}
            own = sorted({atom_of[v] for v in sentence if v not in others and v in atom_of} - special)
            if len(own) >= 2 and own_residual(sentence, own) < own_tol:
                return True
        return False

    # tokens that occur once in the batch (over the placed slots): their columns belong to one sentence each
    counts = Counter(v for p in range(1, lengths[0]) for v in slots[p])
    once = {atom_of[v] for v, c in counts.items() if c == 1 and v in atom_of} - special

    def own_costs(sentences: list[list[int]]) -> list[float]:
        """Per sentence, the log relative residual of predicting its once-occurring tokens' columns (0: none)."""
        fill(sentences)
        owns = [sorted({atom_of[v] for v in s if v in atom_of} & once) for s in sentences]
        return [math.log(max(own_residual(s, own), 1e-300)) if own else 0.0
                for s, own in zip(sentences, owns, strict=True)]

    if by_position and len(lengths) > 1:
        hyp = assign_by_position(
            hyp, own_costs, certified=math.log(own_tol or 1e-4), first=own_tol > 0, deadline=deadline
        )
        cur = residual(hyp)
        if cur < tol or one_exact(hyp):
            return hyp, cur

    def moves_at(p: int) -> Iterator[list[list[int]]]:
        """The moves that change position ``p``, from the current ``hyp`` (read as each move is made)."""
        for i, j in itertools.combinations(range(len(lengths)), 2):
            top = min(lengths[i], lengths[j]) - 1  # both sentences hold words below ``top``
            if p >= top:
                continue
            a, c = hyp[i], hyp[j]
            if a[p] != c[p]:  # swap the two tokens at p
                yield _with(hyp, {i: [*a[:p], c[p], *a[p + 1 :]], j: [*c[:p], a[p], *c[p + 1 :]]})
            for lo, hi in [(1, p), (1, p + 1)] + [(p, q) for q in range(p + 2, min(p + span, top) + 1)] + [
                (q, p + 1) for q in range(max(p - span + 1, 1), p - 1)
            ]:  # swap the runs [lo, hi): prefixes, and runs that start or end at p
                if hi - lo < 2 or (lo, hi) == (1, top):
                    continue
                a, c = hyp[i], hyp[j]
                yield _with(hyp, {i: a[:lo] + c[lo:hi] + a[hi:], j: c[:lo] + a[lo:hi] + c[hi:]})

    def replacements(p: int) -> Iterator[list[list[int]]]:
        """Replace one sentence's token at an uncertain position ``p`` by another candidate there."""
        for i in range(len(lengths)):
            if lengths[i] - 1 <= p:
                continue
            for v in sorted({*placement.alternatives[p], *slots[p]} - {sep_token_id, cls_token_id}):
                if v != hyp[i][p]:
                    yield _with(hyp, {i: [*hyp[i][:p], v, *hyp[i][p + 1 :]]})

    for _ in range(steps):
        if cur < tol or late(deadline):
            break
        order = mismatch(hyp).argsort(descending=True).tolist()
        improved = False
        # the uncertain positions' replacements first (a misplaced token keeps every assignment inexact), then
        # the moves at the positions the residual sits on most
        for group in [itertools.chain(*map(replacements, placement.uncertain)), *(moves_at(p) for p in order)]:
            if late(deadline):
                return hyp, cur
            tries = list(group)
            if not tries:
                continue
            fill([s for h in tries for s in h])
            ranked = gram(tries)
            # the best moves of the group by the inner products, the first that lowers the exact residual
            for k in ranked.argsort()[:VERIFY].tolist():
                if float(ranked[k]) > cur * 1.01 + 1e-9:
                    break
                r = residual(tries[k])
                if r < cur:
                    hyp, cur, improved = tries[k], r, True
                    break
            if improved:
                break
        if improved and cur >= tol and one_exact(hyp):  # the certificate can take that one out: stop here
            break
        if not improved:
            break
    return hyp, cur


def factored_inner_products(outputs_a: Tensor, inputs_a: Tensor, outputs_b: Tensor, inputs_b: Tensor) -> Tensor:
    """Frobenius inner products of linear-weight gradients kept as factors, without multiplying them out.

    ``⟨Σ_t δ_t x_tᵀ, Σ_u δ'_u x'_uᵀ⟩ = Σ_{t,u} (δ_t·δ'_u)(x_t·x'_u)``: for ``P`` pairs of sentences of ``n`` and
    ``m`` tokens this costs ``P·n·m·(d_out + d)`` instead of ``P·d_out·d`` (the per-example gradient-norm
    identity of Goodfellow 2015 and Opacus's ghost clipping, here between two examples).

    Args:
        outputs_a: ``[P, k, n, d_out]`` output gradients of the first sentence of each pair, ``k`` gradients each.
        inputs_a: ``[P, n, d]`` its inputs.
        outputs_b: ``[P, k', m, d_out]``; inputs_b: ``[P, m, d]``, the second sentence's.

    Returns:
        ``[P, k, k']``: ``⟨J_a[c], J_b[c']⟩`` with ``J[c] = outputs[c]ᵀ inputs``.
    """
    xx = inputs_a @ inputs_b.transpose(1, 2)  # [P, n, m]
    dd = torch.einsum("pato,pbso->pabts", outputs_a, outputs_b)  # [P, k, k', n, m]
    return (dd * xx[:, None, None]).sum((3, 4))


def _warm(tokens: list[int], sets: list[set[int]]) -> list[int]:
    """``tokens`` ordered so that as many as possible fall to the sentence whose earlier guess holds them."""
    if not any(sets):
        return tokens
    return list(max(itertools.permutations(tokens), key=lambda o: sum(v in t for v, t in zip(o, sets, strict=False))))


def _match(lengths: list[int], slots: list[list[int]], guesses: list[set[int]]) -> list[set[int]]:
    """Per sentence, the token set of the earlier guess it most likely is (empty sets without guesses)."""
    b = len(lengths)
    guesses = (guesses + [set()] * b)[: max(b, len(guesses))]
    if not any(guesses) or len(guesses) > 5:  # the matching tries every order of the guesses
        return [set() for _ in range(b)]

    def score(order: tuple[int, ...]) -> int:
        sets = [guesses[k] for k in order]
        total = 0
        for p in range(1, lengths[0]):
            owners = [i for i, n in enumerate(lengths) if n > p + 1]
            tokens = slots[p][: len(owners)]
            orders = itertools.permutations(tokens)
            total += max(sum(v in sets[i] for v, i in zip(o, owners, strict=False)) for o in orders)
        return total

    best = max(itertools.permutations(range(len(guesses)), b), key=score)
    return [guesses[k] for k in best]


def _with(hyp: list[list[int]], changes: dict[int, list[int]]) -> list[list[int]]:
    return [changes.get(i, s) for i, s in enumerate(hyp)]


def complete(
    grad: Tensor,
    batch_size: int,
    tables: EmbeddingTables,
    bag: Sequence[int],
    length: int,
    contributions: Callable[[list[list[int]]], list[tuple[Tensor, Tensor]]],
    *,
    cls_token_id: int,
    sep_token_id: int,
    start: Sequence[Sequence[int]] = (),
    segment: int = 0,
    deadline: float | None = None,
) -> list[list[int]] | None:
    """:func:`place_pairs`, then :func:`assignment_descent`: the sentences, or ``None`` when placement gives up.

    The sentences are a proposal: certify them (:func:`~leak_audit.attacks.text.peeling.peel` does).
    """
    if batch_size < 2:
        return None
    placement = place_pairs(
        grad, tables, bag, length, batch_size, cls_token_id=cls_token_id, sep_token_id=sep_token_id, segment=segment
    )
    if placement is None:
        return None
    sentences, _ = assignment_descent(
        grad, placement, contributions, cls_token_id=cls_token_id, sep_token_id=sep_token_id, start=start,
        deadline=deadline,
    )
    return sentences
