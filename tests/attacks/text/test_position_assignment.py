"""The position assignment's search on a cost of its own: one sentence at a time, the truth at zero mismatches.

The real certificate is exercised through span_cluster in ``test_assignment_descent.py``; here the cost is the
log of a sentence's mismatches against the true sentence of its length, so the search's moves (the Hungarian
reassignment per position, the run swaps) and its stops are tested on their own, in milliseconds.
"""

from __future__ import annotations

import math
import random

import pytest

from leak_audit.attacks.text.position_assignment import assign_by_position

TRUTH = [
    [101, *range(1, 21), 102],  # 22 tokens
    [101, *range(21, 39), 102],  # 20
    [101, *range(39, 53), 102],  # 16
    [101, *range(53, 63), 102],  # 12
]


def _costs(sentences):
    """Per sentence, ``log(1e-9 + mismatches / length)`` against the true sentence of its length."""
    by_length = {len(t): t for t in TRUTH}
    return [math.log(1e-9 + sum(a != b for a, b in zip(s, by_length[len(s)], strict=True)) / len(s)) for s in sentences]


def _scrambled(seed: int, keep: tuple[int, ...] = ()) -> list[list[int]]:
    """The true tokens at each position shuffled across the sentences (all but ``keep``)."""
    rng = random.Random(seed)
    hyp = [list(t) for t in TRUTH]
    for p in range(1, len(TRUTH[0]) - 1):
        owners = [i for i, t in enumerate(TRUTH) if len(t) > p + 1 and i not in keep]
        tokens = [hyp[i][p] for i in owners]
        rng.shuffle(tokens)
        for i, v in zip(owners, tokens, strict=True):
            hyp[i][p] = v
    return hyp


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scrambled_positions_are_reassigned_to_their_sentences(seed):
    """Every position's tokens scrambled across four sentences of 12-22 tokens: all four come back, and the
    tokens at each position and the lengths never change."""
    start = _scrambled(seed)
    assert sum(h == t for h, t in zip(start, TRUTH, strict=True)) == 0
    got = assign_by_position(start, _costs, certified=math.log(1e-6))
    assert got == TRUTH
    for p in range(len(TRUTH[0])):
        assert sorted(s[p] for s in got if len(s) > p) == sorted(s[p] for s in start if len(s) > p)


def _all_or_nothing(sentences):
    """Like the real certificate, no reward for part of a run: ``log(1e-9)`` when exact, else the log of
    ``0.5 + 0.5 · ⌈mismatches / 8⌉ / 3``, so one position mended in a run of 8 wrong ones changes nothing."""
    by_length = {len(t): t for t in TRUTH}
    out = []
    for s in sentences:
        m = sum(a != b for a, b in zip(s, by_length[len(s)], strict=True))
        out.append(math.log(1e-9) if m == 0 else math.log(0.5 + 0.5 * math.ceil(m / 8) / 3))
    return out


@pytest.mark.parametrize(("lo", "hi"), [(1, 9), (6, 14), (12, 19)])
def test_a_swapped_run_is_undone_in_one_move(lo, hi):
    """Two sentences that hold each other's run of positions (a prefix, an inner run, a suffix of the shorter):
    no position's reassignment lowers their cost, so the sweep changes nothing, and the best run swap restores
    both."""
    start = [list(t) for t in TRUTH]
    start[0][lo:hi], start[1][lo:hi] = TRUTH[1][lo:hi], TRUTH[0][lo:hi]
    assert _all_or_nothing([start[0]]) == _all_or_nothing([[*start[0][:lo], TRUTH[0][lo], *start[0][lo + 1 :]]])
    assert assign_by_position(start, _all_or_nothing, certified=math.log(1e-6)) == TRUTH
    assert assign_by_position(start, _all_or_nothing, certified=math.log(1e-6), max_block=hi - lo - 1) == start


def test_first_returns_once_one_more_sentence_is_certified():
    """With ``first`` the search stops at the first sentence it certifies (a caller like peeling takes it out
    and reads the rest again); sentences certified at the start are not moved."""
    start = _scrambled(0, keep=(3,))  # sentence 3 already certified
    assert sum(h == t for h, t in zip(start, TRUTH, strict=True)) == 1
    got = assign_by_position(start, _costs, certified=math.log(1e-6), first=True)
    assert got[3] == TRUTH[3]
    exact = sum(h == t for h, t in zip(got, TRUTH, strict=True))
    assert 2 <= exact < 4  # at least one more than at the start (one position may complete two), not all
    assert got != TRUTH


def test_a_past_deadline_returns_the_start_unchanged():
    start = _scrambled(1)
    got = assign_by_position(start, _costs, certified=math.log(1e-6), deadline=0.0)
    assert got == start and got is not start
