"""Attacks against the pretrained MiniLM on real CoLA sentences: the recovery figures we claim."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from leak_audit.attacks import AttackInput, get_attack
from leak_audit.attacks.text.span_check import span_check
from leak_audit.attacks.text.token_bag import token_bag
from tests.conftest import gradients

QUERY0 = "bert.encoder.layer.0.attention.self.query.weight"


def batches(rows, batch_size, count):
    return [rows[i * batch_size : (i + 1) * batch_size] for i in range(count)]


@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_token_bag_is_exact_on_real_sentences(minilm, tokenizer, cola, batch_size):
    for batch in batches(cola, batch_size, 4):
        enc, grads = gradients(minilm, tokenizer, [s for s, _ in batch], [y for _, y in batch], train=True)
        bag = set(token_bag(grads["bert.embeddings.word_embeddings.weight"]).tolist())
        true = set(enc["input_ids"][enc["attention_mask"].bool()].tolist())
        assert bag == true  # recall = precision = 1.0
        assert tokenizer.pad_token_id not in bag


def _per_position_recall(results):
    hits, totals = defaultdict(int), defaultdict(int)
    for enc, res in results:
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        for i in range(ids.shape[1]):
            found = {tok for tok, _, _ in res.candidates[i]} if i < len(res.candidates) else set()
            for tok in ids[:, i][mask[:, i]].tolist():
                totals[i] += 1
                hits[i] += tok in found
    return {i: hits[i] / totals[i] for i in totals}


def test_span_check_single_linear_exact_at_batch_1(minilm, tokenizer, cola, tables, spec):
    """Only layer 0's query is tapped, dropout off: every one of 32 sentences comes back exactly."""
    results, exact = [], 0
    for sentence, label in cola[:32]:
        enc, grads = gradients(minilm, tokenizer, [sentence], [label], train=False)
        res = span_check([grads[QUERY0]], tables, 1, dropout=spec.dropout, sep_token_id=spec.sep_token_id)
        results.append((enc, res))
        exact += res.sequences == [enc["input_ids"][0].tolist()]
    assert exact == 32
    assert min(_per_position_recall(results).values()) >= 0.99


def test_span_check_single_linear_batch_4_recall_every_position(minilm, tokenizer, cola, tables, spec):
    results = []
    for batch in batches(cola, 4, 8):
        enc, grads = gradients(minilm, tokenizer, [s for s, _ in batch], [y for _, y in batch], train=False)
        res = span_check([grads[QUERY0]], tables, 4, dropout=spec.dropout, sep_token_id=spec.sep_token_id)
        results.append((enc, res))
    recall = _per_position_recall(results)
    assert min(recall.values()) >= 0.99, recall


def test_span_check_with_dropout_on_ranks_true_tokens_first(minilm, tokenizer, cola, tables, spec):
    """Training-mode gradients (dropout on): the trimmed ranking still recovers B=1 sentences exactly."""
    results, exact = [], 0
    for k, (sentence, label) in enumerate(cola[40:48]):
        enc, grads = gradients(minilm, tokenizer, [sentence], [label], train=True, seed=k)
        res = span_check([grads[QUERY0]], tables, 1, dropout=spec.dropout, sep_token_id=spec.sep_token_id)
        assert res.dropout_mode
        results.append((enc, res))
        exact += res.sequences == [enc["input_ids"][0].tolist()]
    assert exact >= 7
    recall = _per_position_recall(results)
    assert sum(recall.values()) / len(recall) >= 0.95


def test_span_check_with_dropout_on_batch_4_uses_the_token_bag(minilm, tokenizer, cola, tables, spec):
    results = []
    for k, batch in enumerate(batches(cola[100:], 4, 4)):
        enc, grads = gradients(minilm, tokenizer, [s for s, _ in batch], [y for _, y in batch], train=True, seed=k)
        bag = token_bag(grads["bert.embeddings.word_embeddings.weight"])
        res = span_check(
            [grads[QUERY0]], tables, 4, dropout=spec.dropout, sep_token_id=spec.sep_token_id, vocabulary=bag
        )
        results.append((enc, res))
    recall = _per_position_recall(results)
    assert sum(recall.values()) / len(recall) >= 0.95


def test_labels_exact_at_batch_1(minilm, tokenizer, cola, spec):
    attack = get_attack("labels")
    correct = 0
    for k, (sentence, label) in enumerate(cola[:32]):
        _, grads = gradients(minilm, tokenizer, [sentence], [label], train=True, seed=k)
        inp = AttackInput(gradients=grads, params={}, spec=spec, batch_size=1)
        correct += attack(inp).labels == [label]
    assert correct == 32


