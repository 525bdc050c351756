"""Gradient views of ``leak-audit bench text``: which parameters' gradients the attacker observes.

A view is ``full`` (every trainable parameter), ``lora`` (the LoRA adapters alone), ``layer:K`` (every
parameter of encoder layer ``K``) or ``linear:NAME`` (the weight and bias of one module).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from leak_audit.cli.bench.common import BenchError, parse_list
from leak_audit.models import UnsupportedModelError, text_model_spec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["View", "resolve_view", "resolve_views"]


@dataclass(frozen=True)
class View:
    """The parameters whose gradients the attacker observes.

    Attributes:
        name: the view string as given (``"full"``, ``"layer:0"``, ``"linear:<module>"``).
        parameters: names of the tapped parameters (keys of ``model.named_parameters()``), model order.
        numel: number of tapped scalars.
        total: number of scalars of the whole model (frozen parameters included).
    """

    name: str
    parameters: tuple[str, ...]
    numel: int
    total: int

    @property
    def params_fraction(self) -> float:
        """``numel / total``, in ``(0, 1]``."""
        return self.numel / self.total


def _close(value: str, options: Sequence[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(value, options, n=n, cutoff=0.6)
    return close or difflib.get_close_matches(value, options, n=n, cutoff=0.3)


def resolve_view(text: str, model: nn.Module, layer_prefixes: Sequence[str] | None = None) -> View:
    """The :class:`View` a view string names on ``model`` (a Hugging Face model).

    Args:
        text: ``"full"`` (every trainable parameter: on a LoRA model the adapters and the head),
            ``"lora"`` (the ``lora_A``/``lora_B`` weights alone), ``"layer:K"`` or ``"linear:NAME"``
            (``NAME`` a module name of ``model`` that owns a ``weight``, e.g.
            ``"bert.encoder.layer.0.attention.self.query"``).
        model: the Hugging Face model; parameter names are relative to it.
        layer_prefixes: module names of the encoder layers (default: from
            :func:`~leak_audit.models.text_model_spec`).

    Raises:
        BenchError: an unknown view kind, a layer index that is not an integer or out of range, an unknown
            module or one without a weight of its own, or a view without a trainable parameter; the message
            names the bad value and the closest valid ones.
    """
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    kind, sep, arg = text.partition(":")
    if text == "full":
        names = [n for n, p in named.items() if p.requires_grad]
    elif text == "lora":
        from leak_audit.cli.bench.lora import lora_parameter_names

        names = lora_parameter_names(model)
        if not names:
            raise BenchError("view 'lora' taps the LoRA adapters, but the model has none: add --lora-r R")
    elif kind == "layer" and sep:
        if layer_prefixes is None:
            try:
                layer_prefixes = [layer.prefix for layer in text_model_spec(model).layers]
            except UnsupportedModelError as exc:
                raise BenchError(f"view {text!r}: cannot find the encoder layers: {exc}") from None
        valid = ", ".join(f"layer:{i}" for i in range(len(layer_prefixes)))
        if not re.fullmatch(r"\d+", arg):
            raise BenchError(f"view {text!r}: layer index {arg!r} is not a non-negative integer. Valid: {valid}")
        index = int(arg)
        if index >= len(layer_prefixes):
            raise BenchError(
                f"view {text!r}: layer {index} does not exist, the model has {len(layer_prefixes)} encoder layers. "
                f"Valid: {valid}"
            )
        prefix = layer_prefixes[index] + "."
        names = [n for n, p in named.items() if p.requires_grad and n.startswith(prefix)]
    elif kind == "linear" and sep:
        modules = dict(model.named_modules())
        weighted = [n for n, m in modules.items() if n and "weight" in dict(m.named_parameters(recurse=False))]
        if arg not in modules or arg == "":
            close = [w for w in weighted if arg and w.endswith("." + arg)][:6] or _close(arg, weighted)
            raise BenchError(
                f"view {text!r}: no module named {arg!r} in {type(model).__name__}. "
                + (f"Closest module names: {', '.join(close)}" if close else f"Module names look like {weighted[0]!r}")
            )
        if arg not in weighted:
            close = [w for w in weighted if w.startswith(arg + ".")][:6] or _close(arg, weighted)
            raise BenchError(
                f"view {text!r}: module {arg!r} ({type(modules[arg]).__name__}) has no weight of its own; "
                f"linear: takes one module with a weight, e.g. {', '.join(close)} (whole encoder layers: layer:K)"
            )
        own = dict(modules[arg].named_parameters(recurse=False))
        names = [f"{arg}.{local}" for local, p in own.items() if p.requires_grad]
    else:
        if sep:
            close = [f"{k}:{arg}" for k in difflib.get_close_matches(kind, ["layer", "linear"], n=1, cutoff=0.4)]
        elif text in ("layer", "linear"):
            close = [f"{text}:K" if text == "layer" else f"{text}:MODULE_NAME"]
        else:
            close = difflib.get_close_matches(text, ["full", "lora"], n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BenchError(f"unknown view {text!r}.{hint} Views are full, lora, layer:K or linear:MODULE_NAME")
    if not names:
        raise BenchError(f"view {text!r} has no trainable parameter (all requires_grad=False)")
    return View(text, tuple(names), sum(named[n].numel() for n in names), total)


def resolve_views(text: str, model: nn.Module) -> list[View]:
    """Resolve a comma-separated ``--views`` value, see :func:`resolve_view`.

    Raises:
        BenchError: see :func:`parse_list` and :func:`resolve_view`.
    """
    items = parse_list(text, "--views")
    prefixes = None
    if any(i.startswith("layer:") for i in items):
        try:
            prefixes = [layer.prefix for layer in text_model_spec(model).layers]
        except UnsupportedModelError as exc:
            raise BenchError(f"--views: cannot find the encoder layers: {exc}") from None
    return [resolve_view(i, model, prefixes) for i in items]
