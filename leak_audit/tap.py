"""Choose the submodules whose parameter gradients are audited, and read those gradients.

A *tap* is the set of trainable parameters of the selected submodules. Selection accepts, for each
pattern:

* an exact module name relative to the audited root (``"model.bert.encoder.layer.0.attention.self.query"``);
* a dotted suffix of one (``"bert.encoder.layer.0.attention.self.query"``), so names written against the
  Hugging Face model work when it sits in a LightningModule attribute;
* a glob (``"*.attention.self.query"``, ``"bert.encoder.layer.[01].*"``), matched against full names and
  their dotted suffixes;
* ``"*"`` (or ``None`` for the whole list): the whole model.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["ModuleSelectionError", "GradientTap", "select_modules"]

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
            raise ModuleSelectionError(
                f"module pattern {pattern!r} matches {hits[:3]}{' ...' if len(hits) > 3 else ''} but {why}; "
                "only trainable parameters have gradients to audit."
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