def test_span_check_attack_scores_through_the_auditor(minilm, tokenizer, cola, spec):
    """The registered attack, fed a snapshot of one linear module, scores ROUGE-1 = exact match = 1."""
    from leak_audit.runtime.auditor import Auditor
    from leak_audit.capture.batch import default_batch_adapter
    from leak_audit.capture.snapshot import AuditSnapshot

    sentence, label = cola[7]
    enc, grads = gradients(minilm, tokenizer, [sentence], [label], train=False)
    params = {n: p.detach() for n, p in minilm.named_parameters()}
    auditor = Auditor(
        spec, [get_attack("span_check"), get_attack("token_bag")], {QUERY0},
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )
    assert auditor.applicable == ["span_check"]
    batch = default_batch_adapter({**enc, "labels": torch.tensor([label])})
    snap = AuditSnapshot(0, 0, 0.0, {QUERY0: grads[QUERY0]}, params, batch, ("bert.encoder.layer.0.attention.self.query",))
    records = {r.attack: r for r in auditor(snap)}
    assert records["span_check"].status == "ok"
    assert records["span_check"].metrics["rouge1"] == pytest.approx(1.0)
    assert records["span_check"].metrics["exact_match"] == 1.0
    assert records["token_bag"].status == "skipped"
    assert "word embeddings" in records["token_bag"].error


def test_pruned_refinement_and_segment_restriction_keep_recall(minilm, tokenizer, cola, tables, spec):
    """Refining only the best candidates, and only segment 0 (what the token-type gradient shows for
    single-sentence batches), recovers the same tokens as the full dropout-robust ranking."""
    batch = cola[200:204]
    enc, grads = gradients(minilm, tokenizer, [s for s, _ in batch], [y for _, y in batch], train=True, seed=3)
    seg = grads["bert.embeddings.token_type_embeddings.weight"].abs().sum(1).nonzero().flatten().tolist()
    assert seg == [0]
    bag = token_bag(grads["bert.embeddings.word_embeddings.weight"])
    kw = dict(dropout=spec.dropout, sep_token_id=spec.sep_token_id, vocabulary=bag)
    full = span_check([grads[QUERY0]], tables, 4, prune=False, **kw)
    fast = span_check([grads[QUERY0]], tables, 4, token_types=seg, **kw)
    recall = _per_position_recall([(enc, fast)])
    assert recall == _per_position_recall([(enc, full)])
    assert sum(recall.values()) / len(recall) >= 0.9, recall
    with pytest.raises(ValueError, match=r"token_types must be a non-empty subset of 0\.\.1, got \[5\]"):
        span_check([grads[QUERY0]], tables, 4, token_types=[5], **kw)


def test_default_attacks_pick_span_cluster_for_a_single_query_and_skip_it_on_the_full_view(minilm, tokenizer, cola, spec):
    """The callback's default encoder attacks on CoLA 0-3 (B = 4, dropout off): with layer 0's query alone
    tapped, ``span_cluster`` recovers all four sentences exactly (``span_check`` cannot group them); on the
    full view ``span_attention`` certifies the batch and ``span_cluster`` skips itself."""
    from leak_audit.attacks import DEFAULT_ATTACKS, resolve_attacks
    from leak_audit.capture.batch import default_batch_adapter
    from leak_audit.capture.snapshot import AuditSnapshot
    from leak_audit.models.replica import ModelReplica
    from leak_audit.runtime.auditor import Auditor

    assert "span_cluster" in DEFAULT_ATTACKS
    rows = cola[:4]
    enc, grads = gradients(minilm, tokenizer, [s for s, _ in rows], [y for _, y in rows], train=False)
    params = {n: p.detach() for n, p in minilm.named_parameters()}
    batch = default_batch_adapter({**enc, "labels": torch.tensor([y for _, y in rows])})

    def audit(names):
        auditor = Auditor(spec, resolve_attacks(None, "text"), names,
                          lambda ids: tokenizer.decode(ids, skip_special_tokens=True), replica=ModelReplica(minilm),
                          max_seconds=120)
        snap = AuditSnapshot(0, 0, 0.0, {n: grads[n] for n in names}, params, batch, ("model",))
        return {r.attack: r for r in auditor(snap)}

    single = audit({QUERY0})
    assert single["span_cluster"].status == "ok"
    assert single["span_cluster"].metrics["exact_match"] == 1.0
    assert single["span_check"].metrics["exact_match"] < 1.0
    assert single["span_attention"].status == "skipped"
    full = audit(set(grads))
    assert full["span_attention"].status == "ok" and full["span_attention"].metrics["exact_match"] == 1.0
    assert full["span_cluster"].status == "skipped"
    assert "already certified all 4 sentences" in full["span_cluster"].error
