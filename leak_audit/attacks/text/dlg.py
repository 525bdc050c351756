"""DLG: the classic optimisation baseline (Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019).

Dummy inputs and dummy labels start from random values and are optimised with L-BFGS so that the
gradient they produce matches the observed one in squared l2 distance. For text the dummy inputs are
word embeddings ``[B, L, d]`` (fed as ``inputs_embeds``; position/type embeddings and LayerNorm come from
the model), projected at the end to the nearest token (cosine) of the whole vocabulary. No priors: not the
labels, not the token bag, not the ``[CLS]``/``[SEP]`` structure; only the sequence length rule of
:func:`~leak_audit.attacks.optim.infer_length`. It is the reference the stronger attacks are compared
with, and it is weak on text (the continuous optimum is far from any token sequence).

Two deviations from the paper's code, for robustness: L-BFGS uses a strong-Wolfe line search (without
one it often diverges to NaN), and the l2 distance is divided by ``‖g*‖²`` (same minimiser; it keeps
L-BFGS's tolerances meaningful whatever the gradient's scale).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from typing import Any

import torch

from leak_audit.attacks.optim import (
    GradientDistance,
    Layout,
    Objective,
    infer_length,
    matched_gradient_names,
    nearest_tokens,
    random_embeddings,
)
from leak_audit.attacks.budget import OutOfBudget, late
from leak_audit.attacks.base import (
    Attack,
    AttackInput,
    Budget,
    NotApplicable,
    Reconstruction,
    Requirements,
    require_classifier,
)
from leak_audit.models import TextModelSpec

__all__ = ["DLG"]


class DLG(Attack):
    """Registered attack ``"dlg"``: L-BFGS on the l2 gradient distance from random dummy inputs and labels.

    Matches every tapped gradient of the model except the word-embedding table (see
    :func:`~leak_audit.attacks.optim.matched_gradient_names`).

    Args:
        max_steps: gradient evaluations (L-BFGS closure calls, line-search calls included) at most.
        max_seconds: the attack's own wall-clock budget (seconds), capped by the audit's deadline
            (:meth:`~leak_audit.attacks.base.AttackInput.budget`), checked before every gradient
            evaluation: a run ends within one evaluation (plus the final projection) of it. Stopped by the
            audit's deadline before ``max_steps`` (and without diverging), the result is ``timed_out``
            with ``info["progress"]``.
        max_length: sequence length when neither the position-embedding gradient nor a gradient's rank
            gives it (special tokens included).
        lr: L-BFGS step length (1 in the paper).
        history_size: L-BFGS memory.

    Raises:
        ValueError: an option out of range (the message names the value and the valid range).
    """

    name = "dlg"
    cost = "optimisation"

    def __init__(
        self,
        *,
        max_steps: int = 300,
        max_seconds: float = 20.0,
        max_length: int = 32,
        lr: float = 1.0,
        history_size: int = 100,
    ) -> None:
        for n, v in (("max_steps", max_steps), ("history_size", history_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be an integer >= 1, got {v!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be in (0, inf), got {max_seconds!r}")
        if not lr > 0:
            raise ValueError(f"lr must be in (0, inf), got {lr!r}")
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.max_length = max_length
        self.lr = lr
        self.history_size = history_size

    def __repr__(self) -> str:
        return f"DLG(max_steps={self.max_steps}, max_seconds={self.max_seconds})"

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        require_classifier(spec)
        names = matched_gradient_names(spec, tapped)
        return Requirements(gradients=frozenset(names), params=frozenset({spec.word_embeddings}), replica=True)

    def run(self, inp: AttackInput) -> Reconstruction:
        budget = inp.budget(self.max_seconds)
        with torch.enable_grad():
            return self._run(inp, budget)

    def _run(self, inp: AttackInput, budget: Budget) -> Reconstruction:
        start = budget.start
        spec, replica = inp.spec, inp.replica
        if replica is None:
            raise NotApplicable("DLG runs the model, but no model replica was given")
        names = sorted(n for n in matched_gradient_names(spec, inp.gradients) if n in replica.parameter_names)
        if not names:
            raise NotApplicable("none of the tapped gradients belongs to the replicated model")
        deadline = budget.deadline
        gen = inp.generator if inp.generator is not None else torch.Generator().manual_seed(0)
        b = max(1, inp.batch_size)
        length, source = infer_length({n: inp.gradients[n] for n in names}, spec, b, self.max_length,
                                          noise_std=inp.noise_std)
        length = max(1, min(length, spec.max_positions - spec.position_offset))
        layout = Layout.build([length] * b, spec, fix_special=False, device=replica.input_embeddings(inp.params).device)
        distance = GradientDistance([inp.gradients[n] for n in names], "l2")
        obj = Objective(replica, inp.params, names, distance, layout)
        table = obj.table
        num_labels = max(2, spec.num_labels)

        x = random_embeddings((b, length, table.shape[1]), table, gen).requires_grad_(True)
        z = torch.randn(b, num_labels, generator=gen).to(table.device).requires_grad_(True)
        opt = torch.optim.LBFGS(
            [x, z], lr=self.lr, max_iter=20, history_size=self.history_size, line_search_fn="strong_wolfe"
        )
        state: dict[str, Any] = {"evals": 0, "first": math.nan, "last": math.nan, "best": math.inf,
                                 "x": x.detach().clone(), "z": z.detach().clone(), "timed": False}

        def closure() -> torch.Tensor:
            if state["evals"] >= self.max_steps:
                raise OutOfBudget
            if late(deadline):
                state["timed"] = True
                raise OutOfBudget
            opt.zero_grad()
            grads = obj.grads_embeds(x, z.softmax(-1), create_graph=True)
            loss = distance(grads)
            dx, dz = torch.autograd.grad(loss, [x, z])
            x.grad, z.grad = dx, dz
            value = float(loss.detach())
            state["last"] = value
            if state["evals"] == 0:
                state["first"] = value
            state["evals"] += 1
            if math.isfinite(value) and value < state["best"]:
                state.update(best=value, x=x.detach().clone(), z=z.detach().clone())
            return loss.detach()

        iterations = 0
        try:
            while True:
                opt.step(closure)
                iterations += 1
                if not math.isfinite(state["last"]):
                    break  # diverged: keep the best point seen
        except OutOfBudget:
            pass
        labels = state["z"].argmax(-1)
        ids = nearest_tokens(state["x"], table, torch.arange(table.shape[0], device=table.device), 1)[..., 0]
        with torch.no_grad():
            proj, rel = obj.score_ids(ids, labels)
        info = {
            "steps": state["evals"],
            "iterations": iterations,
            "init_distance": round(state["first"], 8),
            "continuous_distance": round(state["best"], 8),
            "distance": round(proj, 8),
            "relative_distance": round(rel, 8),
            "length": length,
            "length_source": source,
            "seconds": round(time.monotonic() - start, 3),
        }
        timed_out = bool(state["timed"]) and budget.audit_bound
        if timed_out:
            info["progress"] = f"{state['evals']} of {self.max_steps} gradient evaluations"
        return Reconstruction(
            attack=self.name,
            sequences=layout.sequences(ids),
            labels=[int(v) for v in labels.tolist()],
            labels_aligned=True,
            info=info,
            timed_out=timed_out,
        )
