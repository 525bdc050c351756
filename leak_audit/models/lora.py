"""Discovery of ``peft`` LoRA adapters on linear layers (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022).

An adapted layer computes ``y = W x + scaling · B A x`` with ``W`` frozen; the span-check attacks read
``∂L/∂A`` and ``∂L/∂B`` (DAGER's LoRA mode). :func:`lora_specs` finds every active adapter by the
attributes ``peft`` puts on the wrapped layer (``lora_A``, ``lora_B``, ``scaling``, ``lora_dropout``),
so it works for any architecture family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leak_audit.models.hf import join_names

__all__ = ["LoraSpec", "lora_specs"]


@dataclass(frozen=True)
class LoraSpec:
    """One active LoRA adapter on a linear layer (``peft``): ``y = W x + scaling · B A x``.

    Attributes:
        module: module name of the adapted linear layer, e.g. ``"...layer.0.attention.self.query"``.
        a: parameter name of ``A`` (``lora_A``), shape ``[r, d_in]``.
        b: parameter name of ``B`` (``lora_B``), shape ``[d_out, r]``.
        scaling: ``lora_alpha / r`` (or ``/ √r`` with rsLoRA).
        rank: ``r``.
        dropout: ``lora_dropout`` probability applied to ``x`` before ``A`` in training mode.
    """

    module: str
    a: str
    b: str
    scaling: float
    rank: int
    dropout: float = 0.0


def lora_specs(root: nn.Module, prefix: str = "") -> tuple[LoraSpec, ...]:
    """The active LoRA adapters on linear layers inside ``root`` (names relative to ``root``, with
    ``prefix`` prepended), in module order. Empty without ``peft`` adapters."""
    out = []
    for name, module in root.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        active = getattr(module, "active_adapters", None) or list(lora_a.keys())
        for adapter in ([active] if isinstance(active, str) else active):
            if adapter not in lora_a or not isinstance(lora_a[adapter], nn.Linear):
                continue
            drops = getattr(module, "lora_dropout", None)
            drop = drops[adapter] if isinstance(drops, nn.ModuleDict) and adapter in drops else None
            mod_name = join_names(prefix, name)
            out.append(LoraSpec(
                module=mod_name,
                a=join_names(mod_name, "lora_A", adapter, "weight"),
                b=join_names(mod_name, "lora_B", adapter, "weight"),
                scaling=float(getattr(module, "scaling", {}).get(adapter, 1.0)),
                rank=int(lora_a[adapter].out_features),
                dropout=float(getattr(drop, "p", 0.0) or 0.0),
            ))
    return tuple(out)
