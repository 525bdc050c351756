"""word_order.move_scores: the one-QR ranking of word-order moves equals the exact least-squares residuals."""

from __future__ import annotations

import torch

from leak_audit.attacks.text.word_order import move_scores


def _exact(d: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    out = []
    for k in range(slots.shape[0]):
        moved = d.clone()
        moved[:, :, slots[k, 0]] = new[k, :, :, 0]
        moved[:, :, slots[k, 1]] = new[k, :, :, 1]
        r = y - moved @ torch.linalg.lstsq(moved, y).solution
        out.append((r.square().sum((0, 1)) / y.square().sum((0, 1))).max())
    return torch.stack(out)


def test_move_scores_match_exact_residuals():
    g = torch.Generator().manual_seed(0)
    heads, dh, n, m = 12, 32, 15, 3
    d = torch.randn(heads, dh, n, dtype=torch.float64, generator=g)
    slots = torch.tensor([[i, j] for i in range(n) for j in range(i + 1, n)][::3])
    new = torch.randn(slots.shape[0], heads, dh, 2, dtype=torch.float64, generator=g)
    new[0, :, :, 1] = d[:, :, slots[0, 1]]  # a replacement: the second slot keeps its atom
    for y in (torch.randn(heads, dh, m, dtype=torch.float64, generator=g),  # outside the span
              d @ torch.randn(n, m, dtype=torch.float64, generator=g)):  # inside: the current order is exact
        got = move_scores(d, y, slots, new)
        assert got is not None
        assert torch.allclose(got, _exact(d, y, slots, new), atol=1e-12, rtol=0)
    # a move that puts every atom back leaves the exact residual (zero)
    same = torch.stack([d[:, :, slots[:, 0]].permute(2, 0, 1), d[:, :, slots[:, 1]].permute(2, 0, 1)], -1)
    assert float(move_scores(d, y, slots, same).abs().max()) < 1e-12


def test_move_scores_decline_rank_deficient_atoms():
    d = torch.randn(2, 4, 6, dtype=torch.float64)  # more atoms than dimensions
    assert move_scores(d, torch.randn(2, 4, 1, dtype=torch.float64), torch.tensor([[0, 1]]),
                       torch.randn(1, 2, 4, 2, dtype=torch.float64)) is None
    d = torch.randn(2, 8, 3, dtype=torch.float64)
    d[:, :, 2] = d[:, :, 0]  # a repeated atom
    assert move_scores(d, torch.randn(2, 8, 1, dtype=torch.float64), torch.tensor([[0, 1]]),
                       torch.randn(1, 2, 8, 2, dtype=torch.float64)) is None
