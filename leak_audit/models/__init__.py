"""Where the tensors attacks need live inside a user's model.

A :class:`TextModelSpec` is built once, at ``setup``, from the user's LightningModule. It records the
*fully qualified parameter names* (relative to the LightningModule) of the pieces the text attacks use:
the embedding tables and LayerNorm, the first encoder layers' attention projections and the classifier.
Attacks then read gradients and parameter snapshots by these names, so they never touch the live model.

Supported: Hugging Face BERT-family encoders (BERT, MiniLM, RoBERTa, ELECTRA, XLM-R, ... anything whose
base model has ``embeddings.{word,position,token_type}_embeddings``, ``embeddings.LayerNorm`` and
``encoder.layer[i].attention.self.{query,key,value}``), possibly wrapped in a LightningModule attribute
or a ``peft`` model.

Image classifiers are described by an :class:`ImageModelSpec`: which submodule maps images to logits
(:func:`find_image_network`), its parameter names and its last linear layer (the classifier, for label
recovery). :func:`model_modality` says whether a LightningModule is audited as text or images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "MODALITIES",
    "EncoderLayerSpec",
    "ImageModelSpec",
    "LoraSpec",
    "TextModelSpec",
    "UnsupportedModelError",
    "find_hf_model",
    "find_image_network",
    "image_model_spec",
    "lora_specs",
    "model_modality",
    "text_model_spec",
]

MODALITIES: tuple[str, ...] = ("text", "image")
"""What the callback can audit; attacks are registered per modality."""


class UnsupportedModelError(TypeError):
    """The model's architecture is not one the text attacks know how to read."""


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
            mod_name = _join(prefix, name)
            out.append(LoraSpec(
                module=mod_name,
                a=_join(mod_name, "lora_A", adapter, "weight"),
                b=_join(mod_name, "lora_B", adapter, "weight"),
                scaling=float(getattr(module, "scaling", {}).get(adapter, 1.0)),
                rank=int(lora_a[adapter].out_features),
                dropout=float(getattr(drop, "p", 0.0) or 0.0),
            ))
    return tuple(out)


@dataclass(frozen=True)
class EncoderLayerSpec:
    """Parameter names of one Transformer encoder layer's attention input projections.

    Attributes:
        prefix: module name of the layer, e.g. ``"model.bert.encoder.layer.0"``.
        query, key, value: *weight* parameter names of the three projections (each ``[d, d]``).
        modules: module names of ``query``, ``key`` and ``value``.
        lora: the LoRA adapters on these three projections (``peft``), if any.
    """

    prefix: str
    query: str
    key: str
    value: str
    modules: tuple[str, str, str]
    lora: tuple[LoraSpec, ...] = ()

    @property
    def input_projections(self) -> tuple[str, str, str]:
        """The weights whose inputs are this layer's hidden states: (query, key, value)."""
        return (self.query, self.key, self.value)


