"""A private, functional copy of an image classifier that image attacks run at snapshot parameters.

The image counterpart of :class:`~leak_audit.models.replica.ModelReplica`: attacks compute the gradient a
*candidate* image batch would produce, at the parameter values of the audited step, without touching
the live model (training keeps running). Any ``nn.Module`` that maps ``[B, C, H, W]`` images to
``[B, K]`` logits works (a CNN, a ``transformers`` ViT wrapped to return logits, a peft model).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from leak_audit.models.replica import local_names, parameter_gradients

__all__ = ["ImageReplica", "cross_entropy"]


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Batch-mean cross-entropy for hard labels ``[B]`` (class ids) or soft labels ``[B, K]`` (probabilities)."""
    if labels.dim() == 2:
        return -(labels * logits.log_softmax(-1)).sum(-1).mean()
    return nn.functional.cross_entropy(logits, labels)


class ImageReplica:
    """Functional forward/backward of an image classifier on snapshot parameters.

    The copy shares the live model's parameter storage behind its own ``requires_grad=False``
    parameters (no memory is duplicated); parameters that training changes must be passed in ``params``.

    Args:
        model: the live classifier, ``images [B, C, H, W] -> logits [B, K]`` (an output with a
            ``.logits`` attribute, as from ``transformers``, works too).
        loss: ``(logits, labels) -> scalar``; default :func:`cross_entropy` (batch mean).
        prefix: the model's module name inside the audited root (``""``: the model is the root);
            parameter names given to and returned by this class are then root-relative
            (``prefix + "." + local``), as in :class:`~leak_audit.models.replica.ModelReplica`.
        device: where the replica runs (``None``: where the model is); see
            :class:`~leak_audit.models.replica.ModelReplica`.

    Attributes:
        parameter_names: every parameter's (root-relative) name.
        trainable: names of the parameters that train (``requires_grad``); a snapshot must hold their values.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
        prefix: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
        self.model = copy.deepcopy(model, memo).eval()
        if device is not None:
            self.model.to(device)
        self.loss = loss
        self.prefix = prefix + "." if prefix else ""
        self.parameter_names = tuple(self.prefix + n for n, _ in model.named_parameters())
        self.trainable = frozenset(self.prefix + n for n, p in model.named_parameters() if p.requires_grad)

    def logits(self, params: Mapping[str, Tensor], images: Tensor) -> Tensor:
        """Logits ``[B, K]`` of ``images`` ``[B, C, H, W]`` at ``params`` (root-relative names; eval mode)."""
        out = functional_call(self.model, local_names(params, self.prefix), args=(images,), strict=False)
        return out.logits if hasattr(out, "logits") else out

    def gradients(
        self,
        params: Mapping[str, Tensor],
        names: Sequence[str],
        images: Tensor,
        labels: Tensor,
        *,
        create_graph: bool = False,
    ) -> list[Tensor]:
        """``∂loss/∂param`` for each name in ``names`` at ``params`` on ``(images, labels)``.

        With ``create_graph=True`` the result is differentiable w.r.t. ``images`` and soft ``labels``.

        Raises:
            KeyError: a name is not a parameter of the model.
        """
        return parameter_gradients(
            params, names, self.parameter_names, lambda values: self.loss(self.logits(values, images), labels),
            create_graph=create_graph,
        )
