"""position_match on the pretrained MiniLM and real CoLA sentences: exact text from the embedding gradients at B = 1,
in eval and training mode, and under DP-SGD noise released by Opacus."""

from __future__ import annotations

import pytest
import torch

from leak_audit.attacks import AttackInput, NotApplicable, get_attack
from leak_audit.attacks.text.position_match import PositionMatch, position_match
from tests.conftest import gradients


def _attack_input(spec, grads, batch_size: int = 1, noise_std: float = 0.0) -> AttackInput:
    return AttackInput(gradients=grads, params={}, spec=spec, batch_size=batch_size, noise_std=noise_std)


def test_every_cola_sentence_comes_back_in_order_from_exact_gradients(minilm, tokenizer, spec, cola):
    """The first 64 CoLA dev sentences one at a time: all exact, among them dev 58, which repeats "this", "is",
    "the" and "which" (its single moves stall; the exchange of two positions' tokens finishes it)."""
    attack = get_attack("position_match")
    wrong = []
    for k, (sentence, label) in enumerate(cola[:64]):
        enc, grads = gradients(minilm, tokenizer, [sentence], [label], train=False)
        rec = attack(_attack_input(spec, grads))
        if rec.sequences != [enc["input_ids"][0].tolist()]:
            wrong.append(k)
    assert wrong == []


def test_training_mode_gradients_give_the_same_sentences(minilm, tokenizer, spec, cola):
    """Embedding dropout acts after the LayerNorm, so both tables still share each position's gradient."""
    for k, (sentence, label) in enumerate(cola[:8]):
        enc, grads = gradients(minilm, tokenizer, [sentence], [label], train=True, seed=k)
        found = position_match(grads[spec.word_embeddings], grads[spec.position_embeddings])
        assert found.sequence == enc["input_ids"][0].tolist(), k
        assert found.objective < 1e-10


def test_under_dp_noise_the_released_gradient_still_gives_the_sentences(cola):
    """Opacus's release (flat clipping to C = 1 over all 22.7M parameters, B = 1): at σ = 1e-4, where the span
    attacks read nothing (benchmarks/README.md, DP-SGD), nearly every sentence comes back exactly; at σ = 1e-2 no
    position row stands above the noise and the attack says so."""
    from leak_audit.cli.bench.dp import DPGradients
    from leak_audit.cli.bench.text_run import load_model
    from leak_audit.models import text_model_spec

    model, tokenizer, _ = load_model(None, 0)
    spec = text_model_spec(model).with_tokenizer(tokenizer)
    names = [n for n, _ in model.named_parameters()]
    attack = PositionMatch()
    for sigma, rows in ((1e-4, cola[:16]), (1e-2, cola[:2])):
        with DPGradients(model, sigma, 1.0, train=False) as dp:
            released = [dp(tokenizer, [row], names, seed=i) for i, row in enumerate(rows)]
        if sigma > 1e-3:
            for _, grads, _ in released:
                with pytest.raises(NotApplicable, match="no position-embedding row stands above the noise"):
                    attack(_attack_input(spec, grads, noise_std=sigma))
            continue
        exact = right = total = 0
        for batch, grads, _ in released:
            truth = batch.input_ids[0].tolist()
            (seq,) = attack(_attack_input(spec, grads, noise_std=sigma)).sequences
            exact += seq == truth
            right += sum(a == b for a, b in zip(seq, truth))
            total += len(truth)
        assert exact >= 14, exact
        assert right / total >= 0.97, right / total


def test_what_it_needs_and_bad_arguments(minilm, tokenizer, spec, cola):
    attack = PositionMatch()
    with pytest.raises(NotApplicable, match="word and position embeddings"):
        attack.requirements(spec, {spec.word_embeddings})
    assert attack.requirements(spec, {spec.word_embeddings, spec.position_embeddings}).gradients == {
        spec.word_embeddings, spec.position_embeddings}
    _, grads = gradients(minilm, tokenizer, [s for s, _ in cola[:4]], [y for _, y in cola[:4]], train=False)
    with pytest.raises(NotApplicable, match="B = 4: each position's row sums 4 sentences"):
        attack(_attack_input(spec, grads, batch_size=4))
    with pytest.raises(ValueError, match="top_k must be >= 0, got -1"):
        PositionMatch(top_k=-1)
    word = grads[spec.word_embeddings]
    with pytest.raises(ValueError, match="one width"):
        position_match(word, torch.zeros(8, 5))
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        position_match(word, grads[spec.position_embeddings], noise_std=-1.0)
    with pytest.raises(NotApplicable, match="no position-embedding row"):
        position_match(word, torch.zeros_like(grads[spec.position_embeddings]))
