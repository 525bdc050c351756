"""The DistilBERT family: its spec names q_lin/k_lin/v_lin, and the encoder attacks recover a random-init
DistilBERT's batch of two exactly (span_attention through the post-LayerNorm layer 0 of the spec)."""

from __future__ import annotations

import pytest
import torch

from leak_audit.attacks import get_attack
from leak_audit.attacks.base import AttackInput
from leak_audit.models import text_model_spec
from leak_audit.models.replica import ModelReplica


@pytest.fixture(scope="module")
def distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=500, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                              max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    model = DistilBertForSequenceClassification(config).eval()
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1])
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, grads, params, ids, labels


def test_the_distilbert_spec(distilbert):
    model, *_ = distilbert
    spec = text_model_spec(model)
    assert (spec.family, spec.position_scheme, spec.causal, spec.token_type_embeddings) == ("distilbert", "absolute",
                                                                                            False, None)
    layer = spec.layers[0]
    assert layer.query == "distilbert.transformer.layer.0.attention.q_lin.weight"
    assert layer.attention_output == "distilbert.transformer.layer.0.attention.out_lin.weight"
    assert layer.attention_norm == "distilbert.transformer.layer.0.sa_layer_norm"
    assert spec.classifier_weight == "classifier.weight" and spec.num_labels == 2


def _run(name, distilbert):
    model, grads, params, *_ = distilbert
    spec = text_model_spec(model)
    attack = get_attack(name, "text")
    attack.requirements(spec, grads.keys())
    return attack(AttackInput(grads, params, spec, 2, replica=ModelReplica(model)))


def test_span_attention_recovers_a_batch_of_two_exactly(distilbert):
    *_, ids, _ = distilbert
    recon = _run("span_attention", distilbert)
    assert sorted(recon.sequences) == sorted(ids.tolist())
    assert recon.info["certified"] == 2


def test_token_bag_and_labels(distilbert):
    *_, ids, labels = distilbert
    assert set(_run("token_bag", distilbert).token_bag) == set(ids.flatten().tolist())
    assert sorted(_run("labels", distilbert).labels) == sorted(labels.tolist())
