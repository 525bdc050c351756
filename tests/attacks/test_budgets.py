"""Every attack honours its time budget: past the audit's deadline it returns its best so far, marked
``timed_out`` with ``info["progress"]``, within one uninterruptible step of the budget.

An attack that ran out of time used to be recorded as ``ok`` with ROUGE-1 0 ("no leakage"), and some
ignored the deadline: span_search overran a 10 s budget to 206 s at B = 16 on SST-2 (one unchunked
replacement step over a ~4600-token pool), span_cluster ran minutes past its budget on long sentences
(a word-order step over ~1300 placements, 25 lasso iterations between checks).

Settings are chosen so that each attack would take clearly longer than its budget: the pretrained
MiniLM, real CoLA and SST-2 sentences, B = 16 or long sentences. Gradients are computed once per module.
The benchmark data comes through the shared fixtures (absent data fails these tests, never skips them).
One intra-op thread: on 2 shared cores two threads ran an SVD 75x slower (oversubscription).
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from leak_audit.attacks import AttackInput, Reconstruction, available_attacks, get_attack
from leak_audit.attacks.budget import NO_TIME_LEFT
from leak_audit.attacks.text.dlg import DLG
from leak_audit.attacks.text.gradient_matching import GradientMatching
from leak_audit.attacks.image.dlg import ImageDLG
from leak_audit.attacks.image.inverting_gradients import InvertingGradients
from leak_audit.attacks.text.span_search import SpanSearch
from leak_audit.demos.datasets import read_tsv
from leak_audit.demos.image_models import LeNet
from leak_audit.models.image_replica import ImageReplica
from leak_audit.models import image_model_spec, text_model_spec
from leak_audit.models.replica import ModelReplica
from tests.conftest import data_file, gradients

SLACK = 1.5
"""Seconds an attack may run past its budget (one uninterruptible step and the final scoring)."""

QUERY0 = "bert.encoder.layer.0.attention.self.query"
QUERY3 = "bert.encoder.layer.3.attention.self.query"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(minilm, tokenizer):
    spec = text_model_spec(minilm).with_tokenizer(tokenizer)
    params = {n: p.detach() for n, p in minilm.named_parameters()}
    return spec, params, ModelReplica(minilm)


@pytest.fixture(scope="module")
def batches(minilm, tokenizer, cola):
    """``{case: (batch size, gradients)}`` of real sentences, computed once (dropout off unless ``_train``)."""
    sst2 = read_tsv(data_file("sst2_dev.tsv"))
    longest = sorted(sst2[:200], key=lambda r: -len(r[0]))[:4]  # 45-55 tokens each

    def grads(rows, train=False):
        return len(rows), gradients(minilm, tokenizer, [r[0] for r in rows], [r[1] for r in rows], train=train)[1]

    return {
        "cola1": grads(cola[2:3]),
        "cola16": grads(cola[16:32]),
        "cola4_train": grads(cola[0:4], train=True),
        "sst2_16": grads(sst2[:16]),
        "sst2_long4": grads(longest),
        "sst2_long1": grads(longest[:1]),
    }


def _call(attack, setup, batch, tapped=None, budget=None, priors=None) -> tuple[Reconstruction, float]:
    """Run ``attack`` on ``batch`` with the audit deadline ``budget`` seconds from now (``None``: none);
    returns the reconstruction and the wall time of the call."""
    spec, params, replica = setup
    size, grads = batch
    attack = get_attack(attack) if isinstance(attack, str) else attack
    req = attack.requirements(spec, list(grads) if tapped is None else tapped)
    start = time.monotonic()
    inp = AttackInput(
        gradients={k: grads[k] for k in req.gradients}, params=params, spec=spec, batch_size=size,
        priors=priors or {}, generator=torch.Generator().manual_seed(0), replica=replica,
        deadline=None if budget is None else start + budget,
    )
    with torch.no_grad():  # as the Auditor runs attacks
        rec = attack(inp)
    return rec, time.monotonic() - start


def _assert_timed_out(rec: Reconstruction, elapsed: float, budget: float) -> None:
    print(f"{rec.attack}: {elapsed:.2f} s for a {budget} s budget; {rec.info.get('progress')}")
    assert elapsed <= budget + SLACK, f"{rec.attack} ran {elapsed:.1f} s on a {budget} s budget"
    assert rec.timed_out, f"{rec.attack} was stopped by the audit's deadline but not marked timed out: {rec.info}"
    assert isinstance(rec.info.get("progress"), str) and rec.info["progress"], rec.info


def _assert_finished(rec: Reconstruction) -> None:
    assert not rec.timed_out, rec.info
    assert "progress" not in rec.info, rec.info


def _token_bag(setup, batch) -> Reconstruction:
    return _call("token_bag", setup, batch)[0]


# ------------------------------------------------------------------ every attack, deadline already gone


@pytest.mark.parametrize("name", [n for n in available_attacks("text") if n != "span_decoder"])  # decoders:
def test_a_text_attack_started_past_the_deadline_returns_at_once(name, setup, batches):  # test_decoders.py
    spec, params, replica = setup
    size, grads = batches["cola16"]
    attack = get_attack(name)
    req = attack.requirements(spec, list(grads))
    start = time.monotonic()
    inp = AttackInput(gradients={k: grads[k] for k in req.gradients}, params=params, spec=spec, batch_size=size,
                      replica=replica, deadline=start - 1.0)
    rec = attack(inp)
    assert time.monotonic() - start < 0.5
    assert rec.timed_out and rec.info["progress"] == NO_TIME_LEFT


@pytest.mark.parametrize("name", ["labels", "token_bag"])
def test_analytic_attacks_finish_well_within_a_budget(name, setup, batches):
    rec, elapsed = _call(name, setup, batches["sst2_16"], budget=5.0)
    assert elapsed < 5.0
    _assert_finished(rec)


# ------------------------------------------------------------------ text attacks on tight budgets


def test_span_check_scan_past_the_budget_is_a_timeout(setup, batches):
    """B = 16 SST-2 sentences, layer 0's query, the whole vocabulary: a 40-position scan (~20 s before the
    residuals were blocked, 0.3-1 s since, so the budget is far below that)."""
    rec, elapsed = _call("span_check", setup, batches["sst2_16"], [QUERY0 + ".weight"], budget=0.05)
    _assert_timed_out(rec, elapsed, 0.05)
    # with the token bag the same scan takes a fraction of a second: finished, not timed out
    bag = _token_bag(setup, batches["sst2_16"])
    rec, _ = _call("span_check", setup, batches["sst2_16"], [QUERY0 + ".weight"], budget=60.0,
                   priors={"token_bag": bag})
    _assert_finished(rec)
    assert rec.info["length"] >= 20


def test_span_check_stops_between_vocabulary_chunks_of_its_scorer(setup, batches, monkeypatch):
    """The scorer's per-token terms over the 30,522-token vocabulary took 0.41 s in one step, and once 1.9 s
    on a loaded machine (past the slack above): they are now built in chunks with a deadline check between
    them. The deadline is made to pass at the scorer's third chunk, whatever the clock says."""
    from leak_audit.attacks.text import token_scores

    checks = []
    monkeypatch.setattr(token_scores, "late", lambda deadline: checks.append(deadline) or len(checks) >= 3)
    rec, _ = _call("span_check", setup, batches["sst2_16"], [QUERY0 + ".weight"], budget=60.0)
    assert len(checks) == 3  # two chunks built, the third check stopped the scorer, nothing ran after it
    assert rec.timed_out and rec.sequences == []
    assert rec.info["progress"] == "stopped while scoring the vocabulary: no position scanned"


