"""The interface text attacks read a model through: :class:`TextModelSpec` and :class:`EncoderLayerSpec`.

A spec is built once, at ``setup``, by the architecture family that recognises the user's model
(:class:`TextFamily`; :mod:`leak_audit.models.bert` today). It records the *fully qualified parameter
names* (relative to the audited root, usually the LightningModule) and the constants of everything the
text attacks use, so attacks read gradients and parameter snapshots by these names and never touch the
live model or an architecture's own attribute names:

* the token embedding table, and the **position scheme**: learned absolute positions added to the token
  embedding (BERT, GPT-2), rotary positions applied inside attention (Llama family: layer 0's inputs
  then carry no position), or none;
* the **first-layer normalisation**, whose output is layer 0's attention input: ``LayerNorm`` (BERT's
  ``embeddings.LayerNorm``, GPT-2's ``h.0.ln_1``) or ``RMSNorm`` (Llama's ``layers.0.input_layernorm``),
  with its epsilon;
* the first layers' **attention input projections**: separate query/key/value or one fused projection
  (GPT-2's ``c_attn``), their output dimensions (grouped-query attention: key/value narrower than query),
  and the weight layout (``[d_out, d_in]`` for ``nn.Linear``, ``[d_in, d_out]`` for GPT-2's ``Conv1D``);
* the **head**: a sequence classifier's output layer or a language-model head, and whether the LM head is
  tied to the input embeddings.

Every new field has a default that describes the BERT family, so a BERT spec reads exactly as before.
The layer-0 input these fields define is computed by :class:`~leak_audit.models.embeddings.EmbeddingTables`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import nn

from leak_audit.models.lora import LoraSpec

__all__ = [
    "NORM_KINDS",
    "POSITION_SCHEMES",
    "EncoderLayerSpec",
    "NormKind",
    "PositionScheme",
    "TextFamily",
    "TextModelSpec",
]

PositionScheme = Literal["absolute", "rotary", "none"]
"""How positions enter the model: ``"absolute"``: a learned table added to the token embeddings before the
first normalisation (BERT, GPT-2); ``"rotary"``: rotary embeddings applied to queries and keys inside each
attention (Su et al., "RoFormer", 2021; Llama family): layer 0's inputs carry no position;
``"none"``: no position information."""

POSITION_SCHEMES: tuple[str, ...] = ("absolute", "rotary", "none")
"""The values of :data:`PositionScheme`."""

NormKind = Literal["layernorm", "rmsnorm"]
"""The first-layer normalisation: ``"layernorm"`` ``γ ⊙ (z − mean z) / √(var z + ε) + β`` (Ba et al. 2016) or
``"rmsnorm"`` ``γ ⊙ z / √(mean z² + ε)`` (Zhang & Sennrich 2019; no centring, no bias)."""

NORM_KINDS: tuple[str, ...] = ("layernorm", "rmsnorm")
"""The values of :data:`NormKind`."""


@dataclass(frozen=True)
class EncoderLayerSpec:
    """Parameter names of one Transformer layer's attention input projections, and of the rest of its block.

    Attributes:
        prefix: module name of the layer, e.g. ``"model.bert.encoder.layer.0"``.
        query, key, value: *weight* parameter names of the three projections (BERT: each ``[d, d]``).
            With a fused projection (``fused``) all three name the same weight.
        modules: module names of ``query``, ``key`` and ``value``.
        lora: the LoRA adapters on these three projections (``peft``), if any.
        fused: one projection computes query, key and value (GPT-2's ``c_attn``): its output rows are
            ``[query_dim | key_dim | value_dim]``.
        transposed: the projection weights are stored ``[d_in, d_out]`` (GPT-2's ``Conv1D``) instead of
            ``nn.Linear``'s ``[d_out, d_in]``; a weight gradient's *columns* then span the layer inputs.
        query_dim, key_dim, value_dim: output dimensions of the projections (0: unknown). Grouped-query
            attention has ``key_dim = value_dim = kv_heads · head_size < query_dim``.
        attention_output: weight name of the attention output projection (BERT
            ``attention.output.dense``, ``[d, d]``), or ``None``.
        ffn_input: weight name of the feed-forward input projection (BERT ``intermediate.dense``,
            ``[d_ff, d]``), or ``None``.
        ffn_output: weight name of the feed-forward output projection (BERT ``output.dense``,
            ``[d, d_ff]``), or ``None``.
        linear_weights: every weight of the layer's linear maps (its parameters named ``*weight`` outside
            its normalisation modules; ``peft``'s ``base_layer``, ``lora_A`` and ``lora_B`` included).
        attention_dropout: dropout probability on the attention probabilities in training mode.
        attention_output_dropout: dropout probability on the attention output projection in training mode.
        attention_norm: module name of a post-LayerNorm encoder's normalisation after attention (BERT
            ``attention.output.LayerNorm``, DistilBERT ``sa_layer_norm``), or ``None`` (pre-norm decoders).
        ffn_activation: module name of the feed-forward activation (BERT ``intermediate.intermediate_act_fn``),
            or ``None``.
    """

    prefix: str
    query: str
    key: str
    value: str
    modules: tuple[str, str, str]
    lora: tuple[LoraSpec, ...] = ()
    fused: bool = False
    transposed: bool = False
    query_dim: int = 0
    key_dim: int = 0
    value_dim: int = 0
    attention_output: str | None = None
    ffn_input: str | None = None
    ffn_output: str | None = None
    linear_weights: tuple[str, ...] = ()
    attention_dropout: float = 0.0
    attention_output_dropout: float = 0.0
    attention_norm: str | None = None
    ffn_activation: str | None = None

    @property
    def input_projections(self) -> tuple[str, ...]:
        """The distinct weights whose inputs are this layer's hidden states: (query, key, value), or the
        one fused weight."""
        return tuple(dict.fromkeys((self.query, self.key, self.value)))


@dataclass(frozen=True)
class TextModelSpec:
    """Names and constants of a text model, relative to the audited root module.

    All ``*_weight`` / ``*_embeddings`` fields are parameter names usable as keys of
    ``root.named_parameters()``. Tensor shapes: word embeddings ``[V, d]``, position embeddings
    ``[P, d]``, token-type embeddings ``[T, d]``, first-layer normalisation weight and bias ``[d]``,
    classifier weight ``[C, d]`` and bias ``[C]``, LM head ``[V, d]``. ``dropout`` is the embedding dropout
    probability in training mode (BERT ``hidden_dropout_prob``), which the span check needs to read
    training-mode gradients.

    Attributes:
        hf_prefix: module name of the Hugging Face model inside the root (``""``: the root itself).
        model_type: the model's ``config.model_type`` (``"bert"``, ``"roberta"``, ...).
        word_embeddings: the token embedding table ``[V, d]``.
        position_embeddings: the learned position table ``[P, d]``; ``None`` unless ``position_scheme``
            is ``"absolute"``.
        token_type_embeddings: the segment table ``[T, d]`` (BERT), or ``None``.
        norm_weight, norm_bias: the first-layer normalisation's affine parameters ``[d]`` (``norm_bias``
            ``None`` for RMSNorm; both ``None`` when the layers are unknown: the ``"generic"`` spec of
            :mod:`leak_audit.models.generic`); ``norm_eps`` its epsilon; ``norm_kind`` its formula.
        layers: the Transformer layers, first to last.
        classifier_weight, classifier_bias: a sequence classifier's output layer, or ``None``.
        hidden_size, vocab_size: ``d`` and ``V``.
        max_positions: rows of the position table (``P``), or the model's maximum length without one.
        position_offset: index of position 0 in the position table (RoBERTa: ``pad_token_id + 1``).
        num_labels: classes ``C`` of a sequence classifier (0: none).
        pad_token_id, cls_token_id, sep_token_id, special_token_ids: special tokens (from the config,
            then the tokenizer: :meth:`with_tokenizer`).
        num_heads: attention heads per layer (0: unknown); ``num_kv_heads`` key/value heads (grouped-query
            attention; 0: as many as ``num_heads``).
        family: name of the :class:`TextFamily` that built the spec.
        position_scheme: see :data:`PositionScheme`.
        lm_head: the language-model head's weight ``[V, d]``, or ``None`` (sequence classifiers); equal to
            ``word_embeddings`` when ``tied_embeddings``.
        tied_embeddings: the LM head *is* the input embedding table (one parameter), so its gradient sums
            the lookup's and the head's.
        causal: a decoder: position ``i`` attends to positions ``0..i`` only, so the hidden state at ``i``
            depends on the prefix alone (DAGER's left-to-right assembly reads this).
    """

    hf_prefix: str
    model_type: str
    word_embeddings: str
    position_embeddings: str | None
    token_type_embeddings: str | None
    norm_weight: str | None
    norm_bias: str | None
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
    family: str = "bert"
    position_scheme: PositionScheme = "absolute"
    norm_kind: NormKind = "layernorm"
    num_kv_heads: int = 0
    lm_head: str | None = None
    tied_embeddings: bool = False
    causal: bool = False

    @property
    def embedding_params(self) -> tuple[str, ...]:
        """Names of the tensors that define the first layer's inputs (tables and normalisation)."""
        names = [self.word_embeddings]
        names += [n for n in (self.position_embeddings, self.norm_weight, self.norm_bias) if n is not None]
        if self.token_type_embeddings is not None:
            names.append(self.token_type_embeddings)
        return tuple(names)

    def decoder_view(self) -> tuple[str, ...]:
        """Module names a decoder's audit taps by default: layer 0, layer 1's attention input projections (under
        LoRA, those of layers 1-3) and the LM head (the output embedding; the input embedding when tied).

        That is everything ``span_decoder`` reads, at a fraction of the whole gradient (SmolLM2-135M: the
        head's ``[V, d]`` gradient, 113 MB, plus about 18 MB, instead of 540 MB).
        """
        names = [self.layers[0].prefix] if self.layers else []
        # under LoRA the adapters of layers 1-3 (a few KB each): beyond their rank they are read together
        deep = 4 if any(layer.lora for layer in self.layers[:2]) else 2
        for layer in self.layers[1:deep]:
            names += list(dict.fromkeys(layer.modules))
        if self.lm_head is not None:
            names.append(self.lm_head.rsplit(".", 1)[0])
        elif self.classifier_weight is not None:
            names.append(self.classifier_weight.rsplit(".", 1)[0])
        return tuple(names)

    def with_tokenizer(self, tokenizer: Any) -> TextModelSpec:
        """Return a copy that knows the tokenizer's special tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, ...)."""
        if tokenizer is None:
            return self
        special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        cls_id = getattr(tokenizer, "cls_token_id", None)
        sep_id = getattr(tokenizer, "sep_token_id", None)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        return replace(
            self,
            special_token_ids=special | self.special_token_ids,
            cls_token_id=cls_id if cls_id is not None else self.cls_token_id,
            sep_token_id=sep_id if sep_id is not None else self.sep_token_id,
            pad_token_id=pad_id if pad_id is not None else self.pad_token_id,
        )


@dataclass(frozen=True)
class TextFamily:
    """One architecture family: how to recognise its models and build their :class:`TextModelSpec`.

    One module per family defines one (``leak_audit.models.bert.BERT_FAMILY``);
    :func:`~leak_audit.models.families.text_model_spec` asks each registered family in turn.

    Attributes:
        name: short name (``"bert"``), recorded as :attr:`TextModelSpec.family`.
        description: the models it covers and the structure it needs, for error messages, e.g.
            ``"BERT, MiniLM, RoBERTa, ELECTRA, XLM-R: embeddings.{...} and encoder.layer[i]..."``.
        matches: ``hf_model -> bool``: whether the Hugging Face model (a ``PreTrainedModel``) belongs to
            the family. Must not raise.
        build: ``(hf_name, hf_model) -> TextModelSpec`` with ``hf_name`` the model's module name inside
            the audited root; raises :class:`~leak_audit.models.hf.UnsupportedModelError` when the model
            matched but a part the attacks need is missing.
    """

    name: str
    description: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[str, nn.Module], TextModelSpec]
