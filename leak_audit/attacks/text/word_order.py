"""Word order of one sentence from its members' layer-0 query gradients (the last stage of span clustering).

:mod:`~leak_audit.attacks.text.span_cluster` groups a batch's tokens into sentences; this module orders one
sentence's tokens. A member token's per-token query gradient ``s_v^h`` (head ``h``) lies in
``span{k^h(w, i) − k^h([CLS], 0)}`` over the sentence's (token, position) pairs, so the order is the
placement of the tokens on positions whose keys explain every member exactly: scored by a group lasso
(:func:`~leak_audit.attacks.lasso.group_lasso`, one group per pair across members and heads), placed by a
linear assignment (``scipy.optimize.linear_sum_assignment``), then polished by steepest descent over swaps
under the members' exact least-squares residual. Each descent step ranks all its moves from one QR of the
current order (:func:`move_scores`, rank-two updates) and recomputes the best :data:`VERIFY` exactly: layer 0's
query of MiniLM, CoLA B = 16, ``span_cluster`` 168 → 52 s a batch with the same sentences (benchmarks/README.md,
"One QR per word-order step").
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import NamedTuple

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.lasso import group_lasso

__all__ = [
    "EXACT_ORDER",
    "FIRST_EXTRA",
    "ORDER_CHUNK",
    "RESTARTS",
    "SECOND_BELOW",
    "VERIFY",
    "OrderedSentence",
    "move_scores",
    "order_sentence",
]


class OrderedSentence(NamedTuple):
    """Result of :func:`order_sentence`.

    Attributes:
        sequence: the ordered sentence (token ids, ``[CLS]`` first and ``[SEP]`` last when known).
        residual: the members' largest relative squared residual at that order (``nan`` without members or
            when unsearched).
        cut: the deadline cut the search short.
    """

    sequence: list[int]
    residual: float
    cut: bool


ORDER_CHUNK = 64
"""Placements :func:`order_sentence` scores per batched least-squares call (the deadline is checked between
calls): a sweep over a 50-token sentence's ~1300 swaps took 7 s in one call."""


FIRST_EXTRA = 2
"""Extra copies :func:`order_sentence` tries first; more only when no order is exact and one is close
(:data:`SECOND_BELOW`)."""


SECOND_BELOW = 1e-2
""":func:`order_sentence` searches again with more copies only when its first search came this close (the members'
largest relative squared residual). Measured on MiniLM in scratch traces: 8e-4 to 6e-3 for the 9 of CoLA's first 64
dev sentences that repeat three or four words (each alone), 1e-3 to 6e-2 for the clusters of CoLA dev 0-15 at B = 16
that mix sentences (14 of 20 of them skipped)."""


RESTARTS = 6
"""Perturbed restarts :func:`order_sentence` makes by default while no order is exact."""


EXACT_ORDER = 1e-10
"""An order is exact below this relative squared residual (true sentences ~1e-13 on MiniLM in float64)."""


VERIFY = 8
"""Moves per descent step whose residuals are recomputed exactly after :func:`move_scores` ranked them all."""


