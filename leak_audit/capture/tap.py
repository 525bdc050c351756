"""Choose the submodules whose parameter gradients are audited, and read those gradients.

A *tap* is the set of trainable parameters of the selected submodules. Selection accepts, for each
pattern:

* an exact module name relative to the audited root (``"model.bert.encoder.layer.0.attention.self.query"``);
* a dotted suffix of one (``"bert.encoder.layer.0.attention.self.query"``), so names written against the
  Hugging Face model work when it sits in a LightningModule attribute;
* a glob (``"*.attention.self.query"``, ``"bert.encoder.layer.[01].*"``), matched against full names and
  their dotted suffixes;
* ``"*"`` (or ``None`` for the whole list): the whole model;
* ``"peft"``: every trainable module of a ``peft`` model, i.e. what PEFT training updates and shares: the
  adapters (LoRA ``lora_A``/``lora_B``, bottleneck adapters, ...) and the ``modules_to_save`` copies (e.g.
  the classifier head). Adapter globs such as ``"*.lora_A*"`` or ``"*lora*"`` select parts of it.

Only trainable parameters are ever tapped: the frozen base weights of a PEFT model (``base_layer``,
``original_module``) never are, and a pattern that names only frozen modules is an error that says so.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "PEFT", "GradientTap", "LocalGradientCapture", "ModuleSelectionError", "peft_modules", "select_modules",
    "trainable_modules",
]

_GLOB_CHARS = set("*?[")


class ModuleSelectionError(ValueError):
    """A module pattern matched nothing, or matched only modules without trainable parameters."""


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _matches(pattern: str, name: str) -> bool:
    if pattern in ("*", ""):
        return True
    if _GLOB_CHARS & set(pattern):
        return any(fnmatch.fnmatchcase(s, pattern) for s in _suffixes(name)) if name else False
    return name == pattern or name.endswith("." + pattern)


def _suggest(pattern: str, names: Sequence[str], n: int = 5) -> list[str]:
    """Closest real module names to ``pattern`` (compared on full names and on dotted suffixes)."""
    bare = pattern.replace("*", "")
    scored = {
        name: max(difflib.SequenceMatcher(None, bare, s).ratio() for s in _suffixes(name)) for name in names if name
    }
    ranked = sorted(scored, key=lambda k: (-scored[k], len(k)))
    return ranked[:n]


PEFT = "peft"
"""The pattern that selects every trainable module of a ``peft`` model."""


def peft_modules(root: nn.Module) -> list[str]:
    """Names of the ``peft`` modules inside ``root`` that hold trainable parameters: adapter layers
    (``BaseTunerLayer``: LoRA, IA³, bottleneck adapters, ...) and ``modules_to_save`` wrappers.
    Empty when ``peft`` is not installed or ``root`` has none."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [
        name for name, m in root.named_modules()
        if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper) and any(p.requires_grad for p in m.parameters())
    ]


def trainable_modules(root: nn.Module, names: Iterable[str]) -> list[str]:
    """The module names among ``names`` (exact, relative to ``root``) that hold a trainable parameter: a default
    view (e.g. :meth:`~leak_audit.models.TextModelSpec.decoder_view`) keeps what a run trains, so under LoRA the
    frozen LM head drops out instead of failing the selection.

    Raises:
        ModuleSelectionError: none of ``names`` holds a trainable parameter (the message lists them).
    """
    names = list(names)
    kept = [n for n in names if any(p.requires_grad for p in root.get_submodule(n).parameters())]
    if not kept:
        raise ModuleSelectionError(f"none of the default modules {names} holds a trainable parameter; pass modules= "
                                   f"(e.g. {PEFT!r} for a peft model)")
    return kept


