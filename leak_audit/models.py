"""Where the tensors attacks need live inside a user's model.

A :class:`TextModelSpec` is built once, at ``setup``, from the user's LightningModule. It records the
*fully qualified parameter names* (relative to the LightningModule) of the pieces the text attacks use:
the embedding tables and LayerNorm, the first encoder layers' attention projections and the classifier.
Attacks then read gradients and parameter snapshots by these names, so they never touch the live model.

Supported: Hugging Face BERT-family encoders (BERT, MiniLM, RoBERTa, ELECTRA, XLM-R, ... anything whose
base model has ``embeddings.{word,position,token_type}_embeddings``, ``embeddings.LayerNorm`` and
``encoder.layer[i].attention.self.{query,key,value}``), possibly wrapped in a LightningModule attribute
or a ``peft`` model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "EncoderLayerSpec",
    "LoraSpec",
    "TextModelSpec",
    "UnsupportedModelError",
    "find_hf_model",
    "lora_specs",
    "text_model_spec",
]


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
