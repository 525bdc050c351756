"""pair_pursuit on the pretrained MiniLM and real CoLA sentences: whole sentences, in order, from layer 0's
query gradient alone at B = 4."""

from __future__ import annotations

import pytest
import torch

from leak_audit.attacks import AttackInput
from leak_audit.attacks.text.pair_pursuit import pair_candidates, pair_pursuit
from leak_audit.attacks.text.query_columns import additive_atoms, token_query_gradients
from leak_audit.attacks.text.span_cluster import SpanCluster
from leak_audit.models import EmbeddingTables, text_model_spec
from leak_audit.models.replica import ModelReplica


@pytest.fixture(scope="module")
def setup(minilm, tokenizer):
    spec = text_model_spec(minilm).with_tokenizer(tokenizer)
    params = {n: p.detach() for n, p in minilm.named_parameters()}
    return spec, params, EmbeddingTables.from_params(params, spec)


def _batch(model, tokenizer, rows):
    """``(true sequences, layer 0's query weight gradient)``, dropout off."""
    enc = tokenizer([r[0] for r in rows], return_tensors="pt", padding=True)
    query = model.bert.encoder.layer[0].attention.self.query
    model.eval()
    model.zero_grad()
    model(**enc, labels=torch.tensor([r[1] for r in rows])).loss.backward()
    grad = query.weight.grad.detach().clone()
    model.zero_grad()
    truth = [row[: int(m.sum())] for row, m in zip(enc["input_ids"].tolist(), enc["attention_mask"], strict=True)]
    return truth, grad


def test_position_columns_place_every_single_position_token(minilm, tokenizer, cola, setup):
    """The position columns are sums of token columns: every token of CoLA 0-3 that sits at one position only
    is a candidate there, and the candidates are under twice the true pairs."""
    spec, _, tables = setup
    truth, grad = _batch(minilm, tokenizer, cola[:4])
    bag = sorted({v for t in truth for v in t})
    length = max(map(len, truth))
    h = token_query_gradients(grad, additive_atoms(tables, bag, length))
    pairs = set(pair_candidates(h, bag, length, cls_token_id=spec.cls_token_id, sep_token_id=spec.sep_token_id))
    true_pairs = {(v, i) for t in truth for i, v in enumerate(t) if i > 0}
    positions: dict[int, set[int]] = {}
    for v, i in true_pairs:
        positions.setdefault(v, set()).add(i)
    single = {(v, i) for v, i in true_pairs if len(positions[v]) == 1}
    assert len(single) >= 25
    assert single <= pairs
    assert len(pairs) < 2 * len(true_pairs)


def test_pair_pursuit_reads_four_real_sentences_in_order(minilm, tokenizer, cola, setup):
    """CoLA 0-3, no model needed: all four sentences exactly, in order, each named by anchors of its own."""
    spec, params, tables = setup
    truth, grad = _batch(minilm, tokenizer, cola[:4])
    bag = sorted({v for t in truth for v in t})
    res = pair_pursuit(
        grad, params[spec.layers[0].key], spec.num_heads, tables, bag, max(map(len, truth)),
        cls_token_id=spec.cls_token_id, sep_token_id=spec.sep_token_id,
    )
    assert sorted(res.sequences) == sorted(truth)
    for seq, members in zip(res.sequences, res.members, strict=True):
        others = {v for t in truth if t != seq for v in t}
        assert members and not set(members) & others
        assert set(members) <= set(seq)
    assert max(res.residuals) < 1e-8


def test_span_cluster_with_pairs_recovers_real_cola_batches_exactly(minilm, tokenizer, cola, setup):
    """CoLA 16-31 (four B = 4 batches of minimal pairs such as "he could not have been working." / "he can not
    …"; the clustering alone, ``pairs=0``, gets 7 of these 16 exactly): with the pair pursuit and peeling, at
    least 15 of the 16 sentences exactly, and at least three batches wholly certified, with their labels."""
    spec, params, _ = setup
    exact = aligned = 0
    for start in (16, 20, 24, 28):
        rows = cola[start : start + 4]
        truth, grad = _batch(minilm, tokenizer, rows)
        inp = AttackInput(
            gradients={spec.layers[0].query: grad}, params=params, spec=spec, batch_size=4,
            generator=torch.Generator().manual_seed(0), replica=ModelReplica(minilm),
        )
        rec = SpanCluster()(inp)
        assert not rec.timed_out
        exact += sum(t in rec.sequences for t in truth)  # type: ignore[operator]
        if rec.labels_aligned:
            aligned += 1
            assert [rec.labels[rec.sequences.index(t)] for t in truth] == [r[1] for r in rows]  # type: ignore[index,union-attr]
    assert exact >= 15
    assert aligned >= 3
