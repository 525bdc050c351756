"""Dropout masks of layer 0's inputs: every masked instance ``x = m ⊙ LN(e)/(1 − p)`` of the batch.

In training mode a BERT encoder feeds layer 0 with ``x = m ⊙ y'`` (``y' = LN(E[v] + P[i] + T[s])/(1 − p)``,
``m`` a private Bernoulli mask per token), and every such ``x`` lies in the row space ``S_x`` of the
query/key/value weight gradients, whose rank is the number of tokens in the batch. For a candidate
(token, position) pair the search is a sparse regression: the dropped coordinates are outliers of
``y' ≈ B α`` (``B`` a basis of ``S_x``), and a fit that is exact off them recovers ``m``
(:func:`unmask_inputs`). A pair that occurs in several sentences ([CLS] at position 0 in all ``B``) has
one instance per sentence, each with its own mask; :func:`masked_instances` enumerates them until the
instances found number ``rank(S_x)`` (every token of the batch) or nothing more turns up.

Sources: L1 decoding with outliers (Candès & Tao, "Decoding by linear programming", 2005); reweighted
L1 (Candès, Wakin & Boyd, "Enhancing sparsity by reweighted ℓ1 minimization", 2008) where plain L1 lands
off the mask, which it does once the batch's tokens fill a third of the hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.least_squares import l1_fit_orthonormal

__all__ = ["masked_instances", "unmask_inputs"]


def unmask_inputs(
    y: Tensor,
    basis_x: Tensor,
    p: float,
    weights: Tensor | None = None,
    *,
    tol: float = 1e-5,
    powers: Sequence[float] = (1.0, 0.5, 0.0),
    restarts: int = 2,
    forced: int = 2,
    near: float = 0.05,
    iters: int = 200,
    polish: int = 6,
    reweight: int = 0,
    generator: torch.Generator | None = None,
    deadline: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Recover the dropout mask of layer-0 inputs: the ``x = m ⊙ y/(1 − p)`` that lies in ``S_x``.

    L1 regression (ADMM) of ``y' = y/(1 − p)`` on ``S_x`` with coordinate weights ``|y'_k|^(−power)``: power 1
    counts dropped coordinates whatever their size (plain L1, power 0, prefers dropping small ones and can
    land on a mixture of instances of a repeated token). Rows not exact after one power are retried with
    the next; each fit is polished by greedy single-coordinate flips that shrink the residual (``polish``
    at most).

    Args:
        y: ``[n, d]`` undropped inputs ``LN(E[v] + P[i] + T[s])`` of candidate pairs.
        basis_x: ``[d, r]`` orthonormal basis of the row space of layer 0's query/key/value gradients.
        p: the embedding dropout probability.
        weights: ``[n, d]`` extra L1 weights per coordinate (high: "probably kept"), to steer the search
            towards another instance of a repeated pair.
        tol: residual under which a row is exact (no retry).
        powers: the weighting exponents tried in turn.
        restarts: then, fits with random weights (uniform in [0.25, 1.75], times the count weights).
        forced: then, fits with each of the ``forced`` largest coordinates forced to zero: a dropped
            outlier coordinate (tens of times the mean magnitude) traps every weighting. Only rows with a
            residual below ``near`` are retried (false pairs stay ≥ 0.07 on MiniLM at B = 4, ≥ 0.046 at B = 8).
        reweight: rounds of reweighted L1 before each fit's final solve (Candès, Wakin & Boyd 2008): each
            round divides the weights by ``0.1 +`` the share of each coordinate the last fit left out.
        generator: draws the random weights.
        deadline: ``time.monotonic()`` value after which no further round (power, restart, forced drop)
            starts after the first; rows keep their best fit so far.

    Returns:
        ``(x [n, d], residual [n])``: the masked inputs (float64) and ``‖x − proj(x)‖ / ‖x‖``; about
        1e-7 for a true pair on MiniLM, ≥ 0.046 for a false one (CoLA and SST-2 batches of 8).
    """
    yp = y.double() / (1.0 - p)
    basis = basis_x.double()
    mag = yp.abs().mean(-1, keepdim=True)
    inv = mag / yp.abs().clamp_min(1e-3 * mag)
    x = torch.zeros_like(yp)
    res = torch.full((yp.shape[0],), float("inf"), dtype=torch.float64, device=yp.device)
    fit = {"basis": basis, "iters": iters, "polish": polish, "reweight": reweight}
    for k, power in enumerate([*powers, *([None] * restarts)]):
        todo = (res >= tol).nonzero().flatten()
        if todo.numel() == 0 or (k and late(deadline)):
            break
        if power is None:
            noise = torch.rand(todo.numel(), yp.shape[1], generator=generator, dtype=yp.dtype).to(yp.device)
            w = inv[todo] * (0.25 + 1.5 * noise)
        else:
            w = inv[todo] ** power
        if weights is not None:
            w = w * weights[todo].double()
        xt, rt = _unmask(yp[todo], w, **fit)
        better = rt < res[todo]
        x[todo[better]], res[todo[better]] = xt[better], rt[better]
    for rank in range(forced):
        # a dropped outlier coordinate (MiniLM's LayerNorm outputs have one at ~50× the mean magnitude) is
        # what no weighting recovers: the fit keeps it and spreads the error. Force it dropped.
        todo = ((res >= tol) & (res < near)).nonzero().flatten()
        if todo.numel() == 0 or late(deadline):
            break
        yz = _zero_top(yp[todo], rank)  # its weight becomes the largest (1e3): the fit keeps it at zero
        xt, rt = _unmask(yz, _inverse(yz), **fit)
        better = rt < res[todo]
        x[todo[better]], res[todo[better]] = xt[better], rt[better]
    return x, res