@dataclass(frozen=True)
class TextModelSpec:
    """Names and constants of a BERT-family text classifier, relative to the audited root module.

    All ``*_weight`` / ``*_embeddings`` fields are parameter names usable as keys of
    ``root.named_parameters()``. Tensor shapes: word embeddings ``[V, d]``, position embeddings
    ``[P, d]``, token-type embeddings ``[T, d]``, LayerNorm weight and bias ``[d]``, classifier
    weight ``[C, d]`` and bias ``[C]``. ``dropout`` is the embedding dropout probability in training mode
    (``hidden_dropout_prob``), which the span check needs to read training-mode gradients.
    """

    hf_prefix: str
    model_type: str
    word_embeddings: str
    position_embeddings: str
    token_type_embeddings: str | None
    norm_weight: str
    norm_bias: str
    norm_eps: float
    layers: tuple[EncoderLayerSpec, ...]
    classifier_weight: str | None
    classifier_bias: str | None
    hidden_size: int
    vocab_size: int
    max_positions: int
    position_offset: int
    num_labels: int
    pad_token_id: int | None
    dropout: float = 0.0
    special_token_ids: frozenset[int] = field(default_factory=frozenset)
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    num_heads: int = 0
    """Attention heads per layer (0: unknown)."""

    @property
    def embedding_params(self) -> tuple[str, ...]:
        """Names of the tensors that define the first layer's inputs (tables and LayerNorm)."""
        names = [self.word_embeddings, self.position_embeddings, self.norm_weight, self.norm_bias]
        if self.token_type_embeddings is not None:
            names.append(self.token_type_embeddings)
        return tuple(names)

    def with_tokenizer(self, tokenizer: Any) -> TextModelSpec:
        """Return a copy that knows the tokenizer's special tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, ...)."""
        if tokenizer is None:
            return self
        special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        cls_id = getattr(tokenizer, "cls_token_id", None)
        sep_id = getattr(tokenizer, "sep_token_id", None)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        return _replace(
            self,
            special_token_ids=special | self.special_token_ids,
            cls_token_id=cls_id if cls_id is not None else self.cls_token_id,
            sep_token_id=sep_id if sep_id is not None else self.sep_token_id,
            pad_token_id=pad_id if pad_id is not None else self.pad_token_id,
        )


