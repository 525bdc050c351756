"""Any other Hugging Face text model: what the model-agnostic attacks need, and nothing more.

A model no family knows (OPT, T5's encoder, a custom ``PreTrainedModel``, ...) still has an input embedding
(``get_input_embeddings()``), usually an output head, and its own ``forward``. That is enough for the attacks
that read no layer by name: the token bag (nonzero rows of an *untied* embedding's gradient), the labels
(a sequence classifier's last linear layer) and gradient matching (the model's own forward on
``inputs_embeds``). The spec of such a model has no layers (:attr:`~leak_audit.models.spec.TextModelSpec.layers`
is empty), so the span attacks, which run a layer-0 reimplementation, say they do not apply.

A plain ``nn.Module`` language model (no Hugging Face model inside) gets the same kind of spec from its first
``nn.Embedding`` (:func:`plain_model_spec`): the token bag where its embedding is untied, the labels where it
ends in a classifier. Attacks that run the model need a Hugging Face ``forward`` and say so.
"""

from __future__ import annotations

from torch import nn

from leak_audit.models.hf import UnsupportedModelError, classifier_names, join_names, lm_head_name, special_token_ids
from leak_audit.models.spec import TextModelSpec

__all__ = ["generic_model_spec", "has_token_embedding", "plain_model_spec"]


def generic_model_spec(hf_name: str, hf: nn.Module) -> TextModelSpec:
    """The :class:`~leak_audit.models.spec.TextModelSpec` of a Hugging Face model no family knows
    (``family="generic"``, no layers).

    The classifier is the model's last ``nn.Linear`` with ``config.num_labels`` outputs when the model has no
    LM head (``get_output_embeddings()``); the model is causal when its class is a ``*ForCausalLM`` or its config
    says ``is_decoder``.

    Raises:
        UnsupportedModelError: the model has no input embedding table (``get_input_embeddings()`` returns no
            ``nn.Embedding``); the message says what would make it auditable.
    """
    try:
        embedding = hf.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        embedding = None
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedModelError(
            f"{type(hf).__name__} has no input embedding table (get_input_embeddings() gave "
            f"{type(embedding).__name__}); the text attacks read token embeddings. Give the model an nn.Embedding "
            "returned by get_input_embeddings(), or audit it as an image classifier (modality='image')"
        )
    word = next(n for n, p in hf.named_parameters() if p is embedding.weight)
    config = hf.config
    lm_head, tied = lm_head_name(hf, hf_name, embedding.weight)
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    cls_w, cls_b = (None, None) if lm_head is not None else classifier_names(hf, hf_name, num_labels, marker="")
    pad_id = getattr(config, "pad_token_id", None)
    vocab = int(embedding.num_embeddings)
    causal = type(hf).__name__.endswith("ForCausalLM") or bool(getattr(config, "is_decoder", False))
    return _layerless_spec(
        hf_prefix=hf_name,
        model_type=str(getattr(config, "model_type", type(hf).__name__)),
        embedding=embedding,
        word_embeddings=join_names(hf_name, word),
        classifier=(cls_w, cls_b, num_labels if cls_w is not None else 0),
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 512),
        pad_token_id=int(pad_id) if isinstance(pad_id, int) else None,
        special=special_token_ids(config, vocab),
        lm_head=(lm_head, tied),
        causal=causal,
    )


def has_token_embedding(root: nn.Module) -> bool:
    """Whether ``root`` holds an ``nn.Embedding`` and no convolution: how a module without a Hugging Face model
    inside is recognised as a language model (:func:`~leak_audit.models.model_modality`)."""
    modules = list(root.modules())
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return any(isinstance(m, nn.Embedding) for m in modules) and not any(isinstance(m, conv) for m in modules)


def plain_model_spec(root: nn.Module) -> TextModelSpec:
    """The ``"generic"`` :class:`~leak_audit.models.spec.TextModelSpec` of a plain ``nn.Module`` language model.

    The token embedding is the first ``nn.Embedding`` in module order. An ``nn.Linear`` with as many outputs as
    the vocabulary is the LM head (tied when it shares the embedding's weight, and the model is then taken as
    causal); without one, the last ``nn.Linear`` is a sequence classifier's output layer.

    Raises:
        UnsupportedModelError: ``root`` holds no ``nn.Embedding``.
    """
    named = list(root.named_modules())
    found = next(((n, m) for n, m in named if isinstance(m, nn.Embedding)), None)
    if found is None:
        raise UnsupportedModelError(
            f"{type(root).__name__} holds no Hugging Face model and no nn.Embedding; the text attacks read token "
            "embeddings (audit it as an image classifier with modality='image')"
        )
    name, embedding = found
    vocab = int(embedding.num_embeddings)
    linears = [(n, m) for n, m in named if isinstance(m, nn.Linear)]
    head = next(((n, m) for n, m in reversed(linears) if m.out_features == vocab), None)
    classifier = linears[-1] if head is None and linears else None
    cls_w = join_names(classifier[0], "weight") if classifier else None
    cls_b = join_names(classifier[0], "bias") if classifier and classifier[1].bias is not None else None
    return _layerless_spec(
        hf_prefix="",
        model_type=type(root).__name__,
        embedding=embedding,
        word_embeddings=join_names(name, "weight"),
        classifier=(cls_w, cls_b, int(classifier[1].out_features) if classifier else 0),
        max_positions=512,
        pad_token_id=embedding.padding_idx,
        special=frozenset(),
        lm_head=(join_names(head[0], "weight") if head else None, head is not None and head[1].weight is embedding.weight),
        causal=head is not None,
    )


def _layerless_spec(
    *,
    hf_prefix: str,
    model_type: str,
    embedding: nn.Embedding,
    word_embeddings: str,
    classifier: tuple[str | None, str | None, int],
    max_positions: int,
    pad_token_id: int | None,
    special: frozenset[int],
    lm_head: tuple[str | None, bool],
    causal: bool,
) -> TextModelSpec:
    """The ``"generic"`` spec: an embedding table and a head, no layers, no normalisation, no positions."""
    return TextModelSpec(
        hf_prefix=hf_prefix,
        model_type=model_type,
        word_embeddings=word_embeddings,
        position_embeddings=None,
        token_type_embeddings=None,
        norm_weight=None,
        norm_bias=None,
        norm_eps=0.0,
        layers=(),
        classifier_weight=classifier[0],
        classifier_bias=classifier[1],
        hidden_size=int(embedding.embedding_dim),
        vocab_size=int(embedding.num_embeddings),
        max_positions=max_positions,
        position_offset=0,
        num_labels=classifier[2],
        pad_token_id=pad_token_id,
        special_token_ids=special,
        family="generic",
        position_scheme="none",
        lm_head=lm_head[0],
        tied_embeddings=lm_head[1],
        causal=causal,
    )
