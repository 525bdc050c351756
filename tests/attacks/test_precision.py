"""Screening precision: which dtype a search ranks its candidates in."""

from __future__ import annotations

import pytest
import torch

import leak_audit.attacks.precision as precision
from leak_audit.attacks.precision import MIN_SPEEDUP, cast_floating, screening_dtype


def _timed(monkeypatch, seconds: dict[torch.dtype, float]):
    """A stand-in forward that takes ``seconds[dtype]`` on a fake clock (no sleeping, so machine load cannot
    change the outcome) and records its calls."""
    now = [0.0]
    calls: list[torch.dtype] = []
    monkeypatch.setattr(precision.time, "perf_counter", lambda: now[0])

    def run(dtype: torch.dtype) -> torch.Tensor:
        calls.append(dtype)
        now[0] += seconds[dtype]
        return torch.ones(2, dtype=dtype)

    return run, calls


def test_auto_screens_in_bfloat16_only_where_it_is_measured_faster(monkeypatch):
    fast, calls = _timed(monkeypatch, {torch.float32: 0.15, torch.bfloat16: 0.05})
    assert screening_dtype("auto", fast) == torch.bfloat16
    assert calls == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]  # a warm-up, then one timed
    slow, _ = _timed(monkeypatch, {torch.float32: 0.05, torch.bfloat16: 0.15})  # a CPU without bfloat16 units
    assert screening_dtype("auto", slow) is None
    marginal, _ = _timed(monkeypatch, {torch.float32: 0.1, torch.bfloat16: 0.1 / (MIN_SPEEDUP * 0.95)})
    assert screening_dtype("auto", marginal) is None
    enough, _ = _timed(monkeypatch, {torch.float32: 0.1, torch.bfloat16: 0.1 / (MIN_SPEEDUP * 1.05)})
    assert screening_dtype("auto", enough) == torch.bfloat16


def test_fixed_choices_do_not_time_and_a_bad_choice_names_the_valid_ones(monkeypatch):
    run, calls = _timed(monkeypatch, {torch.float32: 0.0, torch.bfloat16: 0.0})
    assert screening_dtype("off", run) is None
    assert screening_dtype("bfloat16", run) == torch.bfloat16
    assert calls == []
    with pytest.raises(ValueError, match=r"screen must be one of .*'auto'.*got 'fp16'"):
        screening_dtype("fp16", run)


def test_cast_floating_casts_weights_and_keeps_integer_buffers():
    params = {"w": torch.randn(3, 3, requires_grad=True), "ids": torch.arange(4)}
    low = cast_floating(params, torch.bfloat16)
    assert low["w"].dtype == torch.bfloat16 and not low["w"].requires_grad
    assert low["ids"] is params["ids"]
    torch.testing.assert_close(low["w"].float(), params["w"].detach(), atol=0.02, rtol=0.01)
