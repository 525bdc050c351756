"""Joint sparse recovery (RA-ORMP): the solver that reads LoRA gradients beyond their rank."""

from __future__ import annotations

import pytest
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


def test_a_dictionary_grown_in_many_pieces_between_picks_reads_as_one_given_at_once() -> None:
    """The dictionary grows in place (buffers of doubling capacity): 200 atoms added in pieces of 1 to 13, with picks
    in between, score every atom as a pursuit given all 200 before the first pick and taking the same picks does, and
    hold the same atoms, ``‖P⊥ a‖²`` and ``‖a‖²``."""
    atoms, _, targets = _problem(n=200, k=8, rows=3)
    whole = Pursuit(targets)
    whole.extend(atoms)
    grown = Pursuit(targets)
    start, size, checked = 0, 1, 0
    while start < 200:
        grown.extend(atoms[start:start + size])
        start, size = start + size, size % 13 + 1
        torch.testing.assert_close(grown.scores(), whole.scores()[:start], rtol=1e-4, atol=1e-6)
        if start > 60 and grown.residual() > 1e-6:
            picked = grown.step()
            assert picked is not None
            whole.take(picked)
            checked += 1
    assert checked >= 5
    while whole.residual() > 1e-6:
        grown.take(whole.step())
    torch.testing.assert_close(grown.scores(), whole.scores(), rtol=1e-4, atol=1e-6)
    assert grown.residual() < 1e-6 and torch.equal(grown.atoms, atoms) and grown.rest.shape == (200,)
    torch.testing.assert_close(grown.rest, whole.rest, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grown.full, atoms.double().pow(2).sum(1))


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


def test_patience_stops_the_picks_at_the_noise_floor() -> None:
    """Targets with round-off-like noise (relative 1e-3) never reach a tight tolerance: without patience the picks
    run on to d − 1 atoms of noise; with it they stop soon after the true atoms (all of them picked first)."""
    atoms, support, targets = _problem(n=1000, d=384, k=20, rows=12, seed=3)
    noisy = targets + 1e-3 * targets.norm() / targets.numel() ** 0.5 * torch.randn(
        targets.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    endless, _, _ = joint_support(noisy, atoms, tol=1e-9)
    picked, residual, cut = joint_support(noisy, atoms, tol=1e-9, patience=8)
    assert len(endless) == atoms.shape[1] - 1 and not cut
    assert set(support.tolist()) <= set(picked) and len(picked) <= 20 + 8
    assert 1e-4 < residual < 1e-2


def test_balanced_rows_keep_the_row_space_and_weigh_its_directions_alike() -> None:
    """Two massive directions (1e6 times the rest, as a decoder's first position gives) over 14 ordinary ones: the
    balanced rows span the same space, their directions above the floor have weight 1, and the round-off level they
    report is float32's unit round-off raised by the most raised direction."""
    from leak_audit.attacks.spans import FLOAT32_EPS, balanced_rows

    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))[0]
    scales = torch.cat([torch.tensor([1e6, 5e5], dtype=torch.float64), torch.logspace(0, -1, 14, dtype=torch.float64)])
    rows = (mix * scales) @ inputs
    balanced, noise = balanced_rows([rows[:8], rows[8:]], floor=1e-5)
    s = torch.linalg.svdvals(balanced)
    assert torch.allclose(s[:2], torch.ones(2, dtype=torch.float64), atol=1e-9)  # above the floor: weight 1
    raw = torch.linalg.svdvals(rows)
    assert torch.allclose(s[2:], raw[2:] / (1e-5 * raw[0]), rtol=1e-6)  # below it: raised to the floor's scale
    q = torch.linalg.qr(balanced.T)[0]
    assert torch.linalg.matrix_norm(rows - (rows @ q) @ q.T) < 1e-8 * torch.linalg.matrix_norm(rows)  # same span
    expected = FLOAT32_EPS * float(torch.linalg.matrix_norm(rows)) / (1e-5 * float(raw[0]))
    assert abs(noise - expected / float(torch.linalg.matrix_norm(balanced))) < 1e-12
    with pytest.raises(ValueError, match="all zero"):
        balanced_rows([torch.zeros(4, 8)])
    with pytest.raises(ValueError, match="at least one"):
        balanced_rows([])
