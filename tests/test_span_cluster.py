"""span_cluster on the pretrained MiniLM and real CoLA sentences: sentences from layer 0's query gradient alone."""

from __future__ import annotations

import pytest
import torch

from leak_audit.attacks import AttackInput, NotApplicable, get_attack
from leak_audit.attacks.span_check import EmbeddingTables
from leak_audit.attacks.span_cluster import additive_atoms, token_query_gradients
from leak_audit.models import text_model_spec


@pytest.fixture(scope="module")
def setup(minilm, tokenizer):
    spec = text_model_spec(minilm).with_tokenizer(tokenizer)
    params = {n: p.detach() for n, p in minilm.named_parameters()}
    return spec, params


def _query_gradients(model, tokenizer, rows):
    """``(encoding, query weight gradient, per-position query output gradients [B, L, d])``, dropout off."""
    enc = tokenizer([r[0] for r in rows], return_tensors="pt", padding=True)
    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["q"] = out

    query = model.bert.encoder.layer[0].attention.self.query
    handle = query.register_forward_hook(hook)
    model.eval()
    model.zero_grad()
    try:
        model(**enc, labels=torch.tensor([r[1] for r in rows])).loss.backward()
    finally:
        handle.remove()
    grad = query.weight.grad.detach().clone()
    model.zero_grad()
    return enc, grad, store["q"].grad.detach()


def test_query_gradient_splits_exactly_by_token(minilm, tokenizer, cola, setup):
    """Fact 1: H = ∂L/∂W_q · A⁺ᵀ gives each token's Σ δq_t/σ_t (real CoLA, B=4)."""
    spec, params = setup
    enc, grad, dq = _query_gradients(minilm, tokenizer, cola[:4])
    tables = EmbeddingTables.from_params(params, spec)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    bag = sorted(set(ids[mask.bool()].tolist()))
    atoms = additive_atoms(tables, bag, ids.shape[1])
    h = token_query_gradients(grad, atoms)
    e = tables.word[ids].double() + tables.position[: ids.shape[1]].double() + tables.token_type[0].double()
    sigma = ((e - e.mean(-1, keepdim=True)).square().mean(-1) + tables.norm_eps).sqrt()
    worst = 0.0
    for j, v in enumerate(bag):
        sel = (ids == v) & mask.bool()
        truth = (dq.double()[sel] / sigma[sel][:, None]).sum(0)
        worst = max(worst, float((h[:, j] - truth).norm() / truth.norm()))
    assert worst < 1e-4


def test_four_real_sentences_from_the_query_gradient_alone(minilm, tokenizer, cola, setup):
    """B=4 real CoLA, only layer 0's query weight gradient (0.65% of the parameters): every sentence's token set
    is recovered, and at least 3 of 4 sentences exactly (the fourth repeats a word inside the sentence)."""
    spec, params = setup
    enc, grad, _ = _query_gradients(minilm, tokenizer, cola[:4])
    attack = get_attack("span_cluster")
    req = attack.requirements(spec, [spec.layers[0].query])
    inp = AttackInput(
        gradients={spec.layers[0].query: grad}, params={n: params[n] for n in req.params}, spec=spec, batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    rec = attack(inp)
    truth = [row[: int(m.sum())] for row, m in zip(enc["input_ids"].tolist(), enc["attention_mask"], strict=True)]
    assert sorted(sorted(set(s)) for s in rec.sequences) == sorted(sorted(set(t)) for t in truth)  # type: ignore[union-attr]
    assert sum(t in rec.sequences for t in truth) >= 3  # type: ignore[operator]


def test_needs_the_query_gradient(setup):
    spec, _ = setup
    with pytest.raises(NotApplicable, match="query"):
        get_attack("span_cluster").requirements(spec, [spec.layers[0].key])
