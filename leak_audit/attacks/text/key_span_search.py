"""One sentence of a batch from layer 0's query gradient alone, by a search on its key span.

Where :func:`~leak_audit.attacks.text.assignment_descent.place_pairs` gives up (four reviews of 23-40 tokens: the
row space holds nearly every (token, position) pair), this finds single sentences to peel. Per attention head, a
token's query gradient ``δq_t`` is a zero-sum combination of its own sentence's keys (the softmax), so it lies in
the span of that sentence's key differences ``k(v, i) − k([CLS], 0)``, which depend on the (token, position) pairs
only; and the gradient's split over the additive atoms (:mod:`~leak_audit.attacks.text.query_columns`) gives, for
every token that occurs once in the batch, its ``δq_t/σ_t`` exactly. So a hypothesis sentence of ``n ≤ d_h``
tokens has a cost: how far its tokens' columns lie outside its own key span, per head. The true sentence leaves
``~1e-14`` (squared, relative; float32 round-off), and unlike the forward/backward certificate of
:mod:`~leak_audit.attacks.text.peeling` the cost falls as wrong tokens are put right (SST-2: one wrong of 25
tokens 1e-6 to 3e-2, ten wrong 2e-2 to 8e-2; benchmarks/README.md, "What is left on SST-2 B = 4"). Tokens that
occur in other sentences too do not fit, so the descent's cost is the mean log of the best half of them, and the
test (:data:`EXACT`) the mean log of the best :data:`SURE`.

The search: lengths from the positions where ``[SEP]``'s input lies closest to the row space; per restart, each
position starts at one of its 4 closest tokens (seeded), then coordinate descent over each position's closest
``candidates`` tokens and those within :data:`IN_SPAN` of the row space (one QR per head of the other keys, then
a rank-one update per candidate for every token's column at once) and exchanges of two positions' tokens; a
hypothesis that comes within :data:`POLISH` gets one more descent over every bag token at every position. A
hypothesis below :data:`EXACT` is returned, for the caller to certify (peeling does) and take out. Sentences of
``d_h`` tokens or more fill a head and are not searched. It takes at most a share of the time left, so that a
batch where it finds nothing still finishes. Measured on SST-2 (2 CPU cores, one restart each from seeds 0-11):
dev 8-11, 12-15 and 36-39 (40, 31, 27 and 23 tokens) gave a review in 6, 2 and 4 of 12 (5, 4 and 0 of 12 with
the closest 9 only and the best-half test), 1-3 s each. This search is ours; the span fact is DAGER's (Petrov et
al., NeurIPS 2024).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.text.assignment_descent import pair_distances
from leak_audit.attacks.text.query_columns import additive_atoms, token_query_gradients
from leak_audit.models import EmbeddingTables

__all__ = ["EXACT", "IN_SPAN", "MEMBER", "POLISH", "SURE", "search_sentences"]

EXACT = -25.0
"""A hypothesis whose best :data:`SURE` tokens fit its key span at a mean log squared relative residual below this
is returned (true SST-2 reviews: about -31 to -32; the best wrong ones seen, on the best half: -13.7)."""

SURE = 2
"""How many of a hypothesis' best-fitting tokens :data:`EXACT` and :data:`POLISH` read. Tokens shared with another
sentence never fit, and at B = 16 a true CoLA sentence may hold only 2 of its own (CoLA dev 48-63: 0-9 of 6-18;
on the best half of its tokens 5 of these 16 sentences passed, on the best two 14)."""

IN_SPAN = 1e-4
"""The descent tries, at each position, every token whose pair lies this close to the row space (relative
distance; true pairs ≤ 5e-6), besides its ``candidates`` closest: with 16 sentences a position holds up to 16
true tokens, in no useful order (CoLA dev 48-63, one token replaced: 4 of 16 sentences came back with the 9
closest, 14 with these)."""

MEMBER = 1e-10
"""A token of a found sentence whose column fits its key span within this squared relative residual is its own
(true once-occurring tokens: ~1e-14; a token shared with another sentence carries that sentence's part too)."""

POLISH = -10.0
"""Below this mean log residual (of its best :data:`SURE` tokens) a hypothesis is a few tokens from a sentence:
every bag token is then tried at every position (a true token outside a position's closest candidates)."""


def search_sentences(
    grad: Tensor,
    key_weight: Tensor,
    heads: int,
    tables: EmbeddingTables,
    bag: Sequence[int],
    length: int,
    *,
    cls_token_id: int,
    sep_token_id: int,
    segment: int = 0,
    starts: Sequence[Sequence[int]] = (),
    lengths: int = 6,
    candidates: int = 9,
    restarts: int = 24,
    sweeps: int = 30,
    seed: int = 0,
    first: bool = True,
    share: float = 0.5,
    deadline: float | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Search single sentences whose tokens' query gradients lie in their own key span.

    Args:
        grad: ``[d_out, d]`` layer 0's query weight gradient of the sentences left (exact: no noise, no dropout).
        key_weight: ``[d, d]`` layer 0's key weight; heads: attention heads (``d_h = d_out / heads``).
        tables: embedding tables and LayerNorm at the audited step.
        bag: the token ids that may occur (with ``[CLS]`` and ``[SEP]``); length: positions ``0 … length − 1``.
        starts: guesses of sentences (``[CLS] … [SEP]``, e.g. the proposal peeling could not certify), each
            descended from first; tokens outside ``bag`` and guesses of ``d_h`` tokens or more are skipped.
        lengths: how many of ``[SEP]``'s closest positions are tried as sentence ends.
        candidates: tokens tried per position in the descent (closest to the row space first), besides those
            within :data:`IN_SPAN` of it.
        restarts: random starts at most (cycling through the lengths).
        sweeps: passes of the descent per start.
        seed: seed of the starts.
        first: return at the first sentence found (for a caller that takes it out and reads the rest again).
        share: the search stops after this share of the time left to ``deadline`` (the caller's fallback keeps
            the rest: on a batch where no sentence is found it must still finish).
        deadline: ``time.monotonic()`` value after which it returns what it found.

    Returns:
        ``(sentence, members)`` pairs, best first (empty when none was found): a sentence (``[CLS] … [SEP]`` token
        ids) below :data:`EXACT`, and its tokens whose columns fit its key span within :data:`MEMBER` (those
        that occur in no other sentence: the tokens its certificate may read).

    Raises:
        ValueError: ``[CLS]`` or ``[SEP]`` not in ``bag``, ``heads`` does not divide the gradient's rows, or
            ``share`` is outside ``(0, 1]``.
    """
    bag = [int(v) for v in bag]
    if cls_token_id not in bag or sep_token_id not in bag:
        raise ValueError(f"the bag must hold [CLS] ({cls_token_id}) and [SEP] ({sep_token_id})")
    if heads <= 0 or grad.shape[0] % heads:
        raise ValueError(f"heads must divide the query gradient's {grad.shape[0]} rows, got {heads}")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if deadline is not None:
        deadline = time.monotonic() + share * max(deadline - time.monotonic(), 0.0)
    dh = grad.shape[0] // heads
    col = {v: j for j, v in enumerate(bag)}
    g = grad.detach().double()
    dist, _, x = pair_distances(g, tables, bag, length, segment)
    # per token: Σ δq_t/σ_t over its occurrences, by head [|bag|, H, d_h]
    columns = token_query_gradients(g, additive_atoms(tables, bag, length, segment).to(g.device))
    columns = columns[:, : len(bag)].T.reshape(len(bag), heads, dh).contiguous()
    wk = key_weight.detach().double().to(g.device)
    ref = tables.pair_inputs(torch.tensor([cls_token_id], device=tables.word.device),
                             torch.tensor([0], device=tables.word.device), segment).double().to(g.device) @ wk.T
    keys = (x @ wk.T - ref).view(len(bag), length, heads, dh)
    words = [j for j, v in enumerate(bag) if v not in (cls_token_id, sep_token_id)]
    closest = dist[words].argsort(0)  # per position, indices into `words`, closest first
    inside = (dist[words] < IN_SPAN).sum(0).tolist()  # per position, the tokens whose pair lies in the row space
    ranked = [[bag[words[int(k)]] for k in closest[:, p]] for p in range(length)]
    ends = [int(p) + 2 for p in dist[col[sep_token_id], 1:].argsort()[:lengths]]  # [SEP] at p + 1
    ends = [n for n in ends if 4 <= n <= min(length, dh)]  # n − 1 key differences must leave a head room

    cache: dict[tuple[int, ...], tuple[float, float]] = {}

    def residuals(s: list[int]) -> tuple[list[int], Tensor]:
        """The distinct middle tokens of ``s`` and the squared relative residuals of their columns outside the
        span of ``s``'s key differences, summed over the heads."""
        d = keys[[col[v] for v in s[1:]], list(range(1, len(s)))].permute(1, 2, 0)  # [H, d_h, n − 1]
        q = torch.linalg.qr(d).Q  # n − 1 < d_h distinct pairs: full column rank
        middle = list(dict.fromkeys(s[1:-1]))
        t = columns[[col[v] for v in middle]].permute(1, 2, 0)  # [H, d_h, m]
        r = (t - q @ (q.transpose(1, 2) @ t)).square().sum((0, 1)) / t.square().sum((0, 1)).clamp_min(1e-300)
        return middle, r

    def fits(s: list[int]) -> tuple[float, float]:
        """The mean log residual of the best half of ``s``'s middle tokens (the descent's cost) and of its best
        :data:`SURE` (the test: shared tokens do not fit, and a short sentence may hold only a few of its own)."""
        key = tuple(s)
        if key not in cache:
            logs = residuals(s)[1].clamp_min(1e-16).log().sort().values
            cache[key] = (float(logs[: max(1, (logs.numel() + 1) // 2)].mean()), float(logs[:SURE].mean()))
            if len(cache) > 200_000:
                cache.clear()
        return cache[key]

    def cost(s: list[int]) -> float:
        return fits(s)[0]

    targets = columns.permute(1, 2, 0)  # [H, d_h, |bag|]
    norms = targets.square().sum((0, 1)).clamp_min(1e-300)

    def best_at(h: list[int], p: int, width: int) -> tuple[float, int]:
        """The cost of ``h`` with each of position ``p``'s closest ``width`` tokens there, the best: one QR per
        head of the other keys, then a rank-one update per candidate for every token's column at once."""
        others = [q for q in range(1, len(h)) if q != p]
        qo = torch.linalg.qr(keys[[col[h[q]] for q in others], others].permute(1, 2, 0)).Q  # [H, d_h, n − 2]
        r0 = targets - qo @ (qo.transpose(1, 2) @ targets)  # [H, d_h, |bag|]
        cand = ranked[p][: width + int(inside[p])]
        new = keys[[col[v] for v in cand], p]  # [c, H, d_h]
        left = new - torch.einsum("hds,chs->chd", qo, torch.einsum("hds,chd->chs", qo, new))
        drop = torch.einsum("chd,hdt->cht", left, r0).square() / left.square().sum(-1, keepdim=True).clamp_min(1e-300)
        logs = ((r0.square().sum(1)[None] - drop).sum(1) / norms).clamp_min(1e-16).log()  # [c, |bag|]
        rest = {v for q, v in enumerate(h[1:-1], 1) if q != p}
        best = (float("inf"), h[p])
        for k, v in enumerate(cand):
            row = logs[k, [col[u] for u in rest | {v}]].sort().values
            c = float(row[: max(1, (row.numel() + 1) // 2)].mean())
            if c < best[0]:
                best = (c, v)
        return best

    def descend(h: list[int], width: int) -> list[int]:
        cur = cost(h)
        for _ in range(sweeps):
            changed = False
            for p in range(1, len(h) - 1):
                if late(deadline):
                    return h
                c, v = best_at(h, p, width)
                if v != h[p] and c < cur - 1e-9:
                    h, cur, changed = [*h[:p], v, *h[p + 1 :]], c, True
            if not changed:  # two positions' tokens exchanged (a single change would repeat one of them)
                best = (cur, h)
                for a in range(1, len(h) - 1):
                    for b in range(a + 1, len(h) - 1):
                        if h[a] != h[b]:
                            s = list(h)
                            s[a], s[b] = h[b], h[a]
                            c = cost(s)
                            if c < best[0] - 1e-9:
                                best = (c, s)
                if best[1] is h:
                    return h
                cur, h = best
        return h

    rng = random.Random(seed)
    found: list[tuple[float, list[int]]] = []
    guesses = [[int(v) for v in s] for s in starts
               if 4 <= len(s) <= min(length, dh) and all(int(v) in col for v in s)
               and s[0] == cls_token_id and s[-1] == sep_token_id]
    for restart in range(len(guesses) + (restarts if ends else 0)):
        if late(deadline):
            break
        if restart < len(guesses):
            h = descend(list(guesses[restart]), candidates)
        else:
            n = ends[(restart - len(guesses)) % len(ends)]
            h = [cls_token_id, *(rng.choice(ranked[p][:4]) for p in range(1, n - 1)), sep_token_id]
            h = descend(h, candidates)
        if fits(h)[1] < POLISH:
            h = descend(h, len(words))
        c = fits(h)[1]
        if c < EXACT and all(h != s for _, s in found):
            found.append((c, h))
            if first:
                break
    out = []
    for _, s in sorted(found, key=lambda cs: cs[0]):
        middle, r = residuals(s)
        out.append((s, [v for v, e in zip(middle, r.tolist(), strict=True) if e < MEMBER]))
    return out
