"""Recompute an audited step's gradient with dropout off: the worst-case attacker.

The gradient a model releases in training mode carries dropout noise, which breaks exact span checks.
An attacker who controls the model (a malicious server) can ask for dropout-free gradients. With
``recompute="eval"`` the audit re-runs forward and backward on the snapshot in eval mode, on a private
copy of the Hugging Face model, with the snapshot's parameter values, and attacks that gradient instead.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from leak_audit.batch import TextBatch

__all__ = ["EvalRecompute"]


class EvalRecompute:
    """Dropout-off gradients of a Hugging Face model on a snapshot.

    The loss is the model's own ``.loss`` for ``labels`` (cross-entropy, mean over the batch), as in
    ``AutoModelForSequenceClassification``.

    Args:
        hf_model: the live Hugging Face model; a deep copy is kept (in eval mode, no gradients stored).
        prefix: its module name inside the audited root (``""`` if it is the root).
    """

    def __init__(self, hf_model: nn.Module, prefix: str) -> None:
        self.model = copy.deepcopy(hf_model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.prefix = prefix + "." if prefix else ""
        self.trainable = {self.prefix + n for n, p in hf_model.named_parameters() if p.requires_grad}

    def __call__(self, params: Mapping[str, Tensor], batch: TextBatch, names: Collection[str]) -> dict[str, Tensor]:
        """Gradients ``{name: grad}`` of ``names`` at parameter values ``params`` on ``batch``.

        Args:
            params: snapshot values of (at least) every trainable parameter of the model, by root name.
            batch: the audited batch; ``labels`` are required.
            names: root-relative parameter names to differentiate.

        Raises:
            ValueError: the batch has no labels, or a name is outside the Hugging Face model.
        """
        if batch.labels is None:
            raise ValueError("recompute='eval' needs the batch's labels to compute the loss")
        n = len(self.prefix)
        outside = [k for k in names if not k.startswith(self.prefix)]
        if outside:
            raise ValueError(f"cannot recompute gradients of parameters outside the Hugging Face model: {outside}")
        local = {k[n:]: v.detach() for k, v in params.items() if k.startswith(self.prefix)}
        wanted = [k[n:] for k in names]
        for k in wanted:
            local[k] = local[k].clone().requires_grad_(True)
        kwargs = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "labels": batch.labels,
        }
        if batch.token_type_ids is not None:
            kwargs["token_type_ids"] = batch.token_type_ids
        with torch.enable_grad():
            out = functional_call(self.model, local, args=(), kwargs=kwargs, strict=False)
            grads = torch.autograd.grad(out.loss, [local[k] for k in wanted], allow_unused=True)
        return {self.prefix + k: g for k, g in zip(wanted, grads, strict=True) if g is not None}
