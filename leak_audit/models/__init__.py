"""What attacks know about a model: one interface, one module per architecture family.

A :class:`TextModelSpec` is built once, at ``setup``, from the user's LightningModule. It records the
*fully qualified parameter names* (relative to the LightningModule) and constants of the pieces the text
attacks use: the token embedding, the position scheme, the first-layer normalisation, the first layers'
attention input projections, the classifier or LM head. Attacks read gradients and parameter snapshots
by these names (layer 0's inputs through :class:`EmbeddingTables`), so they never touch the live model
nor an architecture's own attribute names.

Modules:

* :mod:`~leak_audit.models.spec`: the interface (:class:`TextModelSpec`, :class:`EncoderLayerSpec`,
  :class:`TextFamily`);
* :mod:`~leak_audit.models.families`: the family registry and :func:`text_model_spec`, which asks each
  family in turn;
* :mod:`~leak_audit.models.bert`: the BERT family (BERT, MiniLM, RoBERTa, ELECTRA, XLM-R, ...: anything
  whose base model has ``embeddings.{word,position,token_type}_embeddings``, ``embeddings.LayerNorm`` and
  ``encoder.layer[i].attention.self.{query,key,value}``), possibly wrapped in a LightningModule attribute
  or a ``peft`` model; :mod:`~leak_audit.models.distilbert`, :mod:`~leak_audit.models.llama` (Llama, Mistral,
  Qwen2/3, SmolLM) and :mod:`~leak_audit.models.gpt2`: the other families, one module each;
* :mod:`~leak_audit.models.generic`: any other Hugging Face text model or plain ``nn.Module`` language model
  (no layers: the model-agnostic attacks);
* :mod:`~leak_audit.models.first_layer`: layer 0 of a post-LayerNorm encoder as values and a forward;
* :mod:`~leak_audit.models.embeddings`: :class:`EmbeddingTables`, layer 0's inputs from snapshot tensors;
* :mod:`~leak_audit.models.lora`: ``peft`` LoRA adapters (:func:`lora_specs`);
* :mod:`~leak_audit.models.hf`: finding the Hugging Face model (:func:`find_hf_model`), naming helpers,
  :class:`UnsupportedModelError`;
* :mod:`~leak_audit.models.image`: image classifiers (:class:`ImageModelSpec`, :func:`find_image_network`)
  and :func:`model_modality`;
* :mod:`~leak_audit.models.replica`, :mod:`~leak_audit.models.image_replica`: private functional copies
  of the model that optimisation attacks run at snapshot parameters.

Adding an architecture is one module that defines a :class:`TextFamily`, registered in
:mod:`~leak_audit.models.families`, plus its tests (``tests/models/test_model_families.py`` shows the seam).
"""

from __future__ import annotations

from leak_audit.models.embeddings import EmbeddingTables
from leak_audit.models.families import register_family, text_families, text_model_spec, unregister_family
from leak_audit.models.hf import UnsupportedModelError, find_hf_model
from leak_audit.models.image import MODALITIES, ImageModelSpec, find_image_network, image_model_spec, model_modality
from leak_audit.models.lora import LoraSpec, lora_specs
from leak_audit.models.spec import EncoderLayerSpec, NormKind, PositionScheme, TextFamily, TextModelSpec

__all__ = [
    "MODALITIES",
    "EmbeddingTables",
    "EncoderLayerSpec",
    "ImageModelSpec",
    "LoraSpec",
    "NormKind",
    "PositionScheme",
    "TextFamily",
    "TextModelSpec",
    "UnsupportedModelError",
    "find_hf_model",
    "find_image_network",
    "image_model_spec",
    "lora_specs",
    "model_modality",
    "register_family",
    "text_families",
    "text_model_spec",
    "unregister_family",
]
