"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) inserted into a ``transformers`` ViT.

An adapter is ``a(y) = W_up · relu(W_down · y + b_down) + b_up`` added to the output ``y`` of a sublayer's
output projection, before the residual connection: ``y + a(y)``. Houlsby placement puts one after the
attention output projection and one after the MLP's second linear layer in every Transformer layer;
Pfeiffer placement only the MLP one. :func:`add_bottleneck_adapters` freezes every backbone weight, so
the adapters (and optionally the classifier head) are all that trains: parameter-efficient fine-tuning
(PEFT) of a vision Transformer, the setting of PEFTLeak (Sami et al., CVPR 2025).

``peft`` has no bottleneck adapters, hence this module; LoRA on ViTs comes from ``peft`` as for text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["AdaptedLinear", "AdapterSite", "BottleneckAdapter", "add_bottleneck_adapters", "vit_layers"]

PLACEMENTS = ("houlsby", "pfeiffer")


class BottleneckAdapter(nn.Module):
    """``a(y) = up(relu(down(y)))`` with ``down: D → r`` and ``up: r → D`` (both with bias).

    Shapes: ``[..., D]`` to ``[..., D]``. The up-projection starts at zero (the adapted model starts equal
    to the backbone), the down-projection with PyTorch's default initialisation.

    Raises:
        ValueError: ``hidden_size`` or ``r`` below 1.
    """

    def __init__(self, hidden_size: int, r: int) -> None:
        super().__init__()
        if hidden_size < 1 or r < 1:
            raise ValueError(f"hidden_size and r must be >= 1, got hidden_size={hidden_size}, r={r}")
        self.down = nn.Linear(hidden_size, r)
        self.up = nn.Linear(r, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: Tensor) -> Tensor:
        return self.up(torch.relu(self.down(y)))


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` followed by a bottleneck adapter with a skip connection: ``y + adapter(y)``."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__()
        self.base = base
        self.adapter = BottleneckAdapter(base.out_features, r)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y + self.adapter(y)


@dataclass(frozen=True)
class AdapterSite:
    """Where one adapter sits: Transformer layer ``layer``, after ``"attention"`` or ``"mlp"``; ``name`` is
    the adapter module's qualified name (its parameters are ``{name}.down.weight`` etc.)."""

    name: str
    layer: int
    sublayer: str


def vit_layers(model: nn.Module) -> list[nn.Module]:
    """The Transformer layers of a ``transformers`` ViT (``ViTModel`` or ``ViTForImageClassification``).

    Raises:
        ValueError: ``model`` has no ViT encoder layers with ``attention.o_proj`` and ``mlp.fc2`` (the
            ``transformers`` ≥ 5 layout).
    """
    layers = [m for m in model.modules() if _linear(m, "attention.o_proj") is not None and _linear(m, "mlp.fc2") is not None]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no ViT layers with attention.o_proj and mlp.fc2 (the transformers >= 5 "
            "ViT layout); pass a transformers ViTModel or ViTForImageClassification"
        )
    return layers


def _linear(module: nn.Module, path: str) -> nn.Module | None:
    m: nn.Module | None = module
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m if isinstance(m, nn.Linear | AdaptedLinear) else None


def add_bottleneck_adapters(
    model: nn.Module, r: int = 64, placement: str = "houlsby", train_head: bool = True
) -> list[AdapterSite]:
    """Insert bottleneck adapters into every layer of a ViT in place and freeze the backbone.

    Args:
        model: a ``transformers`` ViT (``ViTModel`` / ``ViTForImageClassification``).
        r: bottleneck dimension (adapter units per site).
        placement: ``"houlsby"`` (after attention and after the MLP) or ``"pfeiffer"`` (after the MLP).
        train_head: keep the classifier head (``model.classifier``) trainable.

    Returns:
        The adapter sites in forward order.

    Raises:
        ValueError: unknown ``placement``, ``r < 1``, adapters already present, or not a ViT (see
            :func:`vit_layers`).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    layers = vit_layers(model)
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError("the model already has bottleneck adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    names = {id(m): n for n, m in model.named_modules()}
    sites: list[AdapterSite] = []
    for i, layer in enumerate(layers):
        targets = [("attention", layer.attention, "o_proj")] if placement == "houlsby" else []
        targets.append(("mlp", layer.mlp, "fc2"))
        for sublayer, parent, attr in targets:
            adapted = AdaptedLinear(getattr(parent, attr), r)
            setattr(parent, attr, adapted)
            sites.append(AdapterSite(f"{names[id(parent)]}.{attr}.adapter", i, sublayer))
    head = getattr(model, "classifier", None)
    if train_head and isinstance(head, nn.Module):
        for p in head.parameters():
            p.requires_grad_(True)
    return sites