def select_modules(root: nn.Module, patterns: str | Iterable[str] | None) -> dict[str, nn.Module]:
    """Resolve ``patterns`` to the submodules of ``root`` they name.

    Args:
        root: the audited module (usually the LightningModule).
        patterns: one pattern, several, or ``None`` for the whole model. See the module docstring.

    Returns:
        ``{module_name: module}`` in ``root.named_modules()`` order, without modules nested in an already
        selected one (their parameters are covered by the parent).

    Raises:
        ModuleSelectionError: a pattern matches no module (the message lists the closest names), or
            selects modules with no trainable parameter (the message says they are frozen).
    """
    if patterns is None:
        patterns = ["*"]
    elif isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ModuleSelectionError("`modules` is empty; pass module names or globs, or None for the whole model.")
    all_modules = dict(root.named_modules())
    names = list(all_modules)
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ModuleSelectionError(f"module patterns must be strings, got {pattern!r}")
        if pattern == PEFT:
            hits = peft_modules(root)
            if not hits:
                raise ModuleSelectionError(
                    f"modules={PEFT!r} selects the trainable adapters of a peft model, but {type(root).__name__} has "
                    "none with trainable parameters (wrap the model with peft.get_peft_model, or name modules)"
                )
        else:
            hits = [n for n in names if _matches(pattern, n)] if pattern not in ("*", "") else [""]
        if not hits:
            close = _suggest(pattern, names)
            raise ModuleSelectionError(
                f"module pattern {pattern!r} matches no submodule of {type(root).__name__}. "
                f"Closest module names: {', '.join(close)}"
            )
        trainable = [n for n in hits if any(p.requires_grad for p in all_modules[n].parameters())]
        if not trainable:
            has_params = [n for n in hits if any(True for _ in all_modules[n].parameters())]
            why = (
                "its parameters are frozen (requires_grad=False)"
                if has_params
                else "it has no parameters (e.g. a dropout or activation module)"
            )
            hint = ""
            if has_params and peft_modules(root):
                hint = (f" This is a peft model, whose base weights are frozen: tap its adapters with modules={PEFT!r} "
                        "or a glob such as '*lora*'.")
            raise ModuleSelectionError(
                f"module pattern {pattern!r} matches {hits[:3]}{' ...' if len(hits) > 3 else ''} but {why}; "
                f"only trainable parameters have gradients to audit.{hint}"
            )
        for n in trainable:
            chosen[n] = all_modules[n]
    # Drop modules nested inside another selected module.
    ordered = [n for n in names if n in chosen]
    top = [n for n in ordered if not any(o != n and (o == "" or n.startswith(o + ".")) for o in ordered)]
    return {n: chosen[n] for n in top}


class GradientTap:
    """The trainable parameters of the selected modules, and a way to copy their gradients.

    Args:
        root: the audited module.
        patterns: module names or globs, see :func:`select_modules`.

    Attributes:
        modules: the selected module names.
        parameters: ``{parameter_name: parameter}`` of the trainable tapped parameters, with names
            relative to ``root``.
    """

    def __init__(self, root: nn.Module, patterns: str | Iterable[str] | None) -> None:
        self.modules = tuple(select_modules(root, patterns))
        selected = set(self.modules)
        self.parameters: dict[str, nn.Parameter] = {}
        for name, param in root.named_parameters():
            if param.requires_grad and any(m == "" or name.startswith(m + ".") for m in selected):
                self.parameters[name] = param

    @property
    def numel(self) -> int:
        """Number of tapped scalar parameters."""
        return sum(p.numel() for p in self.parameters.values())

    def capture(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Copy the current ``.grad`` of the tapped parameters (all, or ``names``).

        Parameters without a gradient (unused in this step) are left out. The copies are detached and
        independent of later in-place updates.
        """
        keys = self.parameters.keys() if names is None else names
        out = {}
        for name in keys:
            grad = self.parameters[name].grad
            if grad is not None:
                out[name] = grad.detach().clone()
        return out


class LocalGradientCapture:
    """This process's own gradient of chosen parameters, read by tensor hooks during backward.

    Under DDP the reducer all-reduces ``.grad`` across ranks, so ``.grad`` at the optimizer step holds the
    average over every rank's batch. What one rank *contributes* (what a federated client would send) is the
    gradient its own backward computes, before that all-reduce: a hook on each parameter tensor sees it
    (hooks run before the gradient is accumulated into ``.grad`` and before DDP's reducer). Summed over the
    micro-batches of an accumulation window it is the local gradient of the whole step (Lightning already
    scales each micro-batch's loss by ``1 / accumulate_grad_batches``). Gradient clipping acts later, on the
    reduced gradient, so this is the gradient before clipping.

    Args:
        parameters: ``{name: parameter}`` to watch.

    Usage: ``arm(names)`` before the first backward of the step, ``take()`` after the last one; hooks are
    registered only between the two, so steps that are not audited cost nothing.
    """

    def __init__(self, parameters: dict[str, nn.Parameter]) -> None:
        self.parameters = parameters
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sums: dict[str, torch.Tensor] = {}

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, names: Iterable[str]) -> None:
        """Start summing the gradients of ``names`` (a subset of ``parameters``); re-arming restarts."""
        self.take()
        for name in names:
            self._handles.append(self.parameters[name].register_hook(self._hook(name)))

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def add(grad: torch.Tensor) -> None:
            g = grad.detach()
            self._sums[name] = self._sums[name] + g if name in self._sums else g.clone()

        return add

    def take(self) -> dict[str, torch.Tensor]:
        """The summed local gradients since ``arm`` (parameters that got none are left out); disarms."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        out, self._sums = self._sums, {}
        return out
