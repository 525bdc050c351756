"""Finding the Hugging Face model inside a LightningModule, and naming its parameters.

Every text family (:mod:`leak_audit.models.bert`, and the decoder families to come) starts from the
outermost ``transformers.PreTrainedModel`` inside the audited root (:func:`find_hf_model`) and names its
tensors *root-relative* (:func:`join_names`), looking through ``peft`` wrappers (:func:`unwrap_linear`).
:class:`UnsupportedModelError` is the one error every part of :mod:`leak_audit.models` raises for a model
it cannot read.
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "UnsupportedModelError",
    "base_model",
    "classifier_names",
    "dropout_p",
    "find_hf_model",
    "join_names",
    "linear_weight_names",
    "lm_head_name",
    "projection_weights",
    "special_token_ids",
    "unwrap_linear",
    "weight_name",
]


class UnsupportedModelError(TypeError):
    """The model's architecture is not one the attacks know how to read.

    Raised at ``setup`` (by :func:`~leak_audit.models.text_model_spec`,
    :func:`~leak_audit.models.find_image_network`, ...); the message names the model and what was expected.
    """


def join_names(*parts: str) -> str:
    """Dotted module/parameter name from its non-empty ``parts``: ``join_names("", "bert", "embeddings")``
    is ``"bert.embeddings"``."""
    return ".".join(p for p in parts if p)


def unwrap_linear(module: nn.Module) -> nn.Module:
    """The layer a ``peft`` LoRA wrapper holds as ``base_layer`` (the original ``nn.Linear``), or ``module``
    itself when it is not wrapped."""
    return getattr(module, "base_layer", module)


def find_hf_model(root: nn.Module) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` of the outermost Hugging Face ``PreTrainedModel`` inside ``root``.

    Args:
        root: the audited module (usually the LightningModule); ``name`` is relative to it (``""`` when
            ``root`` is the model).

    Raises:
        UnsupportedModelError: if ``root`` contains no ``transformers.PreTrainedModel``.
        ImportError: ``transformers`` is not installed.
    """
    from transformers import PreTrainedModel

    for name, module in root.named_modules():
        if isinstance(module, PreTrainedModel):
            return name, module
    raise UnsupportedModelError(
        f"{type(root).__name__} contains no Hugging Face PreTrainedModel; the text attacks need one "
        "(e.g. `self.model = AutoModelForSequenceClassification.from_pretrained(...)`)."
    )


def classifier_names(
    hf: nn.Module, hf_name: str, num_labels: int, marker: str = "classifier"
) -> tuple[str | None, str | None]:
    """Root-relative ``(weight, bias)`` names of a sequence classifier's output layer, or ``None``\\ s.

    The output layer is the *last* ``nn.Linear`` (looking through ``peft`` wrappers) whose module name
    contains ``marker`` and which has ``num_labels`` outputs: weight ``[C, d]``, bias ``[C]`` (``None``
    without a bias). ``marker`` is ``"classifier"`` for the BERT family (``classifier`` or
    ``classifier.out_proj``).
    """
    weight = bias = None
    for name, module in hf.named_modules():
        lin = unwrap_linear(module)
        if marker in name and isinstance(lin, nn.Linear) and lin.out_features == num_labels:
            suffix = "base_layer." if lin is not module else ""
            weight = join_names(hf_name, name, suffix + "weight")
            bias = join_names(hf_name, name, suffix + "bias") if lin.bias is not None else None
    return weight, bias


def base_model(hf: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the base model inside ``hf`` (``hf.base_model``; name ``""`` when it is ``hf``)."""
    base = getattr(hf, "base_model", hf)
    return next((n for n, m in hf.named_modules() if m is base), ""), base


def lm_head_name(hf: nn.Module, hf_name: str, word: nn.Parameter) -> tuple[str | None, bool]:
    """Root-relative name of the LM head's weight (``get_output_embeddings``; ``None`` without one) and
    whether it *is* the input embedding ``word`` (tied embeddings)."""
    try:
        head = hf.get_output_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        return None, False
    weight = getattr(head, "weight", None)
    if weight is None:
        return None, False
    name = next((n for n, p in hf.named_parameters() if p is weight), None)
    return (join_names(hf_name, name) if name is not None else None), weight is word


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def linear_weight_names(layer: nn.Module, prefix: str) -> tuple[str, ...]:
    """Root-relative names of every weight of ``layer``'s linear maps: its parameters named ``*weight`` outside
    its normalisation modules (``peft``'s ``base_layer``, ``lora_A`` and ``lora_B`` included); ``prefix`` is the
    layer's root-relative module name."""
    norms = [n for n, m in layer.named_modules() if _is_norm(m)]
    return tuple(
        join_names(prefix, n) for n, _ in layer.named_parameters()
        if n.endswith("weight") and not any(n.startswith(p + ".") for p in norms)
    )


def projection_weights(parent: nn.Module, names: tuple[str, ...], prefix: str) -> tuple[list[str], list[int]]:
    """Root-relative weight names and output sizes of the linear maps ``parent.<name>`` (``prefix``: the
    parent's root-relative module name), looking through ``peft`` wrappers (``base_layer.weight``); an output
    size is 0 when unknown."""
    weights, dims = [], []
    for name in names:
        wrapped = getattr(parent, name)
        inner = unwrap_linear(wrapped)
        weights.append(join_names(prefix, name, "base_layer.weight" if inner is not wrapped else "weight"))
        dims.append(int(getattr(inner, "out_features", 0) or 0))
    return weights, dims


def weight_name(layer: nn.Module, prefix: str, path: str) -> str | None:
    """Root-relative weight name of the linear map ``layer.<path>`` (``prefix``: the layer's root-relative name),
    through ``peft``'s ``base_layer``; ``None`` when the layer has no such module."""
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        return None
    return join_names(prefix, path, "base_layer.weight" if unwrap_linear(module) is not module else "weight")


def dropout_p(module: nn.Module, path: str) -> float:
    """``p`` of the dropout module at ``path`` inside ``module``; 0 without one."""
    try:
        return float(module.get_submodule(path).p)  # type: ignore[arg-type]
    except AttributeError:
        return 0.0


def special_token_ids(config: object, vocab_size: int, names: tuple[str, ...] = ("pad", "bos", "eos")) -> frozenset[int]:
    """The ids ``config.<name>_token_id`` for ``names`` that are integers inside the vocabulary."""
    ids = (getattr(config, f"{n}_token_id", None) for n in names)
    return frozenset(int(i) for i in ids if isinstance(i, int) and 0 <= i < vocab_size)
