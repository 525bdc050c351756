import pytest
import torch

from leak_audit.attacks import Reconstruction
from leak_audit.capture.batch import TextBatch
from leak_audit.metrics.text import (
    exact_match,
    label_accuracy,
    match_sequences,
    position_recall,
    score_text_reconstruction,
    token_precision_recall,
)

CLS, SEP, PAD = 101, 102, 0


def batch(seqs, labels=None):
    length = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (length - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
    return TextBatch(ids, mask, labels=None if labels is None else torch.tensor(labels))


def decode(ids):
    return " ".join(f"w{i}" for i in ids)


def test_token_precision_recall_multiset_and_set():
    assert token_precision_recall([[1, 2, 2]], [[1, 2, 3]]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert token_precision_recall([1, 2, 3, 9], [[1, 2, 2, 3]], as_set=True) == (0.75, 1.0)
    assert token_precision_recall([[CLS, 5]], [[CLS, 5, SEP]], ignore={CLS, SEP}) == (1.0, 1.0)
    assert token_precision_recall([], [[1]]) == (0.0, 0.0)


def test_matching_is_order_free():
    preds, refs = [[7, 8, 9], [1, 2, 3]], [[1, 2, 3], [7, 8, 9]]
    assert sorted(match_sequences(preds, refs)) == [(0, 1), (1, 0)]
    assert exact_match(preds, refs) == 1.0
    assert exact_match([[1, 2, 3]], refs) == 0.5


def test_position_recall_and_labels():
    assert position_recall([{1, 4}, {2}], [[1, 2], [4, 5]]) == 0.75
    assert label_accuracy([1, 0, 0], [0, 0, 1]) == 1.0  # multiset
    assert label_accuracy([1, 0], [0, 1], pairs=[(0, 1), (1, 0)]) == 1.0
    assert label_accuracy([1, 1], [0, 1], pairs=[(0, 0), (1, 1)]) == 0.5


def test_score_of_a_perfect_reconstruction():
    b = batch([[CLS, 5, 6, 7, SEP], [CLS, 8, 9, SEP]], labels=[1, 0])
    recon = Reconstruction("x", sequences=[[CLS, 8, 9, SEP], [CLS, 5, 6, 7, SEP]], labels=[0, 1], labels_aligned=True)
    m = score_text_reconstruction(recon, b, decode, {CLS, SEP, PAD})
    assert m == {
        "rouge1": pytest.approx(1.0), "rouge2": pytest.approx(1.0), "rougeL": pytest.approx(1.0),
        "token_precision": 1.0, "token_recall": 1.0, "exact_match": 1.0, "label_accuracy": 1.0,
    }


def test_score_of_a_partial_reconstruction():
    b = batch([[CLS, 5, 6, 7, 8, SEP]])
    m = score_text_reconstruction(Reconstruction("x", sequences=[[CLS, 5, 6, 9, SEP]]), b, decode, {CLS, SEP})
    assert m["token_recall"] == 0.5 and m["token_precision"] == pytest.approx(2 / 3)
    assert m["exact_match"] == 0.0
    assert 0 < m["rouge1"] < 1 and m["rouge2"] == pytest.approx(0.4, abs=1e-6)  # bigram P=1/2, R=1/3
    bag = score_text_reconstruction(Reconstruction("x", token_bag=[CLS, 5, 6, 42]), b, decode, {CLS, SEP})
    assert bag == {"token_precision": pytest.approx(2 / 3), "token_recall": 0.5}


def test_scoring_runs_the_tested_exact_match():
    """``score_text_reconstruction`` reports :func:`exact_match` on the special-token-free sequences."""
    b = batch([[CLS, 5, 6, SEP], [CLS, 8, 9, SEP], [CLS, 7, SEP]])
    preds = [[CLS, 8, 9, SEP], [CLS, 5, 6, 6, SEP]]  # one exact, one near, one reference unmatched
    m = score_text_reconstruction(Reconstruction("x", sequences=preds), b, decode, {CLS, SEP, PAD})
    assert m["exact_match"] == exact_match(preds, b.sequences(), {CLS, SEP, PAD}) == pytest.approx(1 / 3)
