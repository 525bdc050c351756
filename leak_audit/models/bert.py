"""The BERT family: BERT, MiniLM, RoBERTa, ELECTRA, XLM-R, CamemBERT, ... (Devlin et al., "BERT:
Pre-training of Deep Bidirectional Transformers for Language Understanding", NAACL 2019).

Anything whose Hugging Face base model has ``embeddings.{word,position[,token_type]}_embeddings``,
``embeddings.LayerNorm`` and ``encoder.layer[i].attention.self.{query,key,value}`` (possibly wrapped in a
LightningModule attribute or a ``peft`` model). Layer 0's attention inputs are
``LayerNorm(E_word[v] + E_pos[i + offset] + E_type[s])`` (then dropout): learned absolute positions,
LayerNorm, separate ``nn.Linear`` query/key/value projections of equal width. RoBERTa-style models
number positions from ``pad_token_id + 1``.

:data:`BERT_FAMILY` is registered first in :mod:`leak_audit.models.families`.
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
)
from leak_audit.models.lora import lora_specs
from leak_audit.models.spec import EncoderLayerSpec, TextFamily, TextModelSpec

__all__ = ["BERT_FAMILY", "OFFSET_MODEL_TYPES", "bert_model_spec", "is_bert_family"]

OFFSET_MODEL_TYPES: frozenset[str] = frozenset({"roberta", "xlm-roberta", "camembert", "longformer"})
"""``config.model_type`` values whose positions start at ``pad_token_id + 1`` (RoBERTa-style)."""

_EMBEDDING_PARTS = ("word_embeddings", "position_embeddings", "LayerNorm")


def is_bert_family(hf: nn.Module) -> bool:
    """Whether the Hugging Face model ``hf`` has BERT-style ``embeddings.{word_embeddings,
    position_embeddings,LayerNorm}`` and an ``encoder`` (the layers are checked by :func:`bert_model_spec`)."""
    base = base_model(hf)[1]
    emb = getattr(base, "embeddings", None)
    encoder = getattr(base, "encoder", None)
    return emb is not None and encoder is not None and all(hasattr(emb, n) for n in _EMBEDDING_PARTS)



def _layer_spec(layer: nn.Module, lp: str, index: int) -> EncoderLayerSpec:
    """The :class:`EncoderLayerSpec` of encoder layer ``index`` (module ``layer``, root-relative name ``lp``)."""
    attn = getattr(getattr(layer, "attention", None), "self", None)
    if attn is None or not all(hasattr(attn, p) for p in ("query", "key", "value")):
        raise UnsupportedModelError(f"encoder layer {index} has no attention.self.{{query,key,value}}.")
    mods = tuple(join_names(lp, "attention", "self", p) for p in ("query", "key", "value"))
    weights, dims = projection_weights(attn, ("query", "key", "value"), join_names(lp, "attention", "self"))
    adapters = tuple(a for a in lora_specs(attn, join_names(lp, "attention", "self")) if a.module in mods)
    linear = linear_weight_names(layer, lp)
    return EncoderLayerSpec(
        lp, weights[0], weights[1], weights[2], mods, adapters,  # type: ignore[arg-type]
        query_dim=dims[0],
        key_dim=dims[1],
        value_dim=dims[2],
        attention_output=join_names(lp, "attention.output.dense.weight"),
        ffn_input=join_names(lp, "intermediate.dense.weight"),
        ffn_output=join_names(lp, "output.dense.weight"),
        linear_weights=linear,
        attention_dropout=dropout_p(layer, "attention.self.dropout"),
        attention_output_dropout=dropout_p(layer, "attention.output.dropout"),
        attention_norm=join_names(lp, "attention.output.LayerNorm"),
        ffn_activation=join_names(lp, "intermediate.intermediate_act_fn"),
    )


def bert_model_spec(hf_name: str, hf: nn.Module) -> TextModelSpec:
    """Build the :class:`~leak_audit.models.spec.TextModelSpec` of a BERT-family model.

    Args:
        hf_name: module name of the Hugging Face model inside the audited root (``""``: the root).
        hf: the ``PreTrainedModel`` (e.g. ``BertForSequenceClassification``, a peft-wrapped one).

    Raises:
        UnsupportedModelError: no BERT-style embeddings/encoder, no ``encoder.layer`` list, or a layer
            without ``attention.self.{query,key,value}``.
    """
    base_name, base = base_model(hf)
    emb = getattr(base, "embeddings", None)
    encoder = getattr(base, "encoder", None)
    if emb is None or encoder is None or not all(hasattr(emb, n) for n in _EMBEDDING_PARTS):
        raise UnsupportedModelError(
            f"{type(hf).__name__} has no BERT-style `embeddings.{{word_embeddings,position_embeddings,LayerNorm}}`"
            " and `encoder`; the text attacks support BERT-family encoders."
        )
    layer_list = getattr(encoder, "layer", None)
    if layer_list is None:
        raise UnsupportedModelError(f"{type(hf).__name__}.encoder has no `layer` list.")
    prefix = join_names(hf_name, base_name)
    emb_prefix = join_names(prefix, "embeddings")
    layers = tuple(
        _layer_spec(layer, join_names(prefix, "encoder", "layer", str(i)), i) for i, layer in enumerate(layer_list)
    )

    config = hf.config
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    cls_w, cls_b = classifier_names(hf, hf_name, num_labels)
    norm = emb.LayerNorm
    model_type = str(getattr(config, "model_type", "bert"))
    pad_id = getattr(config, "pad_token_id", None)
    offset = int(pad_id) + 1 if model_type in OFFSET_MODEL_TYPES else 0
    tt = getattr(emb, "token_type_embeddings", None)
    lm_head, tied = lm_head_name(hf, hf_name, emb.word_embeddings.weight)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    return TextModelSpec(
        hf_prefix=hf_name,
        model_type=model_type,
        word_embeddings=join_names(emb_prefix, "word_embeddings", "weight"),
        position_embeddings=join_names(emb_prefix, "position_embeddings", "weight"),
        token_type_embeddings=join_names(emb_prefix, "token_type_embeddings", "weight") if tt is not None else None,
        norm_weight=join_names(emb_prefix, "LayerNorm", "weight"),
        norm_bias=join_names(emb_prefix, "LayerNorm", "bias"),
        norm_eps=float(norm.eps),
        layers=layers,
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
        num_heads=heads,
        family="bert",
        position_scheme="absolute",
        norm_kind="layernorm",
        num_kv_heads=heads,
        lm_head=lm_head,
        tied_embeddings=tied,
    )


BERT_FAMILY = TextFamily(
    name="bert",
    description=(
        "BERT, MiniLM, RoBERTa, ELECTRA, XLM-R, ...: `embeddings.{word_embeddings,position_embeddings,LayerNorm}`"
        " and `encoder.layer[i].attention.self.{query,key,value}`"
    ),
    matches=is_bert_family,
    build=bert_model_spec,
)
"""The BERT family, as registered in :mod:`leak_audit.models.families`."""
