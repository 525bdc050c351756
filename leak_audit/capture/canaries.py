"""Dirac canaries inside DP-SGD, for an empirical ε from the same training run.

Steinke, Nasr and Jagielski ("Privacy Auditing with One (1) Training Run", NeurIPS 2023) audit DP-SGD with
white-box gradient canaries. :class:`DiracCanaries` places ``m`` of them, each a gradient that is zero except
at one coordinate of a trained parameter, where it equals the clipping norm ``C`` (a clipped per-sample
gradient of norm exactly ``C``, the worst case DP-SGD must hide). Each canary is *included* with probability ½,
once for the run; an included canary joins a step with probability ``q``, the sample rate the accountant
charges (expected batch size over dataset size), like a real example under Poisson sampling. So the
accountant's ε bounds what the canaries can reveal, and a lower bound above it is an implementation fault.

Where: Opacus 1.6's ``DPOptimizer.pre_step`` runs ``clip_and_accumulate`` (per-sample clip, sum into
``p.summed_grad``), ``add_noise`` (``p.grad = summed_grad + N(0, (σC)²)``), ``scale_grad`` and the
accountant's ``step_hook``. The canaries wrap ``add_noise`` on the optimizer *instance*: they are added to
``summed_grad`` before the noise, and the released, noised coordinate ``x`` is read right after it. The
``step_hook`` is never replaced, so the accountant's history is the same with and without canaries.

Score: each step adds the log-likelihood ratio of "included" against "excluded" for ``x`` under the
mechanism, ``log((1 − q) + q·exp((x·C − C²/2) / s²))``, with ``s`` the step's noise scale estimated from all
canaries' released values (:meth:`DiracCanaries.scores`). Any score gives a
valid bound; this one is the Neyman-Pearson test for a coordinate the data does not touch, so it is the
tight choice. It never uses which steps a canary joined: that randomness is part of the mechanism.

The statistics are in :mod:`leak_audit.metrics.epsilon`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["CanaryError", "CanaryScores", "DiracCanaries"]


class CanaryError(ValueError):
    """Canaries cannot be placed or cannot audit this run; the message says why and what would work."""


@dataclass(frozen=True)
class CanaryScores:
    """The canaries' state at one step, copied on the training thread.

    Attributes:
        llr: ``[m]`` float64, summed per-step log-likelihood ratios (the score used for ε).
        included: ``[m]`` bool, the truth: which canaries take part in training.
    """

    llr: Tensor
    included: Tensor


class DiracCanaries:
    """``m`` Dirac canaries added to an Opacus ``DPOptimizer``'s clipped sum, read back after the noise.

    Args:
        dp_optimizer: an Opacus ``DPOptimizer`` (not distributed: its ``add_noise`` differs per rank).
        parameters: ``{name: parameter}`` that may carry canaries; only those the optimizer trains
            (``requires_grad`` and in ``dp_optimizer.params``) are used.
        count: ``m`` ≥ 1, at most the number of trained coordinates.
        sample_rate: ``q`` in ``(0, 1]``, the accountant's per-step sample rate (expected batch size / N).
        seed: seeds the placement, the inclusion and the per-step participation (own generators; the
            training's and Opacus's random streams are untouched).

    Raises:
        CanaryError: ``count < 1``, more canaries than trained coordinates, no trained parameter, ``sample_rate``
            outside ``(0, 1]``, a noise multiplier of 0 (nothing to audit: ε is infinite), per-layer clipping
            (a list of norms), or a ``DistributedDPOptimizer``.
        TypeError: ``dp_optimizer`` has no ``add_noise``/``params`` (not an Opacus ``DPOptimizer``).
    """

    def __init__(self, dp_optimizer: Any, parameters: Mapping[str, torch.nn.Parameter], count: int, *,
                 sample_rate: float, seed: int = 0) -> None:
        if not callable(getattr(dp_optimizer, "add_noise", None)) or not hasattr(dp_optimizer, "params"):
            raise TypeError(f"expected an Opacus DPOptimizer, got {type(dp_optimizer).__name__}")
        if type(dp_optimizer).__name__.startswith("Distributed"):
            raise CanaryError(f"canaries under {type(dp_optimizer).__name__} are not supported: each rank adds its "
                              "own noise share, so one rank cannot read the released canary coordinates; train on "
                              "one device to audit with canaries")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise CanaryError(f"canaries must be an int >= 1, got {count!r}")
        if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
            raise CanaryError(f"the canaries' sample rate must be in (0, 1], got {sample_rate!r}")
        if not isinstance(dp_optimizer.max_grad_norm, int | float):
            raise CanaryError(f"canaries need flat clipping (one max_grad_norm), got per-layer norms "
                              f"{dp_optimizer.max_grad_norm!r}: a canary of the overall norm would be stronger than any "
                              "example in its layer, and the bound unsound; train with clipping='flat'")
        sigma = float(dp_optimizer.noise_multiplier)
        if not sigma > 0:
            raise CanaryError(f"canaries need DP noise, but the noise multiplier is {sigma!r}: without noise "
                              "epsilon is infinite and there is nothing to audit")
        trained = {id(p) for p in dp_optimizer.params}
        self.names = [n for n, p in parameters.items() if p.requires_grad and id(p) in trained]
        self._params = [parameters[n] for n in self.names]
        if not self._params:
            raise CanaryError("no parameter that the DP optimizer trains can carry canaries")
        sizes = torch.tensor([p.numel() for p in self._params], dtype=torch.int64)
        total = int(sizes.sum())
        if count > total:
            raise CanaryError(f"{count} canaries need {count} distinct trained coordinates, but the DP optimizer "
                              f"trains {total}: use canaries <= {total}")
        gen = torch.Generator().manual_seed(int(seed))
        flat = _distinct(total, count, gen)
        ends = torch.cumsum(sizes, 0)
        which = torch.searchsorted(ends, flat, right=True)
        local = flat - (ends - sizes)[which]
        self._slots: list[tuple[int, Tensor, Tensor]] = []  # (param index, canary positions, local flat indices)
        for k in torch.unique(which).tolist():
            pos = torch.nonzero(which == k).flatten()
            device = self._params[k].device
            self._slots.append((k, pos.to(device), local[pos].to(device)))
        device = self._params[0].device
        self.count = count
        self.sample_rate = float(sample_rate)
        self.norm = float(dp_optimizer.max_grad_norm)
        self.included = (torch.rand(count, generator=gen) < 0.5).to(device)
        self._gen = torch.Generator().manual_seed(int(seed) + 1)
        self._llr = torch.zeros(count, dtype=torch.float64, device=device)
        self.steps = 0
        self.dp_optimizer = dp_optimizer
        self._own_attr = "add_noise" in vars(dp_optimizer)
        self._inner = dp_optimizer.add_noise
        self._hook = self._add_noise  # one bound method, so remove() can tell whether it is still installed
        dp_optimizer.add_noise = self._hook

    @property
    def coordinates(self) -> list[tuple[str, int]]:
        """``[(parameter name, flat index)]`` of each canary, in canary order."""
        out: list[tuple[str, int]] = [("", 0)] * self.count
        for k, pos, idx in self._slots:
            for c, i in zip(pos.tolist(), idx.tolist(), strict=True):
                out[c] = (self.names[k], i)
        return out

    def _add_noise(self) -> None:
        opt = self.dp_optimizer
        join = torch.rand(self.count, generator=self._gen) < self.sample_rate
        active = self.included & join.to(self.included.device, non_blocking=True)
        for k, pos, idx in self._slots:
            p = self._params[k]
            if getattr(p, "summed_grad", None) is None:
                continue  # no gradient this step (Opacus skips such parameters too)
            value = active[pos].to(p.summed_grad.dtype) * self.norm
            p.summed_grad.view(-1).index_add_(0, idx, value)
        self._inner()
        x = torch.zeros(self.count, dtype=torch.float64, device=self._llr.device)
        for k, pos, idx in self._slots:
            g = self._params[k].grad
            if g is not None:
                x[pos] = g.reshape(-1)[idx].to(torch.float64)
        q, c = self.sample_rate, self.norm
        # the step's noise scale, pooled over the canaries (robust: a spike is an outlier): read from what DP-SGD
        # released, never from which canaries joined
        scale = 1.4826 * (x - x.median()).abs().median()
        told = float(opt.noise_multiplier) * c
        scale = torch.where(scale > 0, scale, torch.full_like(scale, told))
        z = (x * c - 0.5 * c**2) / scale**2
        stay = torch.full_like(z, math.log1p(-q)) if q < 1 else torch.full_like(z, -math.inf)
        self._llr += torch.logaddexp(stay, z + math.log(q))
        self.steps += 1

    def scores(self) -> CanaryScores:
        """A copy of the scores and the truth now (:class:`CanaryScores`; on the parameters' device)."""
        return CanaryScores(self._llr.clone(), self.included.clone())

    def remove(self) -> None:
        """Stop adding canaries: restore the optimizer's ``add_noise`` (if nothing wrapped it since)."""
        opt = self.dp_optimizer
        if vars(opt).get("add_noise") is self._hook:
            if self._own_attr:
                opt.add_noise = self._inner
            else:
                del opt.add_noise

    def state_dict(self) -> dict[str, Any]:
        """The scores and step count, to resume an audit (placement and inclusion follow from ``seed``)."""
        return {"llr": self._llr.cpu(), "steps": self.steps,
                "included": self.included.cpu(), "participation": self._gen.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            CanaryError: the saved canaries differ from these (another count or seed).
        """
        if not torch.equal(state["included"].to(self.included.device), self.included):
            raise CanaryError("the saved canaries differ from these (another canary count or seed): cannot resume")
        self._llr.copy_(state["llr"])
        self.steps = int(state["steps"])
        self._gen.set_state(state["participation"])


def _distinct(total: int, count: int, gen: torch.Generator) -> Tensor:
    """``count`` distinct integers in ``[0, total)``, uniformly, without an O(total) permutation."""
    if count * 4 >= total:
        return torch.randperm(total, generator=gen)[:count]
    picked: list[int] = []
    seen: set[int] = set()
    while len(picked) < count:
        for v in torch.randint(0, total, (2 * (count - len(picked)),), generator=gen).tolist():
            if v not in seen and len(picked) < count:
                seen.add(v)
                picked.append(v)
    return torch.tensor(picked, dtype=torch.int64)
