"""Group lasso (FISTA) with per-head atoms: independent targets, and one joint problem over a sentence's members."""

from __future__ import annotations

import pytest
import torch

from leak_audit.attacks.lasso import group_lasso

H, DH = 12, 32


def _sentence(n_atoms: int = 300, members: int = 10, support: int = 20, seed: int = 0):
    """Unit atoms ``[N, H, d_h]`` and members ``[m, H, d_h]`` that are all combinations of the same ``support``
    atoms (per head), like the members of one sentence over its (token, position) pairs."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, H, DH, generator=gen, dtype=torch.float64)
    atoms = atoms / atoms.norm(dim=(1, 2), keepdim=True)
    true = torch.randperm(n_atoms, generator=gen)[:support]
    coef = torch.randn(support, members, H, generator=gen, dtype=torch.float64)
    return atoms, torch.einsum("nhd,nmh->mhd", atoms[true], coef), true


def test_joint_groups_equal_one_problem_with_the_atoms_repeated_per_member() -> None:
    """``joint=True`` is, by definition, the per-head problem whose heads are (member, head) pairs with every
    member's heads explained by the same atoms; it solves that problem to round-off without building the
    repeated ``[N, m·H, d_h]`` dictionary, and its largest scores are the true support."""
    atoms, members, true = _sentence()
    m = members.shape[0]
    penalty = torch.ones(atoms.shape[0], dtype=torch.float64)
    kwargs = {"penalty": penalty, "lam": 0.02, "iterations": 300, "rounds": 3, "eps": 1e-3}
    joint, cut = group_lasso(members, atoms, joint=True, **kwargs)
    repeated, _ = group_lasso(members.reshape(1, m * H, DH), atoms.repeat(1, m, 1), **kwargs)
    assert not cut and joint.shape == (1, atoms.shape[0])
    assert torch.allclose(joint, repeated, rtol=0, atol=1e-12 * float(repeated.abs().max()))
    assert set(joint[0].topk(len(true)).indices.tolist()) == set(true.tolist())


def test_independent_targets_each_find_their_own_support() -> None:
    """Without ``joint`` each target is its own problem: two targets from disjoint supports each get their own
    support as their top scores."""
    atoms, first, true_a = _sentence(members=1, support=6, seed=1)
    gen = torch.Generator().manual_seed(2)
    others = torch.tensor([i for i in range(atoms.shape[0]) if i not in set(true_a.tolist())])
    true_b = others[torch.randperm(len(others), generator=gen)[:6]]
    second = torch.einsum("nhd,nh->hd", atoms[true_b], torch.randn(6, H, generator=gen, dtype=torch.float64))
    targets = torch.stack([first[0], second])
    penalty = torch.ones(atoms.shape[0], dtype=torch.float64)
    scores, _ = group_lasso(targets, atoms, penalty=penalty, lam=0.02, iterations=300, rounds=3)
    assert scores.shape == (2, atoms.shape[0])
    assert set(scores[0].topk(6).indices.tolist()) == set(true_a.tolist())
    assert set(scores[1].topk(6).indices.tolist()) == set(true_b.tolist())


def test_without_a_penalty_every_per_head_group_weighs_one() -> None:
    atoms, members, true = _sentence(members=2, support=5, seed=3)
    scores, _ = group_lasso(members, atoms, lam=0.02, iterations=300, joint=True)
    assert set(scores[0].topk(5).indices.tolist()) == set(true.tolist())


def test_joint_needs_per_head_atoms() -> None:
    with pytest.raises(ValueError, match="joint groups go with per-head atoms"):
        group_lasso(torch.randn(4, 16), torch.randn(30, 16), lam=0.1, iterations=10, joint=True)
