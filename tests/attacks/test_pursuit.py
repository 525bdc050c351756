"""Joint sparse recovery (RA-ORMP): the solver that reads LoRA gradients beyond their rank."""

from __future__ import annotations

import torch

from leak_audit.attacks.pursuit import Pursuit, joint_support, prune_support, relative_residual


def _problem(n: int = 4000, d: int = 96, k: int = 30, rows: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n, d, generator=gen)
    support = torch.randperm(n, generator=gen)[:k]
    targets = torch.randn(rows, k, generator=gen, dtype=torch.float64) @ atoms[support].double()
    return atoms, support, targets


def test_more_atoms_than_rows_are_recovered_exactly() -> None:
    """30 atoms of 4,000 behind only 6 target rows (rank 6 < 30): the span test alone could not single out any
    atom, the pursuit finds exactly the 30 and nothing else."""
    atoms, support, targets = _problem()
    picked, residual, cut = joint_support(targets, atoms)
    assert not cut and residual < 1e-6
    assert sorted(picked) == sorted(support.tolist())


def test_prune_drops_what_the_fit_does_not_need() -> None:
    atoms, support, targets = _problem(k=12)
    wrong = [i for i in range(20) if i not in set(support.tolist())][:3]
    chosen = wrong[:2] + support.tolist() + wrong[2:]
    kept = prune_support(targets, atoms[chosen])
    assert sorted(chosen[i] for i in kept) == sorted(support.tolist())
    assert relative_residual(targets, atoms[support]) < 1e-9
    assert relative_residual(targets, atoms[wrong]) > 0.5


def test_the_dictionary_may_grow_between_picks_and_repeats_are_never_picked() -> None:
    atoms, support, targets = _problem(n=200, k=8, rows=3)
    state = Pursuit(targets)
    state.extend(atoms[:100])
    state.extend(atoms[100:])
    while state.residual() > 1e-6:
        assert state.step() is not None
    assert sorted(state.picked) == sorted(support.tolist())
    state.extend(atoms[support[:1]])  # a repeat of a picked atom: explained already
    assert state.step() is None or state.picked[-1] != 200


def test_zero_targets_pick_nothing() -> None:
    state = Pursuit(torch.zeros(4, 16))
    state.extend(torch.randn(10, 16))
    assert state.residual() == 0.0 and state.step() is None
    assert joint_support(torch.zeros(2, 8), torch.randn(5, 8))[:2] == ([], 0.0)


def test_blocks_sharing_one_support_are_read_together() -> None:
    """Three blocks (three layers' views of the same 40 unknowns, each its own atoms) with 4 rows each: together
    they recover the support exactly; a mismatched block count is refused."""
    import pytest

    from leak_audit.attacks.pursuit import SharedPursuit

    gen = torch.Generator().manual_seed(1)
    n, d, k = 1500, 96, 40
    support = torch.randperm(n, generator=gen)[:k]
    atoms = [torch.randn(n, d, generator=gen) for _ in range(3)]
    targets = [torch.randn(4, k, generator=gen, dtype=torch.float64) @ a[support].double() for a in atoms]
    state = SharedPursuit(targets)
    state.extend(atoms)
    while state.residual() > 1e-6:
        assert state.step() is not None
    kept = prune_support(targets, [a[torch.tensor(state.picked)] for a in atoms])
    assert sorted(state.picked[i] for i in kept) == sorted(support.tolist())
    with pytest.raises(ValueError, match="2 blocks"):
        state.extend(atoms[:2])