def test_span_check_with_dropout_past_the_budget_is_a_timeout(setup, batches):
    """Training-mode gradient: every position shortlists the vocabulary and refits (~1 s a position)."""
    rec, elapsed = _call("span_check", setup, batches["cola4_train"], [QUERY0 + ".weight"], budget=2.0)
    _assert_timed_out(rec, elapsed, 2.0)


def test_span_attention_dropout_past_the_budget_is_a_timeout_and_exact_batch_finishes(setup, batches):
    rec, elapsed = _call("span_attention", setup, batches["cola4_train"], budget=1.0)
    _assert_timed_out(rec, elapsed, 1.0)
    assert rec.info["dropout"]
    # B = 16 exact gradients with time to spare: all certified, not timed out
    rec, _ = _call("span_attention", setup, batches["cola16"], budget=120.0)
    _assert_finished(rec)
    assert rec.info["certified"] == 16


def test_span_cluster_on_long_sentences_past_the_budget_is_a_timeout(setup, batches):
    """The 4 longest of the first 200 SST-2 sentences (45-55 tokens), layer 0's query alone: without a
    deadline this once ran for more than 15 minutes. With the token bag the span check is quick, and the
    whole audit now ends in 3.4 s in a fast hour of this project's 2-core machine (certifying none). So the
    budget is a quarter of this machine's own unbounded run (at most 1 s), which ends it after the span check
    (in the pair pursuit or peeling) however fast the machine."""
    bag = _token_bag(setup, batches["sst2_long4"])
    full, unbounded = _call("span_cluster", setup, batches["sst2_long4"], [QUERY0 + ".weight"],
                            priors={"token_bag": bag})
    _assert_finished(full)
    budget = min(1.0, unbounded / 4)
    rec, elapsed = _call("span_cluster", setup, batches["sst2_long4"], [QUERY0 + ".weight"], budget=budget,
                         priors={"token_bag": bag})
    _assert_timed_out(rec, elapsed, budget)
    # without the bag the full-vocabulary span check is cut: its tokens are incomplete, no clustering
    rec, elapsed = _call("span_cluster", setup, batches["sst2_long4"], [QUERY0 + ".weight"], budget=0.05)
    _assert_timed_out(rec, elapsed, 0.05)
    assert rec.info["progress"].startswith("span check")