def _replace(spec: TextModelSpec, **changes: Any) -> TextModelSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def find_hf_model(root: nn.Module) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` of the outermost Hugging Face ``PreTrainedModel`` inside ``root``.

    Raises:
        UnsupportedModelError: if ``root`` contains no ``transformers.PreTrainedModel``.
    """
    from transformers import PreTrainedModel

    for name, module in root.named_modules():
        if isinstance(module, PreTrainedModel):
            return name, module
    raise UnsupportedModelError(
        f"{type(root).__name__} contains no Hugging Face PreTrainedModel; the text attacks need one "
        "(e.g. `self.model = AutoModelForSequenceClassification.from_pretrained(...)`)."
    )


def _unwrap_linear(module: nn.Module) -> nn.Module:
    """peft's LoRA layers wrap the original Linear as ``base_layer``."""
    return getattr(module, "base_layer", module)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def text_model_spec(root: nn.Module) -> TextModelSpec:
    """Build the :class:`TextModelSpec` of the BERT-family model inside ``root``.

    Args:
        root: the audited module (usually the LightningModule).

    Raises:
        UnsupportedModelError: no Hugging Face model, or one without BERT-style embeddings/encoder.
    """
    hf_name, hf = find_hf_model(root)
    base = getattr(hf, "base_model", hf)
    base_name = next((n for n, m in hf.named_modules() if m is base), "")
    emb = getattr(base, "embeddings", None)
    encoder = getattr(base, "encoder", None)
    needed = ("word_embeddings", "position_embeddings", "LayerNorm")
    if emb is None or encoder is None or not all(hasattr(emb, n) for n in needed):
        raise UnsupportedModelError(
            f"{type(hf).__name__} has no BERT-style `embeddings.{{word_embeddings,position_embeddings,LayerNorm}}`"
            " and `encoder`; the text attacks support BERT-family encoders."
        )
    layer_list = getattr(encoder, "layer", None)
    if layer_list is None:
        raise UnsupportedModelError(f"{type(hf).__name__}.encoder has no `layer` list.")
    prefix = _join(hf_name, base_name)
    emb_prefix = _join(prefix, "embeddings")

    layers = []
    for i, layer in enumerate(layer_list):
        attn = getattr(getattr(layer, "attention", None), "self", None)
        if attn is None or not all(hasattr(attn, p) for p in ("query", "key", "value")):
            raise UnsupportedModelError(f"encoder layer {i} has no attention.self.{{query,key,value}}.")
        lp = _join(prefix, "encoder", "layer", str(i))
        mods = tuple(_join(lp, "attention", "self", p) for p in ("query", "key", "value"))
        weights = []
        for proj_name, mod_name in zip(("query", "key", "value"), mods, strict=True):
            inner = _unwrap_linear(getattr(attn, proj_name))
            suffix = "base_layer.weight" if inner is not getattr(attn, proj_name) else "weight"
            weights.append(_join(mod_name, suffix))
        adapters = tuple(a for a in lora_specs(attn, _join(lp, "attention", "self")) if a.module in mods)
        layers.append(EncoderLayerSpec(lp, weights[0], weights[1], weights[2], mods, adapters))  # type: ignore[arg-type]

    config = hf.config
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    cls_w = cls_b = None
    for name, module in hf.named_modules():
        lin = _unwrap_linear(module)
        if "classifier" in name and isinstance(lin, nn.Linear) and lin.out_features == num_labels:
            suffix = "base_layer." if lin is not module else ""
            cls_w = _join(hf_name, name, suffix + "weight")
            cls_b = _join(hf_name, name, suffix + "bias") if lin.bias is not None else None
    norm = emb.LayerNorm
    model_type = str(getattr(config, "model_type", "bert"))
    pad_id = getattr(config, "pad_token_id", None)
    # RoBERTa-style models number positions from padding_idx + 1.
    offset = int(pad_id) + 1 if model_type in {"roberta", "xlm-roberta", "camembert", "longformer"} else 0
    tt = getattr(emb, "token_type_embeddings", None)
    return TextModelSpec(
        hf_prefix=hf_name,
        model_type=model_type,
        word_embeddings=_join(emb_prefix, "word_embeddings", "weight"),
        position_embeddings=_join(emb_prefix, "position_embeddings", "weight"),
        token_type_embeddings=_join(emb_prefix, "token_type_embeddings", "weight") if tt is not None else None,
        norm_weight=_join(emb_prefix, "LayerNorm", "weight"),
        norm_bias=_join(emb_prefix, "LayerNorm", "bias"),
        norm_eps=float(norm.eps),
        layers=tuple(layers),
        classifier_weight=cls_w,
        classifier_bias=cls_b,
        hidden_size=int(emb.word_embeddings.embedding_dim),
        vocab_size=int(emb.word_embeddings.num_embeddings),
        max_positions=int(emb.position_embeddings.num_embeddings),
        position_offset=offset,
        num_labels=num_labels,
        pad_token_id=int(pad_id) if pad_id is not None else None,
        dropout=float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0),
        special_token_ids=frozenset({int(pad_id)}) if pad_id is not None else frozenset(),
        num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
    )


@dataclass(frozen=True)
class ImageModelSpec:
    """Names and constants of an image classifier, relative to the audited root module.

    Attributes:
        network: module name of the classifier inside the root, images ``[B, C, H, W]`` to logits
            ``[B, K]`` (``""``: the root itself, through its ``forward``).
        model_type: the network's class name.
        parameter_names: every parameter of the network (root-relative names).
        classifier_weight: weight ``[K, d]`` of the network's last ``nn.Linear`` (``None`` without one).
        classifier_bias: its bias ``[K]`` (``None`` without one).
        num_labels: ``K``, the last linear layer's outputs; 0 when unknown (attacks then read it from the
            logits of a forward pass).
    """

    network: str
    model_type: str
    parameter_names: frozenset[str]
    classifier_weight: str | None
    classifier_bias: str | None
    num_labels: int


def _find_hf(root: nn.Module) -> tuple[str, nn.Module] | None:
    try:
        return find_hf_model(root)
    except (UnsupportedModelError, ImportError):
        return None


def model_modality(root: nn.Module) -> str:
    """``"text"`` or ``"image"``: what ``root`` (a LightningModule) is audited as, from its model alone.

    A Hugging Face model inside decides by its ``main_input_name``: ``"input_ids"`` is text,
    ``"pixel_values"`` is images (ViT, ConvNeXt, ...). Without one, ``"image"``: the text attacks need a
    Hugging Face BERT-family model, and any other ``nn.Module`` classifier is audited as an image model.

    Raises:
        UnsupportedModelError: a Hugging Face model whose main input is neither (audio, ...).
    """
    hf = _find_hf(root)
    if hf is None:
        return "image"
    main = getattr(hf[1], "main_input_name", "input_ids")
    if main == "input_ids":
        return "text"
    if main == "pixel_values":
        return "image"
    raise UnsupportedModelError(
        f"{type(hf[1]).__name__} takes {main!r}; leak_audit audits text ('input_ids') and image ('pixel_values') "
        "models"
    )


def _overrides_forward(root: nn.Module) -> bool:
    forward = getattr(type(root), "forward", None)
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover - lightning is a dependency
        return forward is not nn.Module.forward
    return forward not in (nn.Module.forward, LightningModule.forward)


def find_image_network(root: nn.Module, network: str | None = None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the image classifier inside ``root``: the module that maps the training
    images ``[B, C, H, W]`` to logits ``[B, K]``.

    Args:
        root: the audited module (usually the LightningModule).
        network: the classifier's module name inside ``root`` (``""``: ``root`` itself, through its
            ``forward``); ``None`` finds it: (1) a Hugging Face image model (``main_input_name ==
            "pixel_values"``); else (2) the one direct child that holds every trainable parameter
            (``self.model``, ``self.net``, ...); else (3) ``root`` itself when it defines ``forward``.

    Raises:
        UnsupportedModelError: ``network`` names no submodule (with the closest names), or none of the
            rules above finds one (the message lists the children and asks for ``network=``).
    """
    modules = dict(root.named_modules())
    if network is not None:
        if network not in modules:
            import difflib

            close = difflib.get_close_matches(network, [n for n in modules if n], n=3, cutoff=0.4)
            raise UnsupportedModelError(
                f"network={network!r} names no submodule of {type(root).__name__}"
                + (f"; closest: {', '.join(close)}" if close else "")
                + " ('' is the LightningModule itself)"
            )
        return network, modules[network]
    hf = _find_hf(root)
    if hf is not None and getattr(hf[1], "main_input_name", None) == "pixel_values":
        return hf
    trainable = {n for n, p in root.named_parameters() if p.requires_grad}
    owners = [
        name for name, child in root.named_children()
        if trainable and trainable <= {f"{name}.{n}" for n, p in child.named_parameters() if p.requires_grad}
    ]
    if len(owners) == 1:
        return owners[0], modules[owners[0]]
    if _overrides_forward(root):
        return "", root
    children = [n for n, _ in root.named_children()]
    raise UnsupportedModelError(
        f"cannot tell which part of {type(root).__name__} maps images to logits: no direct child holds every "
        f"trainable parameter (children: {children}) and it defines no forward; pass LeakageAudit(network=NAME) "
        "with the module name of the classifier ('' for the LightningModule's own forward)"
    )


def image_model_spec(root: nn.Module, network: str | None = None) -> ImageModelSpec:
    """Build the :class:`ImageModelSpec` of the image classifier inside ``root`` (see :func:`find_image_network`).

    Raises:
        UnsupportedModelError: see :func:`find_image_network`.
    """
    name, net = find_image_network(root, network)
    last = None
    for mod_name, module in net.named_modules():
        lin = _unwrap_linear(module)
        if isinstance(lin, nn.Linear):
            suffix = "base_layer." if lin is not module else ""
            last = (_join(name, mod_name, suffix + "weight"), _join(name, mod_name, suffix + "bias") if lin.bias is not None
                    else None, int(lin.out_features))
    return ImageModelSpec(
        network=name,
        model_type=type(net).__name__,
        parameter_names=frozenset(_join(name, n) for n, _ in net.named_parameters()),
        classifier_weight=last[0] if last else None,
        classifier_bias=last[1] if last else None,
        num_labels=last[2] if last else 0,
    )
