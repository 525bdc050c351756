"""The GPT-2 family of decoders: GPT-2 and its Hugging Face relatives with the same layout (Radford et al.,
"Language Models are Unsupervised Multitask Learners", 2019).

Anything whose Hugging Face base model has ``wte``, ``wpe`` and an ``h`` list whose layers have ``ln_1``,
``attn.c_attn`` and ``mlp.{c_fc,c_proj}`` (possibly wrapped in a LightningModule attribute or a ``peft``
model). Layer 0's attention inputs are ``LayerNorm_1(E_word[v] + E_pos[i])`` (then dropout in training
mode): learned absolute positions, so a candidate input is a (token, position) pair, as in BERT, but the
normalisation is layer 0's own ``ln_1``. The query, key and value projections are one fused ``c_attn``
whose weight is a ``Conv1D`` stored ``[d_in, 3·d]`` (transposed against ``nn.Linear``): a weight gradient's
*columns* span the layer inputs. Every linear map of the block is such a ``Conv1D``.

Tasks: ``GPT2LMHeadModel`` (an LM head tied to ``wte``) and ``GPT2ForSequenceClassification`` (a ``score``
layer without bias that reads the last non-pad token). Every GPT-2 model is causal.

:data:`GPT2_FAMILY` is registered in :mod:`leak_audit.models.families`.
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
    special_token_ids,
    unwrap_linear,
    weight_name,
)
from leak_audit.models.lora import lora_specs
from leak_audit.models.spec import EncoderLayerSpec, TextFamily, TextModelSpec

__all__ = ["GPT2_FAMILY", "gpt2_model_spec", "is_gpt2_family"]


def _parts(hf: nn.Module) -> tuple[str, nn.Module, nn.Module | None]:
    name, base = base_model(hf)
    return name, base, getattr(base, "h", None)


def is_gpt2_family(hf: nn.Module) -> bool:
    """Whether ``hf`` has ``wte``, ``wpe`` and ``h[0].{ln_1,attn.c_attn}``."""
    _, base, layers = _parts(hf)
    if getattr(base, "wte", None) is None or getattr(base, "wpe", None) is None:
        return False
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    first = layers[0]
    return hasattr(first, "ln_1") and hasattr(getattr(first, "attn", None), "c_attn")


def _layer_spec(layer: nn.Module, lp: str, index: int, hidden: int) -> EncoderLayerSpec:
    attn = getattr(layer, "attn", None)
    if attn is None or not hasattr(attn, "c_attn"):
        raise UnsupportedModelError(f"GPT-2 layer {index} has no attn.c_attn (cross-attention-only layers are not read)")
    module = join_names(lp, "attn", "c_attn")
    fused = weight_name(layer, lp, "attn.c_attn")
    assert fused is not None
    adapters = tuple(a for a in lora_specs(attn, join_names(lp, "attn")) if a.module == module)
    return EncoderLayerSpec(
        lp, fused, fused, fused, (module, module, module), adapters,
        fused=True,
        transposed=not isinstance(unwrap_linear(attn.c_attn), nn.Linear),
        query_dim=hidden,
        key_dim=hidden,
        value_dim=hidden,
        attention_output=weight_name(layer, lp, "attn.c_proj"),
        ffn_input=weight_name(layer, lp, "mlp.c_fc"),
        ffn_output=weight_name(layer, lp, "mlp.c_proj"),
        linear_weights=linear_weight_names(layer, lp),
        attention_dropout=dropout_p(layer, "attn.attn_dropout"),
        attention_output_dropout=dropout_p(layer, "attn.resid_dropout"),
    )


def gpt2_model_spec(hf_name: str, hf: nn.Module) -> TextModelSpec:
    """Build the :class:`~leak_audit.models.spec.TextModelSpec` of a GPT-2-family model.

    Args:
        hf_name: module name of the Hugging Face model inside the audited root (``""``: the root).
        hf: the ``PreTrainedModel`` (``GPT2LMHeadModel``, ``GPT2ForSequenceClassification``, a peft-wrapped
            one, ...).

    Raises:
        UnsupportedModelError: no ``wte``/``wpe``/``h``, or layer 0 without ``ln_1`` and ``attn.c_attn``.
    """
    if not is_gpt2_family(hf):
        raise UnsupportedModelError(
            f"{type(hf).__name__} has no GPT-2-style `wte`, `wpe` and `h[i].{{ln_1,attn.c_attn}}`"
        )
    base_name, base, layer_list = _parts(hf)
    assert layer_list is not None
    prefix = join_names(hf_name, base_name)
    wte = base.wte
    hidden = int(wte.embedding_dim)
    layers = tuple(
        _layer_spec(layer, join_names(prefix, "h", str(i)), i, hidden) for i, layer in enumerate(layer_list)
    )
    config = hf.config
    cls_w, cls_b = classifier_names(hf, hf_name, int(getattr(config, "num_labels", 0) or 0), marker="score")
    lm_head, tied = lm_head_name(hf, hf_name, wte.weight)
    pad_id = getattr(config, "pad_token_id", None)
    vocab = int(wte.num_embeddings)
    heads = int(getattr(config, "n_head", 0) or getattr(config, "num_attention_heads", 0) or 0)
    ln_1 = layer_list[0].ln_1
    return TextModelSpec(
        hf_prefix=hf_name,
        model_type=str(getattr(config, "model_type", "gpt2")),
        word_embeddings=join_names(prefix, "wte", "weight"),
        position_embeddings=join_names(prefix, "wpe", "weight"),
        token_type_embeddings=None,
        norm_weight=join_names(prefix, "h", "0", "ln_1", "weight"),
        norm_bias=join_names(prefix, "h", "0", "ln_1", "bias"),
        norm_eps=float(ln_1.eps),
        layers=layers,
        classifier_weight=cls_w,
        classifier_bias=cls_b,
        hidden_size=hidden,
        vocab_size=vocab,
        max_positions=int(base.wpe.num_embeddings),
        position_offset=0,
        num_labels=int(config.num_labels) if cls_w is not None else 0,
        pad_token_id=int(pad_id) if isinstance(pad_id, int) else None,
        dropout=float(getattr(config, "embd_pdrop", 0.0) or 0.0),
        special_token_ids=special_token_ids(config, vocab),
        num_heads=heads,
        family="gpt2",
        position_scheme="absolute",
        norm_kind="layernorm",
        num_kv_heads=heads,
        lm_head=lm_head if cls_w is None else None,
        tied_embeddings=tied and cls_w is None,
        causal=True,
    )


GPT2_FAMILY = TextFamily(
    name="gpt2",
    description="GPT-2 decoders: `wte`, `wpe` and `h[i].{ln_1,attn.c_attn}` (fused Conv1D projections)",
    matches=is_gpt2_family,
    build=gpt2_model_spec,
)
"""The GPT-2 family, as registered in :mod:`leak_audit.models.families`."""
