"""The rank rules of :mod:`leak_audit.attacks.spans` on spectra with a known answer."""

from __future__ import annotations

import pytest
import torch

from leak_audit.attacks.spans import WIDEST_GAP_FLOOR, widest_gap_rank


def test_widest_gap_rank_reads_the_gap_above_round_off():
    """The shape of SST-2 dev 12-15's float32 query gradient: a gap at rank 99 (1.4e-5 → 5.1e-8 of the
    largest), a float32 round-off floor falling slowly to 1.4e-12, and a last value far below it (2.4e-15: the
    wider ratio)."""
    head = torch.logspace(0, -4.84, 99, dtype=torch.float64)  # down to 1.44e-5
    floor = torch.logspace(-7.29, -11.85, 284, dtype=torch.float64)  # 5.1e-8 to 1.4e-12
    tail = torch.tensor([2.4e-15], dtype=torch.float64)
    s = torch.cat([head, floor, tail])
    assert widest_gap_rank(s) == 99
    # the tail's gap is the widest one: with the floor at 0 it would be read
    assert float(s[-2] / s[-1]) > float(s[98] / s[99])
    assert s[-2] < WIDEST_GAP_FLOOR * s[0] < s[98]


def test_widest_gap_rank_reads_a_float64_gap_down_to_the_floor():
    """A gradient computed in float64 drops far below float32's round-off; the gap is read while its upper
    value is above the floor."""
    s = torch.cat([torch.logspace(0, -8, 40, dtype=torch.float64), torch.full((20,), 1e-16, dtype=torch.float64)])
    assert widest_gap_rank(s) == 40


def test_widest_gap_rank_skips_the_dominant_values_and_rejects_bad_input():
    s = torch.tensor([1.0, 1e-6, 9e-7, 8e-7, 7e-7, 6e-7, 1e-11, 9e-12], dtype=torch.float64)
    assert widest_gap_rank(s) == 6  # the wider gap after the first value is not read (skip=4)
    assert widest_gap_rank(s, skip=0) == 1
    with pytest.raises(ValueError, match="at least two singular values"):
        widest_gap_rank(torch.ones(1))
    with pytest.raises(ValueError, match="1-D"):
        widest_gap_rank(torch.ones(2, 2))