def _inverse(yp: Tensor) -> Tensor:
    """Power-1 weights ``mean|y'| / |y'_k|`` (capped at 1e3): a zeroed coordinate must stay zero."""
    mag = yp.abs().mean(-1, keepdim=True)
    return mag / yp.abs().clamp_min(1e-3 * mag)


def _zero_top(y: Tensor, rank: int) -> Tensor:
    """``y`` ``[n, d]`` with each row's ``rank``-th largest coordinate (by magnitude) set to zero."""
    k = y.abs().argsort(-1, descending=True)[:, rank]
    out = y.clone()
    out[torch.arange(y.shape[0], device=y.device), k] = 0.0
    return out


def _unmask(
    yp: Tensor, weights: Tensor, *, basis: Tensor, iters: int, polish: int, reweight: int = 0
) -> tuple[Tensor, Tensor]:
    w = weights
    for _ in range(reweight):
        fit = l1_fit_orthonormal(basis, yp, w, iters) @ basis.T
        w = weights / (0.1 + ((yp - fit).abs() / yp.abs().clamp_min(1e-12)).clamp(max=1.0))
    fit = l1_fit_orthonormal(basis, yp, w, iters) @ basis.T
    x = torch.where((fit - yp).abs() < fit.abs(), yp, torch.zeros_like(yp))
    # The L1 optimum can sit a coordinate or two off the true mask (it spreads a small residual instead).
    # Greedy exact flips: flipping coordinate k changes ‖P⊥x‖² by 2 δ_k (P⊥x)_k + δ_k² (P⊥)_kk.
    p_diag = 1.0 - basis.square().sum(1)
    rows = torch.arange(x.shape[0], device=x.device)
    for _ in range(polish):
        r = x - (x @ basis) @ basis.T
        f = r.square().sum(1)
        delta = torch.where(x != 0, -yp, yp)
        gain = f[:, None] + 2 * delta * r + delta.square() * p_diag
        k = gain.argmin(1)
        better = gain[rows, k] < f
        if not bool(better.any()):
            break
        x[rows[better], k[better]] += delta[rows[better], k[better]]
    res = (x - (x @ basis) @ basis.T).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30)
    return x, res


