"""Pair pursuit: whole sentences, in order, from layer 0's query gradient at ``B > 1``.

:mod:`~leak_audit.attacks.text.span_cluster` splits layer 0's query weight gradient over the additive atoms
of the batch's tokens and positions, ``H = ∂L/∂W_q · A (AᵀA)⁻¹`` (fact 1 there), and reads only the token
columns. The position columns carry the word order: an input ``LN(E[v] + P[i] + T) = A a_t`` has
``a_t = (e_v + e_i)/σ_t + e_β``, so the column of position ``i`` is ``Σ_{t at i} δq_t / σ_t``, the sum of the
columns of the tokens found at ``i``. For a token that occurs at one position only, its column is exactly
one summand there, so a least-squares fit of the position columns on the token columns
(:func:`pair_candidates`) places it (measured on MiniLM, CoLA B = 4: 93% of such tokens at their top
coefficient). Tokens that occur at several positions (``the``, ``.``, ``[SEP]``) split their column and
get fractional coefficients; they stay candidates wherever the fit gives them ``> tau``, and ``[SEP]``
everywhere.

Then, per *anchor* token (each non-structural token of the bag), a pursuit over the candidate (token,
position) pairs rebuilds the anchor's own sentence. The anchor's query gradient lies, in every head ``h``,
in ``span{k^h(w, j) − k^h([CLS], 0)}`` over its sentence's pairs (softmax gradients sum to zero; fact 2 of
span_cluster, with pairs instead of atoms: ``n − 1`` dimensions per head). A group order-recursive matching
pursuit (ORMP, one group per pair across the heads, at most one pair per position) picks pairs until that
residual vanishes, the sentence is cut at its ``[SEP]``, and single-position swaps polish it while they lower
the residual. An exact residual (``< tol``) names the sentence, its order, and the anchor as a token of
that sentence alone; these anchors are the *members* the peeling certificate reads
(:class:`~leak_audit.attacks.text.peeling.Proposal`).

:class:`~leak_audit.attacks.text.span_cluster.SpanCluster` proposes these sentences to the peeling loop
before its clustering. Measured on the pretrained MiniLM, layer 0's query gradient alone (``leak-audit
bench text --data cola_dev.tsv --n 64 --batch-sizes 4 --views
linear:bert.encoder.layer.0.attention.self.query --attacks span_cluster --dropout off --max-seconds 30``):
all 64 CoLA sentences exact at B = 4 (before: 19), 6.2 s per batch. Limits: the test needs ``n − 1 < d_h``
pairs (sentences under ~31 tokens on MiniLM); the search is greedy, then a beam, so an anchor may stay
open (it then proposes nothing); a true pair the candidate fits miss makes its sentence unreachable until
peeling has removed the sentences that share its tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.text.query_columns import additive_atoms, token_query_gradients
from leak_audit.models import EmbeddingTables

__all__ = ["PairPursuitResult", "pair_candidates", "pair_pursuit"]


@dataclass
class PairPursuitResult:
    """Output of :func:`pair_pursuit`.

    Attributes:
        sequences: sentences whose key span explained at least one anchor exactly, most anchors first
            (``[CLS]`` … ``[SEP]``, in order).
        members: per sentence, the anchors it explained (tokens of that sentence alone).
        residuals: per sentence, the smallest relative squared residual of its anchors.
        pairs: candidate (token, position) pairs searched; cut_short: the deadline stopped the anchors.
    """

    sequences: list[list[int]] = field(default_factory=list)
    members: list[list[int]] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    pairs: int = 0
    cut_short: bool = False


def pair_candidates(
    h: Tensor,
    bag: Sequence[int],
    length: int,
    *,
    cls_token_id: int | None,
    sep_token_id: int | None,
    tau: float = 0.1,
    second_stage: bool = True,
) -> list[tuple[int, int]]:
    """Candidate (token, position) pairs for positions ``1 .. length − 1`` from the split columns ``h``.

    Args:
        h: ``[d_out, |bag| + length + 1]`` columns from
            :func:`~leak_audit.attacks.text.span_cluster.token_query_gradients` on
            :func:`~leak_audit.attacks.text.span_cluster.additive_atoms` ``(bag, length)``.
        bag: the batch's tokens (the atoms' order); length: the longest sentence's length (positions).
        cls_token_id: left out of the fit (it sits at position 0 only, and its large column would absorb
            the rest); sep_token_id: a candidate at every position.
        tau: a token is a candidate at position ``i`` when its fitted coefficient there exceeds ``tau``
            (1 for a token whose occurrences all sit at ``i``), in the fit of the position columns on the
            token columns or in the second stage's fit of the multi-position tokens on what is left.
        second_stage: run the second stage (measured on CoLA B = 4, 16 batches: true pairs missed 38 → 19
            of 681, candidates 1416 → 1877).

    Returns:
        Sorted ``(token, position)`` pairs.
    """
    nb = len(bag)
    keep = [j for j, v in enumerate(bag) if v != cls_token_id]
    pairs: set[tuple[int, int]] = set()
    if keep:
        tok, pos = h[:, keep], h[:, nb : nb + length]
        z = torch.linalg.lstsq(tok, pos).solution  # [|keep|, length]
        rows, cols = (z[:, 1:] > tau).nonzero(as_tuple=True)
        pairs = {(int(bag[keep[r]]), int(c) + 1) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)}
        # second stage: tokens placed whole (one coefficient ~1, the rest ~0) are taken out of the position
        # columns; what is left at each open position is the parts of multi-position tokens, and each such
        # token's column is the sum of its parts: a fit of those columns on the remainders places them.
        big = z[:, 1:].abs() > 0.2
        whole = [(r, int(big[r].nonzero()[0]) + 1) for r in range(len(keep)) if int(big[r].sum()) == 1]
        whole = [(r, i) for r, i in whole if abs(float(z[r, i]) - 1) < 0.15]
        rest = pos.clone()
        for r, i in whole:
            rest[:, i] -= tok[:, r]
        ratio = rest.norm(dim=0) / pos.norm(dim=0).clamp_min(1e-300)
        open_ = [i for i in range(1, length) if float(ratio[i]) > 0.05]
        split = sorted(set(range(len(keep))) - {r for r, _ in whole})
        if second_stage and open_ and split:
            y = torch.linalg.lstsq(rest[:, open_], tok[:, split]).solution  # [|open|, |split|]
            for a, b in (y > tau).nonzero().tolist():
                pairs.add((int(bag[keep[split[b]]]), open_[a]))
    if sep_token_id is not None:
        pairs |= {(int(sep_token_id), i) for i in range(1, length)}
    return sorted(pairs)


def _ormp(target: Tensor, keys: Tensor, positions: Tensor, tol: float, beam: int = 1) -> list[list[int]]:
    """Group ORMP with a beam: pair sets (rows of ``keys`` ``[P, H, d_h]``, one per position) explaining
    ``target`` ``[H, d_h]``. Each step extends every kept set by each of its ``beam`` best pairs (the largest
    drops of the per-head residual) and keeps the ``beam`` sets with the smallest residual. Returns the kept
    sets, best first; the first is exact (``< tol`` relative) when any set closed. ``beam = 1`` is ORMP.

    A pair's drop is ``Σ_h ⟨k_h, r_h⟩² / ‖(I − Q_h Q_hᵀ) k_h‖²`` (``r ⟂ Q``): the squared projections of every
    key on the kept sets' orthonormal bases ``Q`` are accumulated one column at a time, so no step rewrites
    the ``[P, H, d_h]`` keys (on one SST-2 batch 11.5 s → 3.6 s: benchmarks/README.md, "A slower machine, and
    the speed-ups of 2026-12-06"). A key within ``1e-12`` (relative) of a kept span adds nothing and is never
    picked."""
    norm = float(target.square().sum())
    kh = keys.permute(1, 0, 2).contiguous()  # [H, P, d_h]
    sq = kh.square().sum(2)  # [H, P]
    floor = 1e-12 * sq
    # a state: (picked, Q columns [H, d_h] each, residual [H, d_h], squared projections [H, P], blocked [P])
    State = tuple[list[int], list[Tensor], Tensor, Tensor, Tensor]
    states: list[State] = [
        ([], [], target.clone(), torch.zeros_like(sq), torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device))
    ]
    for _ in range(min(int(positions.unique().numel()), keys.shape[2] - 1)):
        children: list[tuple[float, int, int]] = []
        for k, (_, _, r, proj, blocked) in enumerate(states):
            left = sq - proj
            dots = torch.bmm(kh, r[..., None])[..., 0]  # [H, P]
            gain = torch.where(left > floor, dots.square() / left.clamp_min(1e-300), 0.0).sum(0)
            gain[blocked] = -1.0
            top = gain.topk(min(beam, int((~blocked).sum())))
            rest = float(r.square().sum())
            children += [(rest - float(g), k, int(p)) for g, p in zip(top.values, top.indices, strict=True)]
        if not children:
            break
        children.sort()
        seen: set[frozenset[int]] = set()
        nxt: list[State] = []
        for _, k, p in children:
            picked, basis, r, proj, blocked = states[k]
            key = frozenset([*picked, p])
            if key in seen:
                continue
            seen.add(key)
            q = keys[p]
            for b in basis:  # Gram-Schmidt against the kept columns, per head
                q = q - (q * b).sum(1, keepdim=True) * b
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
            nxt.append((
                [*picked, p], [*basis, q], r - (r * q).sum(1, keepdim=True) * q,
                proj + torch.bmm(kh, q[..., None])[..., 0].square(), blocked | (positions == positions[p]),
            ))
            if len(nxt) == beam:
                break
        states = nxt
        if float(states[0][2].square().sum()) < tol * norm:
            break
    return [picked for picked, *_ in states]


def _residuals(target: Tensor, keys: Tensor) -> Tensor:
    """Relative squared residual of ``target`` ``[H, d_h]`` outside each head's span of ``keys`` ``[..., s, H, d_h]``."""
    d = keys.movedim(-3, -1)  # [..., H, d_h, s]
    t = target.expand(*d.shape[:-1])[..., None]
    sol = torch.linalg.lstsq(d, t).solution
    r = t[..., 0] - (d @ sol)[..., 0]
    return r.square().sum((-2, -1)) / target.square().sum().clamp_min(1e-300)


def _swap_residuals(target: Tensor, others: Tensor, swaps: Tensor) -> Tensor:
    """:func:`_residuals` of ``others`` ``[s, H, d_h]`` plus each one of ``swaps`` ``[c, H, d_h]``: ``[c]``, by one
    QR of ``others`` per head and a rank-one update per swap."""
    q = torch.linalg.qr(others.permute(1, 2, 0)).Q  # [H, d_h, s]
    r0 = target - (q @ (q.transpose(1, 2) @ target[..., None]))[..., 0]
    left = swaps - torch.einsum("hds,hs...->...hd", q, torch.einsum("hds,chd->hsc", q, swaps))
    drop = torch.einsum("chd,hd->ch", left, r0).square() / left.square().sum(2).clamp_min(1e-300)
    return (r0.square().sum() - drop.sum(1)) / target.square().sum().clamp_min(1e-300)


def _take(t: Tensor, index: Sequence[int]) -> Tensor:
    """Rows ``index`` of ``t`` (an empty list indexes as ``long``, not ``float``)."""
    return t[torch.as_tensor(list(index), dtype=torch.long, device=t.device)]


def _residual(target: Tensor, keys: Tensor) -> float:
    return float(_residuals(target, keys))


def _close(
    target: Tensor, picks: list[int], keys: Tensor, tokens: Tensor, positions: Tensor, at: dict[int, list[int]],
    sep_token_id: int, tol: float, sweeps: int,
) -> tuple[list[int], float]:
    """Cut a pursuit's picks at their ``[SEP]``, fill gaps, polish by single-position swaps while the residual
    of ``target`` drops, and end at the first ``[SEP]`` that keeps it exact. Returns ``(pairs of positions
    1 .. n − 1, residual)``, or ``([], inf)`` when the result is not an exact ``… [SEP]`` sentence."""
    picked = {int(positions[p]): p for p in picks}
    if not picked:
        return [], float("inf")
    ends = [i for i, p in picked.items() if int(tokens[p]) == sep_token_id]
    n = (min(ends) if ends else max(picked)) + 1
    if any(i not in at for i in range(1, n)):
        return [], float("inf")
    chosen = [picked.get(i, at[i][0]) for i in range(1, n)]
    best = _residual(target, _take(keys, chosen))
    for _ in range(sweeps if best >= tol * 1e-2 else 0):
        improved = False
        for k in range(len(chosen)):
            swaps = [p for p in at[k + 1] if p != chosen[k]]
            if not swaps:
                continue
            res = _swap_residuals(target, _take(keys, chosen[:k] + chosen[k + 1 :]), _take(keys, swaps))
            i = int(res.argmin())
            if float(res[i]) < 0.999 * best:
                best, improved = float(res[i]), True
                chosen = chosen[:k] + [swaps[i]] + chosen[k + 1 :]
        if not improved or best < tol * 1e-2:
            break
    if sweeps:
        best = _residual(target, _take(keys, chosen))  # the swaps' rank-one updates, checked by least squares
    for k, p in enumerate(chosen[:-1]):  # a superset of the pairs passes too: end at the first [SEP]
        if int(tokens[p]) == sep_token_id:
            res = _residual(target, _take(keys, chosen[: k + 1]))
            if res < tol:
                chosen, best = chosen[: k + 1], res
            break
    ok = best < tol and int(tokens[chosen[-1]]) == sep_token_id
    return (chosen, best) if ok else ([], float("inf"))


def pair_pursuit(
    grad: Tensor,
    key_weight: Tensor,
    heads: int,
    tables: EmbeddingTables,
    bag: Sequence[int],
    length: int,
    *,
    segment: int = 0,
    cls_token_id: int,
    sep_token_id: int,
    structural: Collection[int] = (),
    tau: float = 0.1,
    tol: float = 1e-8,
    sweeps: int = 6,
    beam: int = 1,
    beam_anchors: int = 8,
    deadline: float | None = None,
) -> PairPursuitResult:
    """Sentences of a batch, in order, from layer 0's query weight gradient (module docstring).

    Args:
        grad: ``[d, d]`` exact (dropout-off) gradient of layer 0's ``attention.self.query`` weight.
        key_weight: ``[d, d]`` layer 0's key weight; heads: attention heads (``d_h = d / heads``).
        tables: embedding tables and LayerNorm at the audited step; segment: the batch's token type.
        bag: the batch's tokens (e.g. the union of the span check's candidates); length: its longest sentence.
        cls_token_id, sep_token_id: the sentence delimiters (every sentence is ``[CLS] … [SEP]``).
        structural: tokens never used as anchors (besides the delimiters).
        tau: candidate threshold of :func:`pair_candidates`.
        tol: an anchor's sentence is accepted below this relative squared residual (true sentences ≤ 1e-13
            on MiniLM in float64; MiniLM's float32 gradients keep that).
        sweeps: rounds of single-position swaps after the pursuit.
        beam: when the greedy pursuit (ORMP) leaves anchors open, a beam search of this width tries again
            (1: no second try) on the ``beam_anchors`` of them the greedy pursuit came closest on (a beam
            costs ~1-2 s per anchor at B = 4-16 on MiniLM, 2 cores).
        deadline: ``time.monotonic()`` value after which no further anchor starts (``cut_short`` is then set).

    Returns:
        A :class:`PairPursuitResult` (empty when no anchor closed).
    """
    if length < 2 or not bag:
        return PairPursuitResult()
    atoms = additive_atoms(tables, bag, length, segment)
    h = token_query_gradients(grad, atoms)
    base = pair_candidates(h, bag, length, cls_token_id=cls_token_id, sep_token_id=sep_token_id, tau=tau, second_stage=False)
    pairs = pair_candidates(h, bag, length, cls_token_id=cls_token_id, sep_token_id=sep_token_id, tau=tau)
    index = {pr: k for k, pr in enumerate(pairs)}
    first = torch.tensor([index[pr] for pr in base], dtype=torch.long, device=h.device)
    dev = h.device
    tokens = torch.tensor([v for v, _ in pairs], dtype=torch.long, device=dev)
    positions = torch.tensor([i for _, i in pairs], dtype=torch.long, device=dev)
    wk = key_weight.detach().double().to(dev)
    dh = wk.shape[0] // heads
    ref = tables.pair_inputs(torch.tensor([cls_token_id], device=dev), torch.tensor([0], device=dev), segment) @ wk.T
    keys = (tables.pair_inputs(tokens, positions, segment) @ wk.T - ref).view(-1, heads, dh)
    at: dict[int, list[int]] = {}
    for p, i in enumerate(positions.tolist()):
        at.setdefault(i, []).append(p)
    skip = {int(cls_token_id), int(sep_token_id), *map(int, structural)}
    found: dict[tuple[int, ...], tuple[list[int], list[int], float]] = {}  # sentence -> (pairs, anchors, res)
    out = PairPursuitResult(pairs=len(pairs))
    args = (keys, tokens, positions, at, sep_token_id, tol, sweeps)

    def record(v: int, chosen: list[int], best: float) -> None:
        seq = (int(cls_token_id), *(int(tokens[p]) for p in chosen))
        _, anchors, res0 = found.get(seq, (chosen, [], float("inf")))
        found[seq] = (chosen, [*anchors, int(v)], min(res0, best))

    def known(v: int, target: Tensor) -> bool:
        """The anchor lies in a sentence already found: one more member, no search."""
        for seq, (chosen, anchors, res0) in found.items():
            if v in seq and _residual(target, _take(keys, chosen)) < tol:
                found[seq] = (chosen, [*anchors, int(v)], res0)
                return True
        return False

    open_: list[tuple[float, int, Tensor]] = []  # anchors the greedy pursuit left open, by its residual
    for j, v in enumerate(bag):
        if v in skip:
            continue
        if late(deadline):
            out.cut_short = True
            break
        target = h[:, j].view(heads, dh)
        if known(v, target):
            continue
        picks = _take(first, _ormp(target, keys[first], positions[first], tol * 1e-2)[0]).tolist()
        chosen, best = _close(target, picks, *args)
        if not chosen and len(first) < len(pairs):  # the pairs of the second stage too
            picks = _ormp(target, keys, positions, tol * 1e-2)[0]
            chosen, best = _close(target, picks, *args)
        if chosen:
            record(v, chosen, best)
        elif picks:
            open_.append((_residual(target, _take(keys, picks)), v, target))
    for _, v, target in sorted(open_, key=lambda e: e[0])[: beam_anchors if beam > 1 else 0]:
        if late(deadline):
            out.cut_short = True
            break
        if known(v, target):
            continue
        for picks in _ormp(target, keys, positions, tol * 1e-2, beam=beam):
            chosen, best = _close(target, picks, *args)
            if chosen:
                record(v, chosen, best)
                break
    for seq, (_, anchors, res) in sorted(found.items(), key=lambda kv: -len(kv[1][1])):
        out.sequences.append(list(seq))
        out.members.append(anchors)
        out.residuals.append(res)
    return out
