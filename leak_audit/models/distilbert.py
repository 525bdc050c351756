"""The DistilBERT family of encoders (Sanh et al., "DistilBERT, a distilled version of BERT: smaller, faster,
cheaper and lighter", 2019).

Anything whose Hugging Face base model has ``embeddings.{word_embeddings,position_embeddings,LayerNorm}`` and
``transformer.layer[i].attention.{q_lin,k_lin,v_lin,out_lin}`` with ``ffn.{lin1,lin2}`` (possibly wrapped in a
LightningModule attribute or a ``peft`` model). Layer 0's attention inputs are ``LayerNorm(E_word[v] +
E_pos[i])`` (then dropout in training mode), as in BERT without token types: learned absolute positions,
LayerNorm, separate ``nn.Linear`` query/key/value projections of equal width.

Task: ``DistilBertForSequenceClassification`` (``pre_classifier``, then the output layer ``classifier``).
Every encoder attack reads it through the spec, ``span_attention`` through the post-LayerNorm layer 0 of
:class:`~leak_audit.models.first_layer.FirstLayer` (DistilBERT's ``sa_layer_norm`` and ``ffn.activation``).

:data:`DISTILBERT_FAMILY` is registered in :mod:`leak_audit.models.families`.
"""

from __future__ import annotations

from torch import nn

from leak_audit.models.hf import (
    UnsupportedModelError,
    base_model,
    classifier_names,
    dropout_p,
    join_names,
    linear_weight_names,
    lm_head_name,
    projection_weights,
    weight_name,
)
from leak_audit.models.lora import lora_specs
from leak_audit.models.spec import EncoderLayerSpec, TextFamily, TextModelSpec

__all__ = ["DISTILBERT_FAMILY", "distilbert_model_spec", "is_distilbert_family"]

_PROJECTIONS = ("q_lin", "k_lin", "v_lin")
_EMBEDDING_PARTS = ("word_embeddings", "position_embeddings", "LayerNorm")


def _layers(hf: nn.Module) -> tuple[str, nn.Module, nn.Module | None]:
    name, base = base_model(hf)
    return name, base, getattr(getattr(base, "transformer", None), "layer", None)


def is_distilbert_family(hf: nn.Module) -> bool:
    """Whether ``hf`` has DistilBERT's ``embeddings`` and ``transformer.layer[0].attention.{q_lin,k_lin,v_lin}``."""
    _, base, layers = _layers(hf)
    emb = getattr(base, "embeddings", None)
    if emb is None or not all(hasattr(emb, n) for n in _EMBEDDING_PARTS):
        return False
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    attn = getattr(layers[0], "attention", None)
    return attn is not None and all(hasattr(attn, p) for p in _PROJECTIONS)



def _layer_spec(layer: nn.Module, lp: str, index: int) -> EncoderLayerSpec:
    attn = getattr(layer, "attention", None)
    if attn is None or not all(hasattr(attn, p) for p in _PROJECTIONS):
        raise UnsupportedModelError(f"DistilBERT layer {index} has no attention.{{q_lin,k_lin,v_lin}}")
    mods = tuple(join_names(lp, "attention", p) for p in _PROJECTIONS)
    weights, dims = projection_weights(attn, _PROJECTIONS, join_names(lp, "attention"))
    adapters = tuple(a for a in lora_specs(attn, join_names(lp, "attention")) if a.module in mods)

    def weight(path: str) -> str | None:
        return weight_name(layer, lp, path)

    return EncoderLayerSpec(
        lp, weights[0], weights[1], weights[2], mods, adapters,  # type: ignore[arg-type]
        query_dim=dims[0],
        key_dim=dims[1],
        value_dim=dims[2],
        attention_output=weight("attention.out_lin"),
        ffn_input=weight("ffn.lin1"),
        ffn_output=weight("ffn.lin2"),
        linear_weights=linear_weight_names(layer, lp),
        attention_dropout=dropout_p(attn, "dropout"),
        attention_output_dropout=0.0,  # DistilBERT applies no dropout to the attention output projection
        attention_norm=join_names(lp, "sa_layer_norm"),
        ffn_activation=join_names(lp, "ffn.activation"),
    )


def distilbert_model_spec(hf_name: str, hf: nn.Module) -> TextModelSpec:
    """Build the :class:`~leak_audit.models.spec.TextModelSpec` of a DistilBERT-family model.

    Args:
        hf_name: module name of the Hugging Face model inside the audited root (``""``: the root).
        hf: the ``PreTrainedModel`` (``DistilBertForSequenceClassification``, a peft-wrapped one, ...).

    Raises:
        UnsupportedModelError: no DistilBERT ``embeddings``/``transformer.layer``, or a layer without
            ``attention.{q_lin,k_lin,v_lin}``.
    """
    if not is_distilbert_family(hf):
        raise UnsupportedModelError(
            f"{type(hf).__name__} has no DistilBERT-style `embeddings.{{word_embeddings,position_embeddings,"
            "LayerNorm}` and `transformer.layer[i].attention.{q_lin,k_lin,v_lin}`"
        )
    base_name, base, layer_list = _layers(hf)
    assert layer_list is not None
    prefix = join_names(hf_name, base_name)
    emb_prefix = join_names(prefix, "embeddings")
    emb = base.embeddings
    layers = tuple(
        _layer_spec(layer, join_names(prefix, "transformer", "layer", str(i)), i) for i, layer in enumerate(layer_list)
    )
    config = hf.config
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    cls_w, cls_b = classifier_names(hf, hf_name, num_labels)
    lm_head, tied = lm_head_name(hf, hf_name, emb.word_embeddings.weight)
    pad_id = getattr(config, "pad_token_id", None)
    heads = int(getattr(config, "n_heads", 0) or getattr(config, "num_attention_heads", 0) or 0)
    return TextModelSpec(
        hf_prefix=hf_name,
        model_type=str(getattr(config, "model_type", "distilbert")),
        word_embeddings=join_names(emb_prefix, "word_embeddings", "weight"),
        position_embeddings=join_names(emb_prefix, "position_embeddings", "weight"),
        token_type_embeddings=None,
        norm_weight=join_names(emb_prefix, "LayerNorm", "weight"),
        norm_bias=join_names(emb_prefix, "LayerNorm", "bias"),
        norm_eps=float(emb.LayerNorm.eps),
        layers=layers,
        classifier_weight=cls_w,
        classifier_bias=cls_b,
        hidden_size=int(emb.word_embeddings.embedding_dim),
        vocab_size=int(emb.word_embeddings.num_embeddings),
        max_positions=int(emb.position_embeddings.num_embeddings),
        position_offset=0,
        num_labels=num_labels if cls_w is not None else 0,
        pad_token_id=int(pad_id) if isinstance(pad_id, int) else None,
        dropout=float(getattr(config, "dropout", 0.0) or 0.0),
        special_token_ids=frozenset({int(pad_id)}) if isinstance(pad_id, int) else frozenset(),
        num_heads=heads,
        family="distilbert",
        position_scheme="absolute",
        norm_kind="layernorm",
        num_kv_heads=heads,
        lm_head=lm_head,
        tied_embeddings=tied,
    )


DISTILBERT_FAMILY = TextFamily(
    name="distilbert",
    description=(
        "DistilBERT encoders: `embeddings.{word_embeddings,position_embeddings,LayerNorm}` and "
        "`transformer.layer[i].attention.{q_lin,k_lin,v_lin}`"
    ),
    matches=is_distilbert_family,
    build=distilbert_model_spec,
)
"""The DistilBERT family, as registered in :mod:`leak_audit.models.families`."""
