"""The Llama family of decoders: Llama, Mistral, Qwen2, Qwen3, SmolLM, ... (Touvron et al., "LLaMA: Open and
Efficient Foundation Language Models", 2023).

Anything whose Hugging Face base model has ``embed_tokens``, a ``layers`` list whose layers have an
``input_layernorm`` and ``self_attn.{q_proj,k_proj,v_proj,o_proj}``, and ``mlp.{gate_proj,up_proj,down_proj}``
(possibly wrapped in a LightningModule attribute or a ``peft`` model). Layer 0's attention inputs are
``RMSNorm(E_word[v])``: rotary positions (Su et al., "RoFormer", 2021) act inside attention, so the inputs
carry no position, and the span check's capacity is the number of *distinct* tokens against ``d``.
Grouped-query attention makes ``k_proj``/``v_proj`` narrower than ``q_proj``; Qwen2 gives them biases.

Tasks: ``*ForCausalLM`` (an LM head, often tied to ``embed_tokens``) and ``*ForSequenceClassification``
(a ``score`` layer without bias that reads the last non-pad token). Every Llama-family model is causal.

:data:`LLAMA_FAMILY` is registered in :mod:`leak_audit.models.families`.
"""

from __future__ import annotations

from torch import nn

from leak_audit.models.hf import (
    UnsupportedModelError,
    base_model,
    classifier_names,
    join_names,
    linear_weight_names,
    lm_head_name,
    projection_weights,
    special_token_ids,
    weight_name,
)
from leak_audit.models.lora import lora_specs
from leak_audit.models.spec import EncoderLayerSpec, TextFamily, TextModelSpec

__all__ = ["LLAMA_FAMILY", "is_llama_family", "llama_model_spec"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _layers(hf: nn.Module) -> tuple[str, nn.Module, nn.Module | None]:
    name, base = base_model(hf)
    return name, base, getattr(base, "layers", None)


def is_llama_family(hf: nn.Module) -> bool:
    """Whether ``hf`` has ``embed_tokens`` and ``layers[0].{input_layernorm,self_attn.q_proj}`` (and no BERT
    ``embeddings``)."""
    _, base, layers = _layers(hf)
    if getattr(base, "embed_tokens", None) is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    first = layers[0]
    attn = getattr(first, "self_attn", None)
    return hasattr(first, "input_layernorm") and attn is not None and all(hasattr(attn, p) for p in _PROJECTIONS)


def _layer_spec(layer: nn.Module, lp: str, index: int) -> EncoderLayerSpec:
    attn = layer.self_attn
    mods = tuple(join_names(lp, "self_attn", p) for p in _PROJECTIONS)
    weights, dims = projection_weights(attn, _PROJECTIONS, join_names(lp, "self_attn"))
    adapters = tuple(a for a in lora_specs(attn, join_names(lp, "self_attn")) if a.module in mods)

    def weight(path: str) -> str | None:
        return weight_name(layer, lp, path)

    linear = linear_weight_names(layer, lp)
    return EncoderLayerSpec(
        lp, weights[0], weights[1], weights[2], mods, adapters,  # type: ignore[arg-type]
        query_dim=dims[0],
        key_dim=dims[1],
        value_dim=dims[2],
        attention_output=weight("self_attn.o_proj"),
        ffn_input=weight("mlp.up_proj"),
        ffn_output=weight("mlp.down_proj"),
        linear_weights=linear,
        attention_dropout=float(getattr(attn, "attention_dropout", 0.0) or 0.0),
    )


def llama_model_spec(hf_name: str, hf: nn.Module) -> TextModelSpec:
    """Build the :class:`~leak_audit.models.spec.TextModelSpec` of a Llama-family model.

    Args:
        hf_name: module name of the Hugging Face model inside the audited root (``""``: the root).
        hf: the ``PreTrainedModel`` (``LlamaForCausalLM``, ``Qwen2ForSequenceClassification``, a peft-wrapped
            one, ...).

    Raises:
        UnsupportedModelError: no ``embed_tokens``/``layers``, or layer 0 without ``input_layernorm`` and
            ``self_attn.{q,k,v}_proj``.
    """
    if not is_llama_family(hf):
        raise UnsupportedModelError(
            f"{type(hf).__name__} has no Llama-style `embed_tokens` and `layers[i].{{input_layernorm,"
            "self_attn.{q,k,v}_proj}`"
        )
    base_name, base, layer_list = _layers(hf)
    assert layer_list is not None
    prefix = join_names(hf_name, base_name)
    layers = tuple(_layer_spec(layer, join_names(prefix, "layers", str(i)), i) for i, layer in enumerate(layer_list))
    config = hf.config
    cls_w, cls_b = classifier_names(hf, hf_name, int(getattr(config, "num_labels", 0) or 0), marker="score")
    embed = base.embed_tokens
    lm_head, tied = lm_head_name(hf, hf_name, embed.weight)
    pad_id = getattr(config, "pad_token_id", None)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    return TextModelSpec(
        hf_prefix=hf_name,
        model_type=str(getattr(config, "model_type", "llama")),
        word_embeddings=join_names(prefix, "embed_tokens", "weight"),
        position_embeddings=None,
        token_type_embeddings=None,
        norm_weight=join_names(prefix, "layers", "0", "input_layernorm", "weight"),
        norm_bias=None,
        norm_eps=float(getattr(layer_list[0].input_layernorm, "variance_epsilon", None)
                       or getattr(config, "rms_norm_eps", 1e-6)),
        layers=layers,
        classifier_weight=cls_w,
        classifier_bias=cls_b,
        hidden_size=int(embed.embedding_dim),
        vocab_size=int(embed.num_embeddings),
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
        position_offset=0,
        num_labels=int(config.num_labels) if cls_w is not None else 0,
        pad_token_id=int(pad_id) if isinstance(pad_id, int) else None,
        special_token_ids=special_token_ids(config, int(embed.num_embeddings), ("pad", "bos")),
        num_heads=heads,
        family="llama",
        position_scheme="rotary",
        norm_kind="rmsnorm",
        num_kv_heads=int(getattr(config, "num_key_value_heads", 0) or heads),
        lm_head=lm_head if cls_w is None else None,
        tied_embeddings=tied and cls_w is None,
        causal=True,
    )


LLAMA_FAMILY = TextFamily(
    name="llama",
    description=(
        "Llama, Mistral, Qwen2/3, SmolLM, ... decoders: `embed_tokens` and "
        "`layers[i].{input_layernorm,self_attn.{q,k,v}_proj}`"
    ),
    matches=is_llama_family,
    build=llama_model_spec,
)
"""The Llama family, as registered in :mod:`leak_audit.models.families`."""