def move_scores(d: Tensor, y: Tensor, slots: Tensor, new: Tensor) -> Tensor | None:
    """Members' largest relative squared residual after replacing two atoms, for many moves from one QR.

    With ``D = QR`` (per head) and ``W = D (DᵀD)⁻¹ = Q R⁻ᵀ`` (the dual vectors: ``W_sᵀ d_k = δ_sk``), removing
    the columns ``S`` turns the residual ``E = (I − QQᵀ) Y`` into ``E_S = E + W_S (W_SᵀW_S)⁻¹ W_Sᵀ Y`` and the
    projector into ``P_S = (I − QQᵀ) + W_S (W_SᵀW_S)⁻¹ W_Sᵀ``; adding the new columns ``U`` leaves
    ``‖E_S‖² − cᵀ (UᵀP_S U)⁻¹ c`` with ``c = (P_S U)ᵀ E_S`` (block Gram–Schmidt). Each move costs a few
    ``d_h × 2`` products instead of a least-squares solve: for *ranking* moves (differences of squares lose
    digits near zero; the caller recomputes the best few exactly).

    Args:
        d: ``[H, d_h, n]`` the current atoms per head; y: ``[H, d_h, m]`` the members' query gradients.
        slots: ``[M, 2]`` the two replaced columns of each move (distinct).
        new: ``[M, H, d_h, 2]`` their replacements (a column may be replaced by itself).

    Returns:
        ``[M]`` the largest relative squared residual over members, or ``None`` when ``D`` is rank-deficient
        (more atoms than ``d_h``, or a QR pivot below ``1e-10`` of the largest).
    """
    h, dh, n = d.shape
    if n > dh:
        return None
    q, r = torch.linalg.qr(d)
    diag = r.diagonal(dim1=-2, dim2=-1).abs()
    if bool((diag <= 1e-10 * diag.max(-1, keepdim=True).values).any()):
        return None
    eye = torch.eye(n, dtype=d.dtype, device=d.device).expand(h, n, n)
    w = q @ torch.linalg.solve_triangular(r, eye, upper=True).transpose(-1, -2)  # H x d_h x n
    e = y - q @ (q.transpose(-1, -2) @ y)  # H x d_h x m
    x = w.transpose(-1, -2) @ y  # H x n x m: W_sᵀ Y are the least-squares coefficients
    moves, m = slots.shape[0], y.shape[-1]
    # E ⟂ span(D) ∋ W_S, so ‖E_S‖² = ‖E‖² + X_Sᵀ G⁻¹ X_S, (P_S U)ᵀ E_S = UᵀE + UᵀW_S G⁻¹ X_S and
    # UᵀP_S U = U_⟂ᵀU_⟂ + UᵀW_S G⁻¹ W_SᵀU (G = W_SᵀW_S): only 2 x 2 and 2 x m blocks per move and head
    g = (w.transpose(-1, -2) @ w)[:, slots[:, :, None], slots[:, None, :]]  # H x M x 2 x 2
    gi = _inverse2(g)
    xs = x[:, slots]  # H x M x 2 x m
    t = _mul2(gi, xs)
    norms = e.square().sum(1)[:, None] + (xs * t).sum(-2)  # H x M x m
    u = new.permute(1, 0, 3, 2).reshape(h, 2 * moves, dh)  # H x 2M x d_h
    ue = (u @ e).view(h, moves, 2, m)
    uw = torch.gather((u @ w).view(h, moves, 2, n), 3, slots[None, :, None, :].expand(h, moves, 2, 2))  # H x M x 2 x 2
    c = ue + _mul2(uw, t)
    perp = (u - (u @ q) @ q.transpose(-1, -2)).view(h, moves, 2, dh)
    a = (perp[..., :, None, :] * perp[..., None, :, :]).sum(-1) + _mul2(uw, _mul2(gi, uw.transpose(-1, -2)))
    a = a + 1e-14 * a.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * torch.eye(2, dtype=d.dtype, device=d.device)
    left = norms - (c * _mul2(_inverse2(a), c)).sum(-2)  # H x M x m
    return (left.sum(0) / y.square().sum((0, 1)).clamp_min(1e-300)).max(1).values