def test_span_search_at_b16_on_sst2_layer3_returns_within_its_budget(setup, batches):
    """The reported case: SST-2, layer 3's query alone, B = 16 (369 tokens). One replacement step scores
    a ~4600-token pool against the batch; unchunked it overran a 10 s budget to 206 s."""
    rec, elapsed = _call("span_search", setup, batches["sst2_16"], [QUERY3 + ".weight", QUERY3 + ".bias"], budget=6.0)
    _assert_timed_out(rec, elapsed, 6.0)
    assert rec.info["sweeps"] >= 1  # the budget ended in the discrete descent, where the overrun was


def test_span_search_own_time_limit_is_no_timeout(setup, batches):
    """Stopped by its own ``max_seconds`` (the audit's deadline is later): a measured result, not a timeout. A
    review of 45+ tokens, which the search does not certify in 2 s (since the bfloat16 screening it certifies
    CoLA dev 2 within 2 s on this project's machine, so that sentence no longer tests a stop by time)."""
    attack = SpanSearch(max_seconds=2.0)
    rec, elapsed = _call(attack, setup, batches["sst2_long1"], [QUERY3 + ".weight", QUERY3 + ".bias"], budget=60.0)
    assert elapsed <= 2.0 + SLACK
    assert rec.info["exact"] == 0  # stopped by time, not by the certificate
    _assert_finished(rec)


@pytest.mark.parametrize("name", ["gradient_matching", "dlg"])
def test_optimisation_attacks_past_the_audit_budget_time_out(name, setup, batches):
    """B = 1, layer 3's query: their own limit is 20 s, so a 1 s audit deadline binds."""
    rec, elapsed = _call(name, setup, batches["cola1"], [QUERY3 + ".weight", QUERY3 + ".bias"], budget=1.0)
    _assert_timed_out(rec, elapsed, 1.0)


@pytest.mark.parametrize(
    "attack",
    [GradientMatching(max_seconds=1.0), DLG(max_seconds=1.0), DLG(max_steps=3)],
    ids=["gradient_matching-own-seconds", "dlg-own-seconds", "dlg-max-steps"],
)
def test_optimisation_attacks_stopped_by_their_own_rule_are_not_timed_out(attack, setup, batches):
    rec, _ = _call(attack, setup, batches["cola1"], [QUERY3 + ".weight", QUERY3 + ".bias"], budget=60.0)
    _assert_finished(rec)


# ------------------------------------------------------------------ image attacks


@pytest.fixture(scope="module")
def image_case(cifar10):
    images, labels = cifar10[0][:1], cifar10[1][:1]
    model = LeNet(seed=0)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return image_model_spec(model), {n: p.detach() for n, p in model.named_parameters()}, ImageReplica(model), grads


def _call_image(attack, case, budget: float | None) -> tuple[Reconstruction, float]:
    spec, params, replica, grads = case
    start = time.monotonic()
    inp = AttackInput(
        gradients=grads, params=params, spec=spec, batch_size=1, generator=torch.Generator().manual_seed(0),
        deadline=None if budget is None else start + budget, replica=replica, input_shape=(3, 32, 32),
        input_range=(0.0, 1.0),
    )
    rec = attack(inp)
    return rec, time.monotonic() - start


@pytest.mark.parametrize("attack", [ImageDLG(), InvertingGradients()], ids=["dlg", "inverting_gradients"])
def test_image_attacks_past_the_budget_time_out(attack, image_case):
    """DLG's LeNet on a real CIFAR-10 image: 1000 evaluations (per restart) take several seconds."""
    rec, elapsed = _call_image(attack, image_case, 0.5)
    _assert_timed_out(rec, elapsed, 0.5)
    assert rec.images is not None and math.isfinite(rec.info["distance"])


@pytest.mark.parametrize("name", available_attacks("image"))
def test_an_image_attack_started_past_the_deadline_returns_at_once(name, image_case):
    rec, elapsed = _call_image(get_attack(name, "image"), image_case, -1.0)
    assert elapsed < 0.5
    assert rec.timed_out and rec.info["progress"] == NO_TIME_LEFT


def test_image_attack_finishing_its_steps_is_not_timed_out(image_case):
    rec, _ = _call_image(InvertingGradients(max_steps=5, restarts=1), image_case, 60.0)
    _assert_finished(rec)
    assert rec.info["steps"] == 5
