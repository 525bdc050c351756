"""Position-by-position assignment of placed tokens to sentences, by each sentence's own certificate.

Where :func:`~leak_audit.attacks.text.assignment_descent.place_pairs` has read which tokens sit at every
position (and the lengths), what is left is which sentence holds which of them. A token that occurs once in the
batch has its own column in the gradient's split over the additive atoms, ``δq_t/σ_t``, and that column depends
on its own sentence only. So each sentence of a hypothesis has a cost of its own: how well one forward/backward
of it predicts the columns of its once-occurring tokens (peeling's certificate,
:mod:`~leak_audit.attacks.text.peeling`), and the hypothesis costs their sum. With costs per sentence the tokens at
one position go to the sentences by an optimal assignment (the Hungarian method, Kuhn 1955, through
:func:`scipy.optimize.linear_sum_assignment`) on ``owners × tokens`` candidate sentences, instead of trying
swaps one pair at a time. The cost is the log of the relative residual, so that one sentence made exact
(residual ~1e-6) outweighs small losses elsewhere.

When a sweep over the positions changes nothing, two sentences not yet certified swap a run of positions, the
best such swap by the summed cost (a sentence that holds another's run of tokens is one swap, not many
position moves, from the truth). Prefixes and suffixes are tried first, ``O(length)`` candidates per pair of
sentences; every run up to ``max_block`` long (``O(length · max_block)``) only when none of those gains.
Sentences whose relative residual is below the certificate's tolerance are left alone from then on.

Measured with the true placement (the tokens at each position scrambled across sentences) on SST-2's six
batches of four that layer 0's query leaves open or times out on: all 24 reviews exact, in 21-39 s per batch
for five of them and 113 s for the sixth (217 s when every run was tried at once). In the attack,
:func:`~leak_audit.attacks.text.assignment_descent.assignment_descent` runs it first and returns at the first
sentence it certifies: SST-2 dev 24-27 then comes back whole in 31 s (one of four in 101 s without it;
benchmarks/README.md, "What is left on SST-2 B = 4"). The code is ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from leak_audit.attacks.budget import late

__all__ = ["assign_by_position"]


def assign_by_position(
    sentences: Sequence[Sequence[int]],
    costs: Callable[[list[list[int]]], list[float]],
    *,
    certified: float,
    max_block: int = 40,
    sweeps: int = 40,
    first: bool = False,
    deadline: float | None = None,
) -> list[list[int]]:
    """Reassign each position's tokens among the sentences to lower the summed per-sentence cost.

    Args:
        sentences: the starting hypothesis, ``[CLS] … [SEP]`` each; the tokens at position ``p`` of the
            sentences longer than ``p + 1`` are the ones moved (the first and last tokens stay).
        costs: ``sentences -> [cost per sentence]``, each a function of that sentence alone (e.g. the log of its
            own-token certificate's relative residual), evaluated for many candidates at once.
        certified: a sentence whose cost is below this is taken as certified and no longer moved.
        max_block: the longest run of positions two sentences swap when a sweep changes nothing.
        sweeps: passes over the positions at most.
        first: return as soon as one more sentence is certified (for a caller that takes certified sentences
            out and reads the rest again, as peeling does).
        deadline: ``time.monotonic()`` value after which it stops.

    Returns:
        The best hypothesis found (the same lengths and the same tokens per position as ``sentences``).
    """
    hyp = [list(s) for s in sentences]
    lengths = [len(s) for s in hyp]
    positions = [p for p in range(1, max(lengths) - 1) if len({s[p] for s in hyp if len(s) > p + 1}) > 1]
    for _ in range(sweeps):
        current = costs(hyp)
        done = {i for i, c in enumerate(current) if c < certified}
        if len(done) == len(hyp) or late(deadline):
            break
        changed = False
        for p in positions:
            if late(deadline):
                return hyp
            owners = [i for i, n in enumerate(lengths) if n > p + 1 and i not in done]
            tokens = [hyp[i][p] for i in owners]
            if len(set(tokens)) < 2:
                continue
            tries = [[*hyp[i][:p], v, *hyp[i][p + 1 :]] for i in owners for v in tokens]
            table = np.asarray(costs(tries), dtype=float).reshape(len(owners), len(tokens))
            _, columns = linear_sum_assignment(table)
            # owner r holds tokens[r] now: change only for a strictly lower sum (ties would wander)
            if float(table[np.arange(len(owners)), columns].sum()) < float(np.trace(table)) - 1e-12:
                for i, k in zip(owners, columns, strict=True):
                    hyp[i][p] = tokens[k]
                changed = True
                if first and float(table[np.arange(len(owners)), columns].min()) < certified:
                    return hyp  # a sentence is certified: the caller takes it out and reads the rest again
        if not changed and not _swap_best_run(hyp, lengths, done, costs, max_block, deadline):
            break
    return hyp


def _swap_best_run(
    hyp: list[list[int]],
    lengths: list[int],
    done: set[int],
    costs: Callable[[list[list[int]]], list[float]],
    max_block: int,
    deadline: float | None,
) -> bool:
    """Swap, in place, the run of positions between two uncertified sentences that lowers their cost most."""
    free = [i for i in range(len(hyp)) if i not in done]
    base = dict(zip(free, costs([hyp[i] for i in free]), strict=True))
    best: tuple[float, int, int, int, int] | None = None
    for ends in (True, False):  # prefixes and suffixes first (O(length) per pair), every run only if none gains
        for x, i in enumerate(free):
            for j in free[x + 1 :]:
                if late(deadline):
                    return False
                top = min(lengths[i], lengths[j]) - 1  # both hold words below ``top``
                runs = [(a, b) for a in range(1, top) for b in range(a + 2, min(top, a + max_block) + 1)
                        if hyp[i][a:b] != hyp[j][a:b] and (a == 1 or b == top) == ends]
                if not runs:
                    continue
                tries = [s for a, b in runs
                         for s in (hyp[i][:a] + hyp[j][a:b] + hyp[i][b:], hyp[j][:a] + hyp[i][a:b] + hyp[j][b:])]
                c = costs(tries)
                for k, (a, b) in enumerate(runs):
                    gain = base[i] + base[j] - c[2 * k] - c[2 * k + 1]
                    if gain > 1e-9 and (best is None or gain > best[0]):
                        best = (gain, i, j, a, b)
        if best is not None:
            break
    if best is None or not math.isfinite(best[0]):
        return False
    _, i, j, a, b = best
    hyp[i][a:b], hyp[j][a:b] = hyp[j][a:b], hyp[i][a:b]
    return True
