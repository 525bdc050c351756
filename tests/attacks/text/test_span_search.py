"""span_search on the pretrained MiniLM and real CoLA sentences: one deep linear layer leaks the sentence."""

from __future__ import annotations

import pytest
import torch

from leak_audit.attacks import AttackInput, NotApplicable, get_attack
from leak_audit.attacks.text.span_search import SpanSearch, span_distance
from leak_audit.models import text_model_spec
from leak_audit.models.replica import ModelReplica
from tests.conftest import gradients

QUERY3 = "bert.encoder.layer.3.attention.self.query"


@pytest.fixture(scope="module")
def setup(minilm, tokenizer):
    spec = text_model_spec(minilm).with_tokenizer(tokenizer)
    params = {n: p.detach() for n, p in minilm.named_parameters()}
    return spec, params, ModelReplica(minilm)


def _run(attack, setup, grads, names, batch_size=1, priors=None, seed=0):
    spec, params, replica = setup
    req = attack.requirements(spec, names)
    inp = AttackInput(
        gradients={k: grads[k] for k in req.gradients}, params=params, spec=spec, batch_size=batch_size,
        priors=priors or {}, generator=torch.Generator().manual_seed(seed), replica=replica,
    )
    with torch.no_grad():
        return attack(inp)


def test_layer3_query_alone_recovers_a_real_sentence_exactly(minilm, tokenizer, cola, setup):
    """Only layer 3's query (0.65% of the parameters) is tapped, B=1, dropout off: exact, certified D≈0."""
    sentence, label = cola[2]
    enc, grads = gradients(minilm, tokenizer, [sentence], [label], train=False)
    names = [QUERY3 + ".weight", QUERY3 + ".bias"]
    # bounded by work (perturbation rounds), not seconds, so the outcome does not depend on machine load
    rec = _run(SpanSearch(max_seconds=600, max_perturbations=16), setup, grads, names)
    assert rec.sequences == enc["input_ids"].tolist()
    assert rec.info["exact"] == 1 and rec.info["distance"] < 1e-4
    assert rec.info["module"] == QUERY3


def test_seed_from_span_check_is_certified_without_search(minilm, tokenizer, cola, setup):
    """Full gradient, B=1: span_check is exact, span_search certifies it (distance ≈ 0) and stops."""
    sentence, label = cola[3]
    enc, grads = gradients(minilm, tokenizer, [sentence], [label], train=False)
    spec, params, replica = setup
    names = list(params)
    sc = _run(get_attack("span_check"), setup, grads, names)
    rec = _run(SpanSearch(), setup, grads, names, priors={"span_check": sc})
    assert rec.info["seeded"] == 1 and rec.info["steps"] == 0
    assert rec.sequences == enc["input_ids"].tolist()


def test_span_distance_is_zero_only_for_the_private_inputs(minilm, tokenizer, cola, setup):
    from leak_audit.attacks.spans import span_basis
    from leak_audit.attacks.text.span_search import module_inputs

    spec, params, replica = setup
    enc, grads = gradients(minilm, tokenizer, [cola[1][0]], [cola[1][1]], train=False)
    basis, _ = span_basis([grads[QUERY3 + ".weight"]])
    ids = enc["input_ids"]
    wrong = ids.clone()
    wrong[0, 2] = tokenizer.convert_tokens_to_ids("banana")
    x = module_inputs(replica, params, [QUERY3], input_ids=torch.cat([ids, wrong]))[QUERY3]
    d = span_distance(x, basis.float())
    assert float(d[0]) < 1e-4 < 0.1 < float(d[1])


def test_needs_a_deep_linear_gradient(setup):
    spec, _, _ = setup
    with pytest.raises(NotApplicable, match="linear module inside an encoder layer"):
        SpanSearch().requirements(spec, ["bert.embeddings.word_embeddings.weight"])
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        SpanSearch(max_seconds=0)