class _Found:
    """The exact instances found so far, per candidate pair (at most ``cap`` each, pairwise distinct)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.by_pair: dict[int, list[Tensor]] = {}

    def add(self, j: int, x: Tensor) -> bool:
        old = self.by_pair.setdefault(j, [])
        if len(old) >= self.cap or any(float((x - o).norm()) <= 1e-3 * float(o.norm()) for o in old):
            return False
        old.append(x)
        return True

    def total(self) -> int:
        return sum(len(v) for v in self.by_pair.values())


def masked_instances(
    y: Tensor,
    pairs: Sequence[tuple[int, int]],
    basis_x: Tensor,
    p: float,
    batch_size: int,
    *,
    tol: float = 1e-5,
    sep_token_id: int | None = None,
    near: float = 0.15,
    rows: int = 12,
    short_rows: int = 48,
    chunk: int = 16,
    tries: int = 1,
    generator: torch.Generator | None = None,
    deadline: float | None = None,
) -> tuple[list[int], Tensor, bool]:
    """Every masked instance of each candidate (token, position) pair.

    1. :func:`unmask_inputs` on every pair, then for pairs with an instance, fits steered towards another
       one (coordinates the found instances dropped up-weighted, then the largest coordinates forced to
       zero), one more instance per pair and round, up to ``batch_size`` rounds.
    2. While fewer instances than ``rank(S_x)`` (the batch's token count) are found: pairs still without
       one whose plain fit came within ``near`` get reweighted L1, then with their largest and second
       largest coordinate forced to zero.
    3. Then forced drops: another instance of a found pair drops some coordinate every found instance
       keeps, so fits with one such coordinate zeroed (and held there) land on it. Pairs at positions that
       certainly hold more instances than found come first: position 0 holds ``batch_size``, no position
       fewer than a later one, and when the found ``sep_token_id`` instances number ``batch_size`` (each
       sentence ends with one) the count at every position is known exactly; otherwise the end-of-sentence
       pairs themselves come first. With exact counts only pairs at short positions are searched, one at a
       time, through every coordinate their found instances keep, ``short_rows`` per solve, stopping at the
       first new instance; otherwise ``chunk`` pairs per solve get ``short_rows`` (short) or ``rows``
       coordinates drawn at random, for ``tries`` fruitless visits each. Skipped when more than ``4 B`` are still
       missing: then plain fits failed on first instances (SST-2 at B = 8 fills 234 of MiniLM's 384
       dimensions and lacks 103), which forced drops cannot reach.

    Args:
        y: ``[n, d]`` undropped inputs ``LN(E[v] + P[i] + T[s])`` of the candidate pairs ``pairs`` (``n``
            (token id, position) tuples, positions counted from the first real one).
        basis_x: ``[d, r]`` orthonormal basis of the row space of layer 0's query/key/value gradients.
        p: the embedding dropout probability; ``batch_size``: ``B``, the most instances a pair can have.
        tol: residual under which an instance is exact; ``sep_token_id``: the token every sentence ends with
            (optional; it makes the per-position counts exact); ``near``, ``rows``, ``short_rows``, ``chunk``,
            ``tries``: as in steps 2 and 3; ``generator``: draws random weights and coordinates;
            ``deadline``: ``time.monotonic()`` value after which the search stops.

    Returns:
        ``(pair index per instance, x [m, d] float64, cut)``; ``cut`` when ``deadline`` stopped the search
        early. Instances of a pair are adjacent.
    """
    rank = basis_x.shape[1]
    found = _Found(batch_size)
    res, cut = _steered(y, basis_x, p, tol, found, generator, deadline)
    basis = basis_x.double()
    yp = y.double() / (1.0 - p)
    if found.total() < rank and not cut:
        todo = [j for j in range(len(pairs)) if j not in found.by_pair and float(res[j]) < near]
        for top in (None, 0, 1):  # then with the largest, the second largest coordinate forced to zero
            if not todo or late(deadline):
                break
            target = yp[todo] if top is None else _zero_top(yp[todo], top)
            x2, r2 = _unmask(target, _inverse(target), basis=basis, iters=200, polish=6, reweight=5)
            for j, xj, rj in zip(todo, x2, r2.tolist(), strict=True):
                if rj < tol:
                    found.add(j, xj)
            todo = [j for j in todo if j not in found.by_pair]
        cut = late(deadline)
    if 0 < rank - found.total() <= 4 * batch_size and not cut:
        cut = _forced_drops(yp, pairs, basis, tol, found, batch_size, sep_token_id, rank,
                            rows=rows, short_rows=short_rows, chunk=chunk, tries=tries, generator=generator,
                            deadline=deadline)  # fmt: skip
    owner = sorted(found.by_pair)
    index = [j for j in owner for _ in found.by_pair[j]]
    xs = torch.stack([x for j in owner for x in found.by_pair[j]]) if owner else y.new_zeros(0, y.shape[1]).double()
    return index, xs, cut


def _steered(
    y: Tensor, basis_x: Tensor, p: float, tol: float, found: _Found, generator: torch.Generator | None,
    deadline: float | None,
) -> tuple[Tensor, bool]:
    """Step 1 of :func:`masked_instances`; returns the plain fits' residuals and whether it was cut."""
    x, res = unmask_inputs(y, basis_x, p, tol=tol, generator=generator, deadline=deadline)
    cut = late(deadline)
    owner = (res < tol).nonzero().flatten().tolist()
    for j in owner:
        found.add(j, x[j])
    todo = list(owner)
    # Up-weight the coordinates found instances dropped (another instance probably keeps them); too
    # strong a weight can push the fit off every instance, so escalate only when needed. Last, force
    # the largest coordinates dropped (see ``unmask_inputs``).
    attempts: list[tuple[str, float]] = [("boost", 1.0), ("boost", 4.0), ("boost", 0.25), ("drop", 0), ("drop", 1)]
    for _ in range(found.cap - 1):
        if cut or not todo:
            break
        seen = {j: torch.stack(found.by_pair[j]).eq(0).any(0).double() for j in todo}
        nxt: list[int] = []
        for kind, arg in attempts:
            rest = [j for j in todo if j not in nxt]
            if not rest:
                break
            if late(deadline):
                cut = True
                break
            if kind == "boost":
                weights = 1.0 + arg * torch.stack([seen[j] for j in rest])
                x2, res2 = unmask_inputs(y[rest], basis_x, p, weights=weights, tol=tol, generator=generator,
                                         deadline=deadline)  # fmt: skip
            else:
                x2, res2 = unmask_inputs(_zero_top(y[rest], int(arg)), basis_x, p, tol=tol, restarts=0, forced=0,
                                         generator=generator, deadline=deadline)  # fmt: skip
            for j, xj, rj in zip(rest, x2, res2.tolist(), strict=True):
                if rj < tol and found.add(j, xj):
                    nxt.append(j)
        todo = nxt
    return res, cut


def _short_positions(
    found: _Found, pairs: Sequence[tuple[int, int]], batch_size: int, sep_token_id: int | None
) -> tuple[set[int], bool]:
    """Positions certainly holding more instances than found, and whether those counts are exact.

    Exact when the found ``sep_token_id`` instances number ``batch_size``: then ``B − (sentences ended
    before i)`` instances sit at position ``i``. Otherwise lower bounds: ``B`` at position 0, and no
    position fewer than a later one.
    """
    at: dict[int, int] = {}
    sep_at: dict[int, int] = {}
    for j, xs in found.by_pair.items():
        token, i = pairs[j]
        at[i] = at.get(i, 0) + len(xs)
        if token == sep_token_id:
            sep_at[i] = sep_at.get(i, 0) + len(xs)
    length = max(at, default=-1) + 1
    need = [0] * length
    exact = sep_token_id is not None and sum(sep_at.values()) == batch_size
    if exact:
        alive = batch_size  # sentences still running at position i
        for i in range(length):
            need[i] = alive
            alive -= sep_at.get(i, 0)
    else:
        run = 0
        for i in reversed(range(length)):
            run = max(run, at.get(i, 0))
            need[i] = run
        if length:
            need[0] = max(need[0], batch_size)
    return {i for i in range(length) if at.get(i, 0) < need[i]}, exact


def _forced_drops(
    yp: Tensor, pairs: Sequence[tuple[int, int]], basis: Tensor, tol: float, found: _Found, batch_size: int,
    sep_token_id: int | None, rank: int, *, rows: int, short_rows: int, chunk: int, tries: int,
    generator: torch.Generator | None, deadline: float | None,
) -> bool:
    """Step 3 of :func:`masked_instances`; returns whether ``deadline`` cut it."""
    visits = dict.fromkeys(found.by_pair, 0)
    left: dict[int, list[int]] = {}  # exact counts: coordinates of a pair not yet zeroed, in random order
    while found.total() < rank:
        short, exact = _short_positions(found, pairs, batch_size, sep_token_id)
        positions: dict[int, set[int]] = {}
        for j in found.by_pair:
            positions.setdefault(pairs[j][0], set()).add(pairs[j][1])

        def urgent(j: int) -> bool:
            return pairs[j][1] in short or (not exact and pairs[j][0] == sep_token_id)

        def kept(j: int) -> Tensor:
            cols = torch.stack(found.by_pair[j]).ne(0).all(0).nonzero().flatten()
            return cols[torch.randperm(cols.numel(), generator=generator)]

        if exact:  # only pairs at short positions can have more: each tries every coordinate, short_rows at a time
            queue = [j for j in found.by_pair if urgent(j) and len(found.by_pair[j]) < batch_size and left.get(j) != []]
        else:
            queue = [j for j in found.by_pair if len(found.by_pair[j]) < batch_size and visits[j] < tries]
        if not queue:
            return False
        if late(deadline):
            return True
        queue.sort(key=lambda j: (not urgent(j), -len(found.by_pair[j]), -len(positions[pairs[j][0]])))
        plan: list[tuple[int, list[int]]] = []
        if exact:
            j = queue[0]
            if j not in left:
                left[j] = kept(j).tolist()
            plan.append((j, left[j][:short_rows]))
            left[j] = left[j][short_rows:]
        else:
            for j in queue[:chunk]:
                visits[j] += 1
                plan.append((j, kept(j)[: short_rows if urgent(j) else rows].tolist()))
        index = [j for j, cols in plan for _ in cols]
        if not index:
            continue
        targets = yp[index].clone()
        targets[torch.arange(len(index)), torch.tensor([c for _, cols in plan for c in cols], dtype=torch.long)] = 0.0
        x2, r2 = _unmask(targets, _inverse(targets), basis=basis, iters=200, polish=6, reweight=2)
        for j, xj, rj in zip(index, x2, r2.tolist(), strict=True):
            if rj < tol and found.add(j, xj):
                visits[j] = 0  # found one: it may have more
                left.pop(j, None)
    return False
