"""span_cluster on the pretrained MiniLM and real CoLA sentences: sentences from layer 0's query gradient alone."""

from __future__ import annotations

import pytest
import torch

from leak_audit.attacks import AttackInput, NotApplicable, get_attack
from leak_audit.attacks.text.peeling import certify, label_from_coefficients, logit_gradients
from leak_audit.models import EmbeddingTables
from leak_audit.attacks.text.span_cluster import SpanCluster, additive_atoms, token_query_gradients
from leak_audit.attacks.text.word_order import RESTARTS
from leak_audit.models import text_model_spec
from leak_audit.models.replica import ModelReplica
from tests.conftest import gradients


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
    """B=4 real CoLA, only layer 0's query weight gradient (0.65% of the parameters). Without the model
    (no peeling): every sentence's token set, at least 3 of 4 sentences exactly (the fourth repeats a word
    inside the sentence). With it: the three are certified and peeled, the fourth is then exact at B'=1,
    and every label is read from the certificates' signs."""
    spec, params = setup
    rows = cola[:4]
    enc, grad, _ = _query_gradients(minilm, tokenizer, rows)
    truth = [row[: int(m.sum())] for row, m in zip(enc["input_ids"].tolist(), enc["attention_mask"], strict=True)]
    attack = SpanCluster(peel=False)
    req = attack.requirements(spec, [spec.layers[0].query])
    assert not req.replica
    inp = AttackInput(
        gradients={spec.layers[0].query: grad}, params={n: params[n] for n in req.params}, spec=spec, batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    rec = attack(inp)
    assert sorted(sorted(set(s)) for s in rec.sequences) == sorted(sorted(set(t)) for t in truth)  # type: ignore[union-attr]
    assert sum(t in rec.sequences for t in truth) >= 3  # type: ignore[operator]

    peeling = get_attack("span_cluster")
    assert peeling.requirements(spec, [spec.layers[0].query]).replica
    inp = AttackInput(
        gradients={spec.layers[0].query: grad}, params=params, spec=spec, batch_size=4,
        generator=torch.Generator().manual_seed(0), replica=ModelReplica(minilm),
    )
    rec = peeling(inp)
    assert rec.info["certified"] == 4
    assert sorted(rec.sequences) == sorted(truth)  # type: ignore[arg-type]
    assert rec.labels_aligned
    assert [rec.labels[rec.sequences.index(t)] for t in truth] == [r[1] for r in rows]  # type: ignore[index,union-attr]


def test_certificate_separates_true_from_near_miss_sentences(minilm, tokenizer, cola, setup):
    """The exact-gradient certificate: true sentences ≤ 1e-5, a swap of two words or one wrong word ≥ 0.1."""
    spec, params = setup
    enc, grad, _ = _query_gradients(minilm, tokenizer, cola[:4])
    truth = [row[: int(m.sum())] for row, m in zip(enc["input_ids"].tolist(), enc["attention_mask"], strict=True)]
    tables = EmbeddingTables.from_params(params, spec)
    bag = sorted({v for t in truth for v in t})
    atoms = additive_atoms(tables, bag, max(map(len, truth)))
    columns = token_query_gradients(grad, atoms)
    replica = ModelReplica(minilm)
    name = spec.layers[0].query

    def residual(sentence: list[int], members: list[int]) -> float:
        basis = logit_gradients(replica, params, name, sentence)
        cols = [bag.index(v) for v in members]
        pred = torch.stack([token_query_gradients(j, atoms)[:, cols] for j in basis])
        return certify(columns[:, cols], pred)[0]

    for i, sent in enumerate(truth):
        others = {v for j, t in enumerate(truth) if j != i for v in t}
        members = [v for v in set(sent) if v not in others]
        assert residual(sent, members) < 1e-5
        swapped = list(sent)
        swapped[1], swapped[2] = swapped[2], swapped[1]
        assert residual(swapped, members) > 0.1
        wrong = list(sent)
        wrong[-2] = tokenizer.convert_tokens_to_ids("!")
        assert residual(wrong, [v for v in members if v in wrong]) > 0.1


def test_labels_from_coefficient_signs():
    assert label_from_coefficients(torch.tensor([0.2])) == 0
    assert label_from_coefficients(torch.tensor([-0.3])) == 1
    assert label_from_coefficients(torch.tensor([0.1, -0.4, 0.2])) == 2
    res, alpha = certify(torch.tensor([2.0, -4.0]), torch.tensor([[1.0, -2.0]]))
    assert res < 1e-12 and float(alpha[0]) == pytest.approx(2.0)


def test_needs_the_query_gradient(setup):
    spec, _ = setup
    with pytest.raises(NotApplicable, match="query"):
        get_attack("span_cluster").requirements(spec, [spec.layers[0].key])


@pytest.mark.parametrize("restarts", [0, RESTARTS])
def test_word_order_drops_tokens_leaked_from_other_sentences(minilm, tokenizer, cola, setup, restarts):
    """CoLA 8-11 (the comparative run): given the right members, order_sentence recovers sentence 11 exactly
    from its token set plus four tokens of other sentences (they are placed after it and cut off), from its
    first start too (``restarts=0``, what peeling asks of every cluster)."""
    from leak_audit.attacks.text.word_order import order_sentence

    spec, params = setup
    enc, grad, _ = _query_gradients(minilm, tokenizer, cola[8:12])
    truth = [row[: int(m.sum())] for row, m in zip(enc["input_ids"].tolist(), enc["attention_mask"], strict=True)]
    tables = EmbeddingTables.from_params(params, spec)
    bag = sorted({v for t in truth for v in t})
    h = token_query_gradients(grad, additive_atoms(tables, bag, max(map(len, truth))))
    wk = params[spec.layers[0].key].double()

    def key_inputs(tok, pos):
        return tables.pair_inputs(tok, pos) @ wk.T

    target = truth[3]  # john was lots more obnoxious than fred .
    ids = tokenizer.convert_tokens_to_ids
    members = torch.stack([h[:, bag.index(ids(w))].view(12, 32) for w in ("was", "john", "lots")])
    leaked = set(target) | {ids(w) for w in (",", "the", "you", "pay")}
    seq, res, _ = order_sentence(
        leaked, members, key_inputs, 12, cls_token_id=spec.cls_token_id, sep_token_id=spec.sep_token_id,
        restarts=restarts, generator=torch.Generator().manual_seed(0),
    )
    assert seq == target and res < 1e-10


@pytest.mark.parametrize("restarts", [0, RESTARTS])
@pytest.mark.parametrize("index", [5, 12])
def test_word_order_with_three_repeated_words(minilm, tokenizer, cola, setup, index, restarts):
    """CoLA dev 5 ("The more you would want, the less you would eat.") and 12 ("The more people you give beer
    to, the more people get sick."): three words occur twice, so the sentence is three tokens longer than its
    token set. order_sentence orders each exactly from its token set and the query gradients of its words that
    occur once, from its first start too (``restarts=0``); allowed only two extra copies (the default before),
    it cannot."""
    from leak_audit.attacks.text.word_order import order_sentence

    spec, params = setup
    enc, grad, _ = _query_gradients(minilm, tokenizer, [cola[index]])
    truth = enc["input_ids"][0].tolist()
    assert len(truth) - len(set(truth)) == 3
    tables = EmbeddingTables.from_params(params, spec)
    bag = sorted(set(truth))
    h = token_query_gradients(grad, additive_atoms(tables, bag, len(truth)))
    wk = params[spec.layers[0].key].double()

    def key_inputs(tok, pos):
        return tables.pair_inputs(tok, pos) @ wk.T

    once = [v for v in bag if truth.count(v) == 1 and v not in (spec.cls_token_id, spec.sep_token_id)]
    members = torch.stack([h[:, bag.index(v)].view(12, 32) for v in once])
    members = members / members.norm(dim=(1, 2), keepdim=True)
    kw = {"cls_token_id": spec.cls_token_id, "sep_token_id": spec.sep_token_id}
    seq, res, _ = order_sentence(
        set(truth), members, key_inputs, 12, restarts=restarts, generator=torch.Generator().manual_seed(0), **kw
    )
    assert seq == truth and res < 1e-10
    seq, res, _ = order_sentence(
        set(truth), members, key_inputs, 12, extra=2, generator=torch.Generator().manual_seed(0), **kw
    )
    assert seq != truth and res > 1e-6


def test_an_audit_of_the_query_alone_is_a_lower_bound_until_span_cluster_certifies_the_batch(
        minilm, tokenizer, cola, setup):
    """Real CoLA, layer 0's query weight alone (the ``linear:`` view). At B = 4 span_cluster certifies all four
    sentences (ROUGE-1 1.0) and no record is marked. Without span_cluster in the audit, span_check's per-position
    sets (no sentence assignment) read well below that, so every record with sentence metrics in the audit is marked a
    lower bound and a ROUGE-1 gate has no evidence of a pass. One sentence (B = 1) is not a gap: span_check reads it
    exactly, unmarked. Nor is a training-mode (dropout) gradient, where no such gap was measured."""
    from leak_audit.attacks.gaps import QUERY_SENTENCE_ASSIGNMENT, query_sentence_gap
    from leak_audit.capture.batch import default_batch_adapter
    from leak_audit.capture.snapshot import AuditSnapshot
    from leak_audit.gate.policy import GatePolicy, MetricRule
    from leak_audit.runtime.auditor import Auditor

    spec, params = setup
    query = spec.layers[0].query
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731

    def audit(rows, names, train=False):
        if train:  # the observed training-mode gradient: dropout masks in layer 0's inputs
            enc, grads = gradients(minilm, tokenizer, [s for s, _ in rows], [y for _, y in rows], train=True)
            grad = grads[query]
        else:
            enc, grad, _ = _query_gradients(minilm, tokenizer, rows)
        batch = default_batch_adapter({**enc, "labels": torch.tensor([y for _, y in rows])})
        snap = AuditSnapshot(0, 0, 0.0, {query: grad}, params, batch, ("",))
        auditor = Auditor(spec, [get_attack(n) for n in names], {query}, decode, replica=ModelReplica(minilm))
        return {r.attack: r for r in auditor(snap)}

    certified = audit(cola[:4], ["span_check", "span_cluster"])
    assert certified["span_cluster"].info["certified"] == 4 and certified["span_cluster"].metrics["rouge1"] == 1.0
    assert not any("lower_bound" in r.info for r in certified.values())

    alone = audit(cola[:4], ["span_check"])
    assert alone["span_check"].status == "ok" and alone["span_check"].metrics["rouge1"] < 0.9
    assert alone["span_check"].info["lower_bound"].startswith(QUERY_SENTENCE_ASSIGNMENT)
    assert "span_cluster is not among its attacks" in alone["span_check"].info["lower_bound"]
    result = GatePolicy((MetricRule("rouge1", max=0.5),)).evaluate(list(alone.values())).results[0]
    assert result.only_lower_bounds and result.status == "fail"

    one = audit(cola[4:5], ["span_check"])
    assert one["span_check"].metrics["rouge1"] == 1.0 and "lower_bound" not in one["span_check"].info
    # dropout on: span_check reads the gradient in its dropout mode; no such gap measured there, so no mark
    dropout = audit(cola[:4], ["span_check"], train=True)
    assert dropout["span_check"].info["dropout_mode"] == 1 and "lower_bound" not in dropout["span_check"].info
    # the full view: span_attention assigns sentences there; a decoder or DP noise: no such gap measured
    assert query_sentence_gap(spec, set(params), 4, 0.0, {}) is None
    assert query_sentence_gap(spec, {query}, 4, 1e-3, {}) is None
    assert query_sentence_gap(spec, {query, spec.layers[0].key}, 4, 0.0, {}) is None