def _mul2(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``[..., 2, 2]`` and ``[..., 2, l]`` (elementwise: a batched matmul of tiny blocks costs more)."""
    return a[..., :, 0, None] * b[..., 0, None, :] + a[..., :, 1, None] * b[..., 1, None, :]


def _inverse2(a: Tensor) -> Tensor:
    """Inverses of ``[..., 2, 2]`` matrices in closed form (a batched LAPACK solve of 2 x 2 systems costs more)."""
    det = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    adj = torch.stack([torch.stack([a[..., 1, 1], -a[..., 0, 1]], -1), torch.stack([-a[..., 1, 0], a[..., 0, 0]], -1)], -2)
    return adj / det[..., None, None]


def order_sentence(
    tokens: Collection[int],
    members: Tensor,
    key_inputs: Callable[[Tensor, Tensor], Tensor],
    heads: int,
    *,
    cls_token_id: int | None,
    sep_token_id: int | None,
    sweeps: int = 40,
    extra: int = 4,
    shortest: int = 0,
    restarts: int = RESTARTS,
    exact: float = EXACT_ORDER,
    generator: torch.Generator | None = None,
    deadline: float | None = None,
) -> OrderedSentence:
    """Word order of one sentence from its members' query gradients.

    Each member's ``s_v^h`` lies in ``span{k^h(w, i) − k^h([CLS], 0)}`` over the sentence's (token,
    position) pairs (fact 2 of :mod:`~leak_audit.attacks.text.span_cluster` with the exact pairs: ``n − 1``
    dimensions per head). Pair scores come from a
    group lasso of all members at once over every (token, position) pair of the set (one group per pair
    across members and heads), positions from a linear assignment of those scores (``[CLS]`` first,
    ``[SEP]`` last), then pairwise swaps polish the order while they lower the members' exact residual.
    When no order is exact, tokens of other sentences in the set (clustering leaks) tend to be placed
    after the sentence's own: the first prefix whose residual is exact is returned instead.

    Args:
        tokens: the sentence's tokens (each once); members: ``[m, H, d_h]`` query gradients of tokens that
            occur once in the batch (may be empty: the order then follows the scores only).
        key_inputs: ``(tokens [k], positions [k]) -> [k, d]`` layer-0 keys (without bias).
        sweeps: steepest-descent steps per start; extra: copies a token may add inside the sentence
            (lengths ``|tokens| .. |tokens| + 2`` are tried, then, when no order is exact but one is within
            :data:`SECOND_BELOW`, a second search up to ``|tokens| + extra``, as long as the orders stay testable
            (``d_h − 2`` atoms per head): 9 of CoLA's first 64 dev sentences repeat three or four words, e.g. "The
            more you would want, the less you would eat."); shortest: with ``shortest > 0``, one search over the
            lengths ``|tokens| + shortest .. |tokens| + extra`` only (the second search); restarts: perturbed
            restarts while the residual is above ``exact``; generator: the perturbations; deadline:
            ``time.monotonic()`` value after which the search returns its best so far (already past at the start:
            the tokens in id order, unsearched).

    Returns:
        An :class:`OrderedSentence`: the ordered sentence, the members' largest relative squared residual
        (``nan`` without members) and whether the deadline cut the search short.
    """
    if shortest == 0 and extra > FIRST_EXTRA:

        def search(most: int, first: int) -> OrderedSentence:
            return order_sentence(
                tokens, members, key_inputs, heads, cls_token_id=cls_token_id, sep_token_id=sep_token_id,
                sweeps=sweeps, extra=most, shortest=first, restarts=restarts, exact=exact, generator=generator,
                deadline=deadline,
            )

        found = search(FIRST_EXTRA, 0)
        size = len(set(tokens) - {cls_token_id, sep_token_id})
        # the longer orders stay testable: fewer atoms per head than its d_h dimensions, with a margin of 2
        most = min(extra, members.shape[-1] - 2 - (sep_token_id is not None) - size)
        if most <= FIRST_EXTRA or not exact <= found.residual < SECOND_BELOW or late(deadline):
            return found
        # none exact, one close: more repeated words (a second search, so the first stays what it was)
        more = search(most, FIRST_EXTRA + 1)
        if more.residual < 0.5 * found.residual:
            return OrderedSentence(more.sequence, more.residual, found.cut or more.cut)
        return OrderedSentence(found.sequence, found.residual, found.cut or more.cut)

    from scipy.optimize import linear_sum_assignment

    middle = sorted(t for t in tokens if t not in (cls_token_id, sep_token_id))
    head = [cls_token_id] if cls_token_id is not None else []
    tail = [sep_token_id] if sep_token_id is not None else []
    if not middle:
        return OrderedSentence(head + tail, float("nan"), False)
    if members.shape[0] and late(deadline):
        return OrderedSentence(head + middle + tail, float("nan"), True)  # out of time: unordered (by id), no search
    start = len(head)
    most = len(middle) + extra
    slots = list(range(start, start + most))
    tok = torch.tensor([t for t in middle for _ in slots], dtype=torch.long)
    pos = torch.tensor([p for _ in middle for p in slots], dtype=torch.long)
    k_pairs = key_inputs(tok, pos)
    dh = k_pairs.shape[1] // heads
    m = members.shape[0]
    rhs = members.permute(1, 2, 0)  # H x d_h x m

    def fixed(count: int) -> Tensor:
        n = start + count + len(tail)
        ft = torch.tensor(head + tail, dtype=torch.long)
        fp = torch.tensor(([0] if head else []) + ([n - 1] if tail else []), dtype=torch.long)
        return key_inputs(ft, fp) if ft.numel() else k_pairs[:0]

    ref = fixed(len(middle))[0] if head else k_pairs.mean(0)
    pair_atoms = (k_pairs - ref).view(len(middle), most, heads, dh)

    def residuals(places: list[list[int]], tail_atoms: Tensor) -> Tensor:
        """Members' largest relative squared residual for each placement (batched least squares)."""
        idx = torch.tensor(places, dtype=torch.long)
        atoms = pair_atoms[idx, torch.arange(idx.shape[1])]  # M x count x H x d_h
        atoms = torch.cat([atoms, tail_atoms[None].expand(idx.shape[0], -1, -1, -1)], 1)
        d = atoms.permute(0, 2, 3, 1)  # M x H x d_h x k
        sol = torch.linalg.lstsq(d, rhs[None].expand(idx.shape[0], -1, -1, -1)).solution
        r = rhs[None] - d @ sol
        return (r.square().sum((1, 2)) / rhs.square().sum((0, 1)).clamp_min(1e-300)).max(1).values

    def move_residuals(places: list[list[int]], tail_atoms: Tensor) -> Tensor:
        """:func:`residuals` in chunks of :data:`ORDER_CHUNK` placements; past the deadline it stops after
        the chunk in hand (the residuals of the first placements only)."""
        out = []
        for lo in range(0, len(places), ORDER_CHUNK):
            if lo and late(deadline):
                break
            out.append(residuals(places[lo : lo + ORDER_CHUNK], tail_atoms))
        return torch.cat(out)

    cut = False  # the deadline cut the search short
    if m:
        unit = pair_atoms.reshape(-1, heads, dh)
        unit = unit / unit.norm(dim=(1, 2), keepdim=True).clamp_min(1e-300)
        # one group per pair over every member and head: the members are parts of one sentence
        score, cut = group_lasso(
            members, unit, penalty=torch.ones(unit.shape[0], dtype=torch.float64, device=unit.device),
            lam=0.02, iterations=300, rounds=3, eps=1e-3, deadline=deadline, joint=True,
        )
        score = score[0].view(len(middle), most)
    else:
        score = torch.zeros(len(middle), most, dtype=torch.float64)
    best: tuple[float, list[int], int] | None = None
    for count in range(len(middle) + shortest, most + 1):
        if m and best is not None and best[0] < exact:
            break  # the shortest exact order: a longer one only adds atoms (a larger span fits more)
        if m and best is not None and late(deadline):
            cut = True  # longer counts left untried
            break
        # tokens -> slots 0..count-1: every token at least once, extra copies optional (linear assignment)
        copies = [(i, True) for i in range(len(middle))] + [(i, False) for i in range(len(middle)) for _ in range(extra)]
        cols = len(copies)  # slots 0..count-1, then one "unused" column per optional copy
        cost = torch.zeros(len(copies), cols, dtype=torch.float64)
        for r, (i, must) in enumerate(copies):
            cost[r, :count] = -score[i, :count]
            if must:
                cost[r, count:] = 1e9
        rows, assigned = linear_sum_assignment(cost.cpu().numpy())
        place = [0] * count
        for r, c in zip(rows, assigned, strict=True):
            if c < count:
                place[c] = copies[r][0]
        if not m:
            if best is None:
                best = (float("nan"), place, count)
            continue
        fx = fixed(count)
        tail_atoms = (fx[1:] - ref).view(-1, heads, dh)

        def rank_moves(place: list[int], moves: list[tuple[int, int, int, int]]) -> Tensor | None:
            """Approximate residuals of ``moves`` (slots ``i, j`` get tokens ``a, b``) from one QR of ``place``
            (:func:`move_scores`); ``None`` when the placement's atoms are rank-deficient."""
            cols = pair_atoms[torch.tensor(place), torch.arange(count)]  # count x H x d_h
            d = torch.cat([cols, tail_atoms], 0).permute(1, 2, 0)  # H x d_h x n
            mv = torch.tensor(moves, dtype=torch.long, device=pair_atoms.device)
            new = torch.stack([pair_atoms[mv[:, 2], mv[:, 0]], pair_atoms[mv[:, 3], mv[:, 1]]], -1)  # M x H x d_h x 2
            return move_scores(d, rhs, mv[:, :2], new)

        def descend(place: list[int]) -> tuple[float, list[int]]:
            nonlocal cut
            cur = float(residuals([place], tail_atoms)[0])
            for _ in range(sweeps):  # steepest descent over swaps and single-slot replacements
                if cur >= exact and late(deadline):
                    cut = True
                    break
                moves: list[list[int]] = []
                spec: list[tuple[int, int, int, int]] = []  # (slot i, slot j, token at i, token at j)
                for i in range(count):
                    for j in range(i + 1, count):
                        if place[i] != place[j]:
                            trial = list(place)
                            trial[i], trial[j] = trial[j], trial[i]
                            moves.append(trial)
                            spec.append((i, j, place[j], place[i]))
                    if place.count(place[i]) >= 2:
                        other = (i + 1) % count  # a replacement changes one slot: pair it with an unchanged one
                        for t in range(len(middle)):
                            if t != place[i]:
                                trial = list(place)
                                trial[i] = t
                                moves.append(trial)
                                spec.append((i, other, t, place[other]))
                if not moves:
                    break
                ranked = rank_moves(place, spec) if count >= 2 else None
                if ranked is None:
                    res = move_residuals(moves, tail_atoms)
                else:  # the best few by the one-QR ranking, their residuals exact
                    top = ranked.topk(min(VERIFY, len(moves)), largest=False).indices.tolist()
                    res = torch.full((len(moves),), float("inf"), dtype=torch.float64)
                    res[top] = residuals([moves[t] for t in top], tail_atoms).to("cpu", torch.float64)
                j = int(res.argmin())
                if float(res[j]) >= cur:
                    cut = cut or len(res) < len(moves)  # the deadline stopped the scan of the moves
                    break
                cur, place = float(res[j]), moves[j]
                if cur < exact:
                    break
            return cur, place

        cur, place = descend(place)
        for _ in range(restarts if cur >= exact else 0):  # perturb the best order and descend again
            if late(deadline):
                cut = True
                break
            trial = list(place)
            for _ in range(3):
                i, j = torch.randint(0, count, (2,), generator=generator).tolist()
                trial[i], trial[j] = trial[j], trial[i]
            r, trial = descend(trial)
            if r < cur:
                cur, place = r, trial
            if cur < exact:
                break
        if best is None or cur < best[0] * 0.5:
            best = (cur, place, count)
    assert best is not None
    if m and best[0] >= exact:
        # tokens of other sentences that leaked into the set end up after the sentence: try its prefixes
        for count in range(1, best[2]):
            r = float(residuals([best[1][:count]], (fixed(count)[1:] - ref).view(-1, heads, dh))[0])
            if r < exact:
                best = (r, best[1][:count], count)
                break
    return OrderedSentence(head + [middle[i] for i in best[1]] + tail, best[0], cut)
