"""Dropout-mask recovery at B = 8 on the pretrained MiniLM and real CoLA sentences, checked against the true
masked inputs (the embedding module's training-mode output)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from leak_audit.attacks.spans import span_basis
from leak_audit.attacks.text.dropout_masks import masked_instances, unmask_inputs
from leak_audit.attacks.text.layer0 import candidate_inputs
from leak_audit.models import EmbeddingTables, text_model_spec
from tests.conftest import gradients


@pytest.fixture(scope="module")
def batch(minilm, tokenizer, cola):
    """CoLA dev 0-7 in training mode (seed 0): the true masked inputs per (token, position), the candidates
    (every true pair, then each token one position later where that pair is false) and the row space."""
    spec = text_model_spec(minilm).with_tokenizer(tokenizer)
    rows = cola[:8]
    seen: list[torch.Tensor] = []
    hook = minilm.bert.embeddings.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        enc, grads = gradients(minilm, tokenizer, [r[0] for r in rows], [r[1] for r in rows], train=True, seed=0)
    finally:
        hook.remove()
    ids, mask = enc["input_ids"], enc["attention_mask"]
    truth: dict[tuple[int, int], list[torch.Tensor]] = {}
    for b in range(8):
        for i in range(int(mask[b].sum())):
            truth.setdefault((int(ids[b, i]), i), []).append(seen[0][b, i].double())
    false = {(t, i + 1) for t, i in truth if i > 0} - set(truth)
    pairs = sorted(truth) + sorted(false)
    params = {n: p.detach() for n, p in minilm.named_parameters()}
    tables = EmbeddingTables.from_params(params, spec)
    y = candidate_inputs(tables, torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]), 0)
    lp = spec.layers[0].prefix
    basis = span_basis([grads[f"{lp}.attention.self.{m}.weight"] for m in ("query", "key", "value")])[0]
    return spec, truth, pairs, y, basis


def test_every_instance_of_eight_real_sentences_is_recovered_exactly(batch):
    """105 tokens at B = 8: [CLS] at position 0 eight times, 'the' at position 4 four times. A plain L1 fit
    finds one instance of each; the search finds all 105, each equal to the true masked input, and nothing
    for the false pairs (before the forced drops, 12 of them were missing and no sentence could close)."""
    spec, truth, pairs, y, basis = batch
    assert basis.shape[1] == sum(len(v) for v in truth.values()) == 105
    assert Counter(len(v) for v in truth.values())[8] == 1  # [CLS]
    index, xs, cut = masked_instances(y, pairs, basis, spec.dropout, 8, sep_token_id=spec.sep_token_id,
                                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert not cut and len(index) == 105
    for j, x in zip(index, xs, strict=True):
        assert pairs[j] in truth  # no false pair
        err = min(float((x - t).norm() / t.norm()) for t in truth[pairs[j]])
        assert err < 1e-5, (pairs[j], err)
    assert Counter(pairs[j] for j in index) == Counter({p: len(v) for p, v in truth.items()})
    # the plain fit alone: one instance per true pair, none for a false one
    _, res = unmask_inputs(y, basis, spec.dropout, generator=torch.Generator().manual_seed(0))
    assert int((res[: len(truth)] < 1e-5).sum()) == len(truth)
    assert float(res[len(truth) :].min()) > 1e-2


def test_a_deadline_stops_the_search(batch):
    """A passed deadline leaves the first plain fit only: at most one instance per pair, so [CLS]'s eight are not
    all there, and the result says it was cut."""
    spec, truth, pairs, y, basis = batch
    index, _, cut = masked_instances(y, pairs, basis, spec.dropout, 8, deadline=0.0)
    assert cut and index and max(Counter(index).values()) == 1
    assert len(index) <= len(truth) < 105
