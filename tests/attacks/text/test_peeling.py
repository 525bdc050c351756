"""peel's rounds on a toy gradient whose sentences are known: who is asked, in which order, and what is certified."""

from __future__ import annotations

import torch

from leak_audit.attacks.text.peeling import Proposal, peel

CLS, SEP = 0, 1
BAG = list(range(8))  # tokens 2-7 are words; each true sentence holds two of them


def _toy(true: list[list[int]]):
    """A gradient ``[3, |BAG|]`` whose column per token is its sentence's direction (the split is the identity),
    and ``contribution(s)`` ``[1, 3, |BAG|]``: that direction on ``s``'s words, so a sentence certifies exactly
    when it is a true sentence whose words are left in the gradient."""
    gen = torch.Generator().manual_seed(0)
    direction = {tuple(s): torch.randn(3, generator=gen, dtype=torch.float64) for s in true}

    def contribution(s: list[int]) -> torch.Tensor:
        u = direction.get(tuple(s), torch.randn(3, generator=gen, dtype=torch.float64))
        out = torch.zeros(1, 3, len(BAG), dtype=torch.float64)
        for v in s[1:-1]:
            out[0, :, v] = u
        return out

    grad = sum((contribution(s) * (i + 1.0))[0] for i, s in enumerate(true))
    return grad, contribution


def test_a_completion_that_certifies_is_asked_first_in_the_next_round():
    """Three sentences; the proposals certify nothing while two or more are left, and the completion gives one
    true sentence per call. After its first sentence certifies, peeling asks the completion before the proposals,
    so the proposals run only in the first round and at ``B' = 1`` (where the completion is not asked, and the
    span check is exact); all three are certified."""
    true = [[CLS, 2, 3, SEP], [CLS, 4, 5, SEP], [CLS, 6, 7, SEP]]
    grad, contribution = _toy(true)
    calls: list[str] = []

    def propose(_g: torch.Tensor, b: int) -> Proposal:
        calls.append(f"propose {b}")
        if b == 1:
            return Proposal([true[2]], BAG, 4)
        return Proposal([[CLS, 2, 5, SEP], [CLS, 4, 7, SEP], [CLS, 6, 3, SEP]][:b], BAG, 4)  # words mixed up

    found = iter(true[:2])

    def complete(_g: torch.Tensor, b: int, _guesses: list[list[int]]) -> Proposal | None:
        calls.append(f"complete {b}")
        return Proposal([next(found)], BAG, 4)

    out = peel(grad, 3, propose, contribution, lambda g, _bag, _n: g, complete=complete, structural=(CLS, SEP))
    assert sorted(out.sequences) == sorted(true)
    assert len(out.labels) == 3
    assert calls == ["propose 3", "complete 3", "complete 2", "propose 1"]


def test_the_proposals_come_back_when_the_completion_asked_first_fails():
    """The completion certifies one sentence, then proposes a wrong one: peeling goes back to the proposals, which
    now certify the other two."""
    true = [[CLS, 2, 3, SEP], [CLS, 4, 5, SEP], [CLS, 6, 7, SEP]]
    grad, contribution = _toy(true)
    calls: list[str] = []

    def propose(_g: torch.Tensor, b: int) -> Proposal:
        calls.append(f"propose {b}")
        return Proposal(true[1:] if b == 2 else [[CLS, 2, 5, SEP], [CLS, 4, 7, SEP], [CLS, 6, 3, SEP]], BAG, 4)

    answers = iter([[CLS, 2, 3, SEP], [CLS, 4, 7, SEP]])

    def complete(_g: torch.Tensor, b: int, _guesses: list[list[int]]) -> Proposal | None:
        calls.append(f"complete {b}")
        return Proposal([next(answers)], BAG, 4)

    out = peel(grad, 3, propose, contribution, lambda g, _bag, _n: g, complete=complete, structural=(CLS, SEP))
    assert sorted(out.sequences) == sorted(true)
    assert calls == ["propose 3", "complete 3", "complete 2", "propose 2"]
