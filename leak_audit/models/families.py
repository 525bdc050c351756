"""The registry of text architecture families, and :func:`text_model_spec`, which dispatches to them.

Each family lives in its own module and exports a :class:`~leak_audit.models.spec.TextFamily`
(:data:`~leak_audit.models.bert.BERT_FAMILY`, :data:`~leak_audit.models.llama.LLAMA_FAMILY`,
:data:`~leak_audit.models.gpt2.GPT2_FAMILY`, :data:`~leak_audit.models.distilbert.DISTILBERT_FAMILY`). Adding an architecture is one new module that builds a
:class:`~leak_audit.models.spec.TextModelSpec`, plus one line here (or a :func:`register_family` call), plus
its tests.
"""

from __future__ import annotations

from torch import nn

from leak_audit.models.bert import BERT_FAMILY
from leak_audit.models.distilbert import DISTILBERT_FAMILY
from leak_audit.models.generic import generic_model_spec, plain_model_spec
from leak_audit.models.gpt2 import GPT2_FAMILY
from leak_audit.models.hf import UnsupportedModelError, find_hf_model
from leak_audit.models.llama import LLAMA_FAMILY
from leak_audit.models.spec import TextFamily, TextModelSpec

__all__ = ["register_family", "text_families", "text_model_spec", "unregister_family", "unsupported_message"]

_FAMILIES: list[TextFamily] = [BERT_FAMILY, DISTILBERT_FAMILY, LLAMA_FAMILY, GPT2_FAMILY]


def text_families() -> tuple[TextFamily, ...]:
    """The registered families, in the order :func:`text_model_spec` asks them."""
    return tuple(_FAMILIES)


def register_family(family: TextFamily, *, first: bool = False) -> TextFamily:
    """Register ``family`` (after the others, or before them with ``first=True``) and return it.

    Raises:
        ValueError: a family with the same name is already registered.
    """
    if any(f.name == family.name for f in _FAMILIES):
        raise ValueError(f"a text family named {family.name!r} is already registered")
    if first:
        _FAMILIES.insert(0, family)
    else:
        _FAMILIES.append(family)
    return family


def unregister_family(name: str) -> None:
    """Remove the family called ``name``.

    Raises:
        KeyError: no family has that name.
    """
    for i, family in enumerate(_FAMILIES):
        if family.name == name:
            del _FAMILIES[i]
            return
    raise KeyError(f"no text family named {name!r}; registered: {[f.name for f in _FAMILIES]}")


def unsupported_message(hf: nn.Module) -> str:
    """Why no family reads ``hf``: its class and ``config.model_type``, and each family with what it covers."""
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    supported = "; ".join(f"{f.name} ({f.description})" for f in _FAMILIES)
    return (
        f"{type(hf).__name__} (model_type {model_type!r}) is not an architecture the text attacks can read; "
        f"supported families: {supported or 'none registered'}."
    )


def text_model_spec(root: nn.Module, *, generic: bool = False) -> TextModelSpec:
    """Build the :class:`~leak_audit.models.spec.TextModelSpec` of the Hugging Face text model inside ``root``.

    The first registered family whose ``matches`` accepts the model builds the spec.

    Args:
        root: the audited module (usually the LightningModule).
        generic: when no family matches, return the ``"generic"`` spec of
            :func:`~leak_audit.models.generic.generic_model_spec` (no layers: the model-agnostic attacks only)
            instead of raising; without a Hugging Face model, that of a plain ``nn.Module`` language model
            (:func:`~leak_audit.models.generic.plain_model_spec`).

    Raises:
        UnsupportedModelError: no Hugging Face model inside ``root``; no family matches and not ``generic``
            (the message names the model class, its ``model_type`` and the supported families), or the model
            has no input embedding; or the matching family misses a part the attacks need.
    """
    try:
        hf_name, hf = find_hf_model(root)
    except UnsupportedModelError:
        if generic:  # a plain nn.Module language model
            return plain_model_spec(root)
        raise
    for family in _FAMILIES:
        if family.matches(hf):
            return family.build(hf_name, hf)
    if generic:
        return generic_model_spec(hf_name, hf)
    raise UnsupportedModelError(unsupported_message(hf))
