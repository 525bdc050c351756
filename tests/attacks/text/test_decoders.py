"""Causal decoders (the Llama and GPT-2 families): the model layer reads them, span_decoder recovers their
text exactly.

Claims about leakage are measured on the real pretrained SmolLM2-135M-Instruct and real CoLA sentences;
random-init configs check the family seams (Qwen2's q/k/v biases and grouped-query attention; GPT-2's
learned positions and fused, transposed ``Conv1D`` projections).
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from leak_audit import LeakageAudit
from leak_audit.attacks import get_attack
from leak_audit.attacks.base import AttackInput, NotApplicable, Reconstruction
from leak_audit.attacks.text.decoder_pursuit import context_states
from leak_audit.demos.datasets import read_tsv
from leak_audit.models import text_model_spec
from leak_audit.models.replica import ModelReplica
from tests.conftest import data_file


def _lm_batch(tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(sentences, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _attack(model: torch.nn.Module, batch: dict[str, torch.Tensor], tapped=None, deadline=None, attack="span_decoder"):
    """Run ``attack`` (span_decoder by default) on the causal-LM gradient of ``batch`` (eval mode), tapping ``tapped``
    (all: None), under the audit's ``deadline`` (``time.monotonic()``; None: none)."""
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if tapped is not None:
        grads = {n: g for n, g in grads.items() if n.startswith(tuple(tapped))}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = text_model_spec(model)
    attack = get_attack(attack, "text")
    attack.requirements(spec, grads.keys())
    b = batch["input_ids"].shape[0]
    return attack.run(AttackInput(grads, params, spec, b, replica=ModelReplica(model), deadline=deadline))


def _truth(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


@pytest.fixture(scope="module")
def smollm2(smollm2_path: str):
    from leak_audit.demos.pretrained import load_smollm2

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_smollm2("causal-lm")


def test_the_llama_family_spec_of_smollm2(smollm2) -> None:
    model, _ = smollm2
    spec = text_model_spec(model)
    assert (spec.family, spec.position_scheme, spec.norm_kind, spec.causal) == ("llama", "rotary", "rmsnorm", True)
    assert (spec.hidden_size, spec.vocab_size, spec.num_heads, spec.num_kv_heads) == (576, 49152, 9, 3)
    first = spec.layers[0]
    assert (first.query_dim, first.key_dim, first.value_dim) == (576, 192, 192)  # grouped-query attention
    assert spec.tied_embeddings and spec.lm_head == spec.word_embeddings == "model.embed_tokens.weight"
    assert spec.decoder_view() == ("model.layers.0", "model.layers.1.self_attn.q_proj",
                                   "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
                                   "model.embed_tokens")


def test_span_decoder_recovers_real_cola_sentences_exactly_from_smollm2(smollm2) -> None:
    """B = 4 real CoLA sentences, next-token loss, the default decoder view: every sentence exactly, its last
    token included (read from the tied LM head's gradient, which is dense over all 49,152 rows)."""
    model, tokenizer = smollm2
    sentences = [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=4)]
    batch = _lm_batch(tokenizer, sentences)
    view = text_model_spec(model).decoder_view()
    recon = _attack(model, batch, tapped=view)
    assert recon.info["last_token"] == "lm_head"
    assert sorted(recon.sequences) == sorted(_truth(batch))
    assert sorted(tokenizer.decode(s) for s in recon.sequences) == sorted(sentences)


def test_one_linear_of_layer_0_gives_the_exact_bag(smollm2) -> None:
    """Layer 0's v_proj alone: its gradient's row space holds every position that feeds a loss (all but each
    sentence's last), and nothing orders them: the attack returns exactly those tokens as a bag."""
    model, tokenizer = smollm2
    sentences = [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=4)]
    batch = _lm_batch(tokenizer, sentences)
    recon = _attack(model, batch, tapped=["model.layers.0.self_attn.v_proj."])
    assert recon.sequences is None and "no tapped map depends on the prefix" in recon.info["order"]
    assert set(recon.token_bag) == {t for seq in _truth(batch) for t in seq[:-1]}


def test_left_padding_is_read_like_right_padding(smollm2) -> None:
    """Rotary positions are relative and padded keys are masked, so a left-padded sentence's hidden states are
    those of the sentence alone: the assembly from position 0 finds it, and padding positions (no target, no
    key) leave no trace in the gradients."""
    model, tokenizer = smollm2
    sentences = [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=12)][8:12]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = _lm_batch(tokenizer, sentences)
    finally:
        tokenizer.padding_side = side
    assert int((batch["attention_mask"] == 0).sum()) > 0 and bool((batch["attention_mask"][:, 0] == 0).any())
    recon = _attack(model, batch)
    assert sorted(recon.sequences) == sorted(_truth(batch))


def test_without_the_head_the_last_token_is_matched_at_the_position_before_it(smollm2) -> None:
    """Under causal LM the last position predicts nothing, so layers 0 and 1 never see the last token at its own
    position. It is the target of the position before, whose gradient at layer 1 depends on it alone: the
    model's likeliest next tokens are tried there, and the one whose gradient matches is the last token."""
    model, tokenizer = smollm2
    sentences = [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=2)]
    batch = _lm_batch(tokenizer, sentences)
    recon = _attack(model, batch, tapped=["model.layers.0.", "model.layers.1."])
    assert recon.info["last_token"] == "matched at model.layers.1.self_attn.q_proj: 2 of 2", recon.info
    assert sorted(recon.sequences) == sorted(_truth(batch))


def test_encoder_attacks_say_they_read_encoders_and_labels_say_why(smollm2) -> None:
    model, _ = smollm2
    spec = text_model_spec(model)
    tapped = {n for n, _ in model.named_parameters()}
    for name in ("span_check", "span_attention", "span_cluster", "span_search"):
        with pytest.raises(NotApplicable, match="causal decoder, read by span_decoder"):
            get_attack(name, "text").requirements(spec, tapped)
    with pytest.raises(NotApplicable, match="labels are the text itself"):
        get_attack("labels", "text").requirements(spec, tapped)
    with pytest.raises(NotApplicable, match="tied to the LM head"):
        get_attack("token_bag", "text").requirements(spec, tapped)


def test_random_qwen2_with_biases_and_grouped_query_attention_b2() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    spec = text_model_spec(model)
    assert spec.family == "llama" and spec.model_type == "qwen2" and not spec.tied_embeddings
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    recon = _attack(model, batch)
    assert sorted(recon.sequences) == sorted(ids.tolist())


def _gpt2_config(**extra):
    from transformers import GPT2Config

    # dropout off (the attack reads eval-mode gradients); bos/eos inside the small vocabulary
    return GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **extra)


def test_random_gpt2_causal_lm_b2() -> None:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(_gpt2_config()).eval()
    spec = text_model_spec(model)
    assert (spec.family, spec.position_scheme, spec.tied_embeddings, spec.causal) == ("gpt2", "absolute", True, True)
    layer = spec.layers[0]
    assert layer.fused and layer.transposed and layer.query == layer.key == layer.value == "transformer.h.0.attn.c_attn.weight"
    assert spec.decoder_view() == ("transformer.h.0", "transformer.h.1.attn.c_attn", "transformer.wte")
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    recon = _attack(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    assert sorted(recon.sequences) == sorted(ids.tolist())  # every token, the last one from the tied LM head
    assert recon.info["candidate_positions"] == 8 and recon.info["last_token"] == "lm_head"


def test_random_gpt2_sequence_classifier_b2() -> None:
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(_gpt2_config(pad_token_id=0, num_labels=2)).eval()
    spec = text_model_spec(model)
    assert spec.classifier_weight == "score.weight" and spec.lm_head is None and spec.num_labels == 2
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    recon = _attack(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])})
    assert sorted(recon.sequences) == sorted(ids.tolist())  # the classifier reads the last token: all 9 seen


def test_context_states_average_each_tokens_state_after_every_context_token() -> None:
    """context_states: row i is token i's input to the module at position 1, averaged over the contexts put before
    it (here every bag token), as computed one two-token sequence at a time."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = _gpt2_config()
    config.n_embd, config.n_layer = 64, 2
    model = GPT2LMHeadModel(config).eval()
    replica, params = ModelReplica(model), {n: p.detach() for n, p in model.named_parameters()}
    module, tokens = "transformer.h.1.attn.c_attn", torch.tensor([7, 31, 400])
    states = context_states(replica, params, [module], tokens, chunk=4)[0]
    assert states.shape == (3, 64) and states.dtype == torch.float64
    for i, v in enumerate(tokens.tolist()):
        seqs = torch.tensor([[u, v] for u in tokens.tolist()])
        expected = replica.module_inputs(params, [module], seqs)[module][:, 1].double().mean(0)
        torch.testing.assert_close(states[i], expected, rtol=1e-5, atol=1e-6)
    assert context_states(replica, params, [module], tokens, deadline=0.0) is None  # past the deadline: nothing


def test_gpt2_lora_beyond_its_rank_gives_the_sentences_less_their_last_token() -> None:
    """GPT-2's layer-0 inputs carry learned positions: LayerNorm(wte[v] + wpe[i]) lies in the span of a token atom,
    a position atom and the bias, so the bag comes from joint sparse recovery over those (27 positions against
    the 4 rows of a rank-4 c_attn adapter), and the prefixes from layer 1's adapter as for rotary decoders."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = _gpt2_config()
    config.n_embd, config.n_layer = 128, 3
    model = get_peft_model(GPT2LMHeadModel(config).eval(), LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)).eval()
    with torch.no_grad():  # as after some training: lora_B != 0, so the lora_A gradients are not zero
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=generator)
    ids = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    recon = _attack(model, batch, tapped=[n for n, p in model.named_parameters() if p.requires_grad])
    assert recon.info["saturated"] == 1 and recon.info["order"] == "pursuit" and recon.info["bag_residual"] < 1e-5
    assert sorted(recon.sequences) == sorted(s[:-1] for s in ids.tolist())  # a random model rarely predicts the last


def test_a_trainer_run_on_a_random_gpt2_is_audited_not_refused(tmp_path: Path) -> None:
    """A GPT2LMHeadModel used to stop training at setup (UnsupportedModelError); now it gets the decoder
    defaults and an exact audit."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(_gpt2_config())
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(2))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path, max_seconds=120)
    trainer = Trainer(max_steps=1, callbacks=[audit], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_CausalLM(model, None), DataLoader(batches, batch_size=None))
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["attack"], r["status"]) for r in records] == [("span_decoder", "ok")], records
    assert records[0]["metrics"]["exact_match"] == pytest.approx(1.0)


def test_span_decoder_started_past_the_deadline_returns_at_once() -> None:
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    from leak_audit.attacks.budget import NO_TIME_LEFT

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = time.monotonic()
    inp = AttackInput(grads, params, text_model_spec(model), 2, replica=ModelReplica(model), deadline=start - 1.0)
    rec = get_attack("span_decoder", "text")(inp)
    assert time.monotonic() - start < 0.5
    assert rec.timed_out and rec.info["progress"] == NO_TIME_LEFT


class _CausalLM(LightningModule):
    def __init__(self, model, tokenizer) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def test_a_trainer_run_on_smollm2_writes_exact_audits(smollm2, tmp_path: Path) -> None:
    """The callback on a causal LM with no arguments but the schedule: decoder defaults (span_decoder on
    layer 0, layer 1's attention and the LM head), ok records with ROUGE-1 1.0 and exact match 1.0."""
    model, tokenizer = smollm2
    sentences = [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=8)][4:]
    batches = [_lm_batch(tokenizer, sentences)]
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path, max_seconds=300, end_timeout=600)
    trainer = Trainer(max_steps=1, callbacks=[audit], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_CausalLM(model, tokenizer), DataLoader(batches, batch_size=None))
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["attack"] for r in records] == ["span_decoder"]
    record = records[0]
    assert record["status"] == "ok", record.get("error")
    assert record["metrics"]["rouge1"] == pytest.approx(1.0)
    assert record["metrics"]["exact_match"] == pytest.approx(1.0)
    assert record["info"]["snapshot_bytes"] > 0


def test_what_an_audit_copies_per_view(smollm2) -> None:
    """Layers 0 and 1 alone copy about 20 MB (their gradients and weights, the embedding table); the LM head
    adds its [V, d] gradient and, under full fine-tuning, every weight (the last-token step runs the model)."""
    from leak_audit.runtime.auditor import Auditor

    model, _ = smollm2
    spec = text_model_spec(model)
    sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    replica = ModelReplica(model)

    def copied(prefixes: tuple[str, ...]) -> int:
        tapped = [n for n in sizes if n.startswith(prefixes)]
        auditor = Auditor(spec, [get_attack("span_decoder", "text")], tapped, replica=replica)
        assert auditor.applicable == ["span_decoder"]
        return sum(sizes[n] for n in auditor.gradient_names) + sum(sizes[n] for n in auditor.param_names)

    two_layers = copied(("model.layers.0.", "model.layers.1."))
    assert two_layers < 200e6  # layers 0-1 (gradients and weights, about 56 MB) and the 113 MB embedding table
    with_head = copied(("model.layers.0.", "model.layers.1.", "model.embed_tokens."))
    assert with_head > 600e6  # + the head's gradient and every weight of the model


def test_a_trainer_run_with_lora_on_smollm2_audits_the_adapters(smollm2_path: str, tmp_path: Path) -> None:
    """peft LoRA (r = 8 on q_proj/v_proj) on the real SmolLM2, batch of one CoLA sentence: the default view keeps
    what trains (layers 0-1's adapters; the frozen LM head drops out) and span_decoder reads the adapters' A
    gradients. At initialisation (lora_B = 0) those gradients vanish and nothing is recovered; three AdamW
    steps later the sentence is recovered exactly: up to its last token from the adapters' row spaces, and the
    last token (its position predicts nothing, and the LM head is frozen) matched against the adapters'
    gradient at the position before it."""
    from peft import LoraConfig, get_peft_model

    from leak_audit.demos.pretrained import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2("causal-lm")  # a fresh copy: peft changes the model in place
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    sentence = read_tsv(data_file("cola_dev.tsv"), limit=1)[0][0]
    batches = [_lm_batch(tokenizer, [sentence])] * 4

    class LoraLM(_CausalLM):
        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    audit = LeakageAudit(every_n_steps=3, log_dir=tmp_path, max_seconds=300, end_timeout=600)
    trainer = Trainer(max_steps=4, callbacks=[audit], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LoraLM(model, tokenizer), DataLoader(batches, batch_size=None))
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())}
    assert set(records) == {0, 3} and all(r["attack"] == "span_decoder" for r in records.values())
    assert not any("lm_head" in m or "embed_tokens" in m for m in records[3]["modules"]), records[3]["modules"]
    at_init, trained = records[0], records[3]
    assert at_init["status"] == "ok" and at_init["info"]["rank_layer0"] == 0 and at_init["metrics"]["rouge1"] == 0.0
    assert trained["status"] == "ok", trained.get("error")
    truth = tokenizer(sentence)["input_ids"]
    assert trained["info"]["candidates"] >= len(set(truth[:-1])) and trained["info"]["prefixes"] == 1
    assert trained["info"]["last_token"].endswith("1 of 1"), trained["info"]
    assert trained["metrics"]["exact_match"] == 1.0 and trained["metrics"]["rouge1"] == 1.0


@pytest.fixture(scope="module")
def lora_smollm2(smollm2_path: str):
    """A fresh SmolLM2 (peft changes the model in place) with peft LoRA r = 8 on q_proj/v_proj, trained five AdamW
    steps on CoLA sentences 4-11 so that ``lora_B != 0``; the tests below only read its gradients."""
    from peft import LoraConfig, get_peft_model

    from leak_audit.demos.pretrained import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2("causal-lm")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0)).eval()
    rows = [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=12)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for start in (4, 8, 4, 8, 4):
        model.zero_grad()
        model(**_lm_batch(tokenizer, rows[start:start + 4])).loss.backward()
        opt.step()
    return model, tokenizer


def test_lora_beyond_its_rank_gives_the_sentences_of_a_batch(lora_smollm2, monkeypatch) -> None:
    """peft LoRA r = 8 on q_proj/v_proj of the real SmolLM2, trained a few steps; then a batch of four real CoLA
    sentences: 40 positions against the 16 rows of layer 0's stacked adapter gradients, so no single input lies
    in their row space. Joint sparse recovery still finds the exact token bag from layer 0's adapters and the
    sentences from layer 1's, up to each last token; that one (no gradient sees its position) is the target of
    the position before, whose adapter gradient the model's likeliest next tokens are matched against."""
    model, tokenizer = lora_smollm2
    rows = [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=4)]
    batch = _lm_batch(tokenizer, rows)
    truth = _truth(batch)
    assert sum(len(t) for t in truth) > 2 * 16  # beyond the rank: the span test alone reads nothing exactly
    recon = _attack(model, batch, tapped=[n for n, p in model.named_parameters() if p.requires_grad])
    assert recon.info["saturated"] == 1 and recon.info["order"] == "pursuit", recon.info
    assert set(recon.token_bag) == {t for seq in truth for t in seq[:-1]}
    assert sorted(recon.sequences) == sorted(truth), [tokenizer.decode(q) for q in recon.sequences]
    assert recon.info["last_token"].endswith(": 4 of 4"), recon.info
    assert "lower_bound" not in recon.info and recon.info["pursuit_residual"] < 1e-4  # the fit closed: a measurement
    # a pursuit that stops early (patience 1 instead of 24) leaves the gradient unexplained: its sentences are
    # guesses, and the record says its sentence metrics are lower bounds (peeling, tested below, left out)
    import functools

    import leak_audit.attacks.text.span_decoder as span_decoder
    from leak_audit.attacks.gaps import DECODER_PURSUIT_UNFINISHED

    monkeypatch.setattr(span_decoder, "pursue_prefixes", functools.partial(span_decoder.pursue_prefixes, patience=1))
    stopped = _attack(model, batch, tapped=[n for n, p in model.named_parameters() if p.requires_grad],
                      attack=span_decoder.SpanDecoder(peel=False))
    assert stopped.info["pursuit_residual"] > 1e-4 and not stopped.timed_out, stopped.info
    assert stopped.info["lower_bound"] == DECODER_PURSUIT_UNFINISHED
    # peeling that the audit's deadline stops before it certifies anything: the record says so and is a timeout
    import time

    from leak_audit.attacks.text.decoder_peeling import PeelResult

    monkeypatch.setattr(span_decoder, "peel_sentences", lambda *a, **k: PeelResult(leaves=list(a[6]), cut=True))
    unpeeled = _attack(model, batch, tapped=[n for n, p in model.named_parameters() if p.requires_grad],
                       deadline=time.monotonic() + 3600)
    assert unpeeled.info["certified"] == 0 and unpeeled.info["peel_cut"] == 1 and unpeeled.timed_out, unpeeled.info
    assert unpeeled.info["lower_bound"] == DECODER_PURSUIT_UNFINISHED
    monkeypatch.undo()
    # when the audit's deadline stops the joint sparse recovery, the ranked bag it falls back to is a timeout
    # (partial evidence), never an ok record that reads as "this is all the gradient leaks"
    real = span_decoder.sparse_bag
    monkeypatch.setattr(span_decoder, "sparse_bag", lambda *a, **k: dataclasses.replace(real(*a, **k), cut=True))
    cut = _attack(model, batch, tapped=[n for n, p in model.named_parameters() if p.requires_grad],
                  deadline=time.monotonic() + 3600)
    assert cut.timed_out and cut.token_bag and not cut.sequences, cut.info
    monkeypatch.undo()
    # a reading of fewer sentences than the batch holds (here: the pursuit's first leaf only, its fit closed) leaves
    # the rest of the batch unread, so its sentence metrics are lower bounds
    from leak_audit.attacks.gaps import DECODER_SENTENCES_MISSING

    pursue = span_decoder.pursue_prefixes

    def first_leaf_only(*args, **kwargs):
        prefixes, more, stopped = pursue(*args, **kwargs)
        return prefixes[:1], more, stopped

    monkeypatch.setattr(span_decoder, "pursue_prefixes", first_leaf_only)
    one = _attack(model, batch, tapped=[n for n, p in model.named_parameters() if p.requires_grad])
    assert len(one.sequences) == 1 and one.info["pursuit_residual"] < 1e-4 and not one.timed_out, one.info
    assert one.info["lower_bound"] == DECODER_SENTENCES_MISSING


def test_decoder_peeling_certifies_whole_sentences_and_pursues_the_rest(lora_smollm2) -> None:
    """The per-sentence certificate on real SmolLM2 LoRA gradients of four CoLA sentences: layer 0's adapter rows
    split over the bag's tokens, and each true sentence alone predicts its once-occurring tokens' columns at the
    scale 1/N (N: the batch's targets); a wrong last token, a replaced word or a sentence cut short do not fit.
    A prefix's completions, differentiated from the prefix's own forward, have the completed sentences' gradients.
    Peeling two certified sentences leaves exactly the other two sentences' gradient for the next pursuit."""
    from leak_audit.attacks.text.decoder_peeling import (
        certify, next_token_gradients, peel_sentences, sentence_gradients, token_columns,
    )
    from leak_audit.attacks.text.span_decoder import layer0_rows, lora_blocks
    from leak_audit.models import EmbeddingTables

    model, tokenizer = lora_smollm2
    batch = _lm_batch(tokenizer, [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=4)])
    truth = _truth(batch)
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec, replica = text_model_spec(model), ModelReplica(model)
    first = [w for w, _ in layer0_rows(spec, grads)]
    used = {w: grads[w] for w in [*first, *(w for b in lora_blocks(spec, grads) for w in b.weights)]}
    tokens = torch.tensor(sorted({t for s in truth for t in s[:-1]}))
    tables = EmbeddingTables.from_params(params, spec)
    inputs = tables.normalize(tables.word[tokens].double())
    pinv = torch.linalg.pinv(inputs)
    observed = token_columns(torch.cat([grads[w] for w in first]), pinv)
    n_targets = sum(len(s) - 1 for s in truth)
    index = {int(v): k for k, v in enumerate(tokens)}

    def scale(sentence: list[int], columns_of: list[int]) -> float | None:
        predicted = token_columns(sentence_gradients(replica, params, first, [sentence]), pinv)[0]
        return certify(observed, predicted, sorted({index[t] for t in columns_of}))

    for s in truth:
        assert scale(s, s[:-1]) == pytest.approx(1 / n_targets, rel=1e-4)
    s = truth[0]
    wrong_end = next(int(v) for v in tokens if int(v) != s[-1])
    assert scale(s[:-1] + [wrong_end], s[:-1]) is None
    assert scale(s[:2] + [s[3]] + s[3:], s[:-1]) is None  # the third word replaced by the fourth
    assert scale(s[:-1], s[:-2]) is None  # cut short by its last token
    # a completed prefix's gradient from the prefix's own forward equals the whole sentence's
    ys, completed = next_token_gradients(replica, params, first, [t[:-1] for t in truth], 4)
    for t, y, g in zip(truth, ys, completed, strict=True):
        assert len(y) == 4 and len(set(y)) == 4
        whole = sentence_gradients(replica, params, first, [t[:-1] + [v] for v in y])
        assert float((g - whole).norm() / whole.norm()) < 1e-6
    calls: list[torch.Tensor] = []

    def pursue(rest):
        calls.append(torch.cat([rest[w] for w in first]).double())
        return [truth[2][:-1], truth[3][:-1]], True, False

    wrong = truth[0][:3] + truth[1][3:-1]
    out = peel_sentences(replica, params, used, first, tokens, inputs, [truth[0][:-1], wrong, truth[1][:-1]],
                         pursue, 4)
    assert out.sentences == truth and out.rounds == 1 and not out.cut
    left = sentence_gradients(replica, params, first, truth[2:]).sum(0) / n_targets
    assert len(calls) == 1 and float((calls[0] - left).norm() / left.norm()) < 1e-4


def test_lora_dropout_leaves_a_partial_bag_marked_a_lower_bound(lora_smollm2) -> None:
    """With lora_dropout each adapter sees its inputs under its own dropout mask (training mode), so no set of
    vocabulary inputs spans layer 0's adapter rows. The bag's sparse recovery stops unclosed at its uniqueness bound
    ((576 + 16)/2 atoms; before that bound, it "closed" at 8e-5 with 574 tokens for these 32) and the attack returns
    the bag ranked against the rows: true tokens only, no sentence, marked a lower bound rather than a measurement."""
    from leak_audit.attacks.gaps import DECODER_BAG_UNFINISHED

    model, tokenizer = lora_smollm2
    batch = _lm_batch(tokenizer, [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=4)])
    adapted = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    try:
        for m in adapted:
            m.lora_dropout["default"] = torch.nn.Dropout(0.1)
        model.train()
        torch.manual_seed(1)
        recon = _attack(model, batch, tapped=[n for n, p in model.named_parameters() if p.requires_grad])
    finally:
        for m in adapted:
            m.lora_dropout["default"] = torch.nn.Identity()
        model.eval()
    true = {t for seq in _truth(batch) for t in seq[:-1]}
    assert recon.info["saturated"] == 1 and recon.info["bag_residual"] > 1e-2, recon.info
    assert recon.info["candidates"] <= (576 + 16) // 2
    assert not recon.sequences and not recon.timed_out
    assert recon.info["lower_bound"] == DECODER_BAG_UNFINISHED
    assert len(recon.token_bag) >= 5 and set(recon.token_bag) <= true, (len(true), recon.token_bag)


def test_lora_pursuit_reads_long_reviews_once_the_shared_token_states_are_projected_away(lora_smollm2) -> None:
    """Four real SST-2 reviews of 23-41 tokens (121 positions, 92 distinct tokens) against LoRA r = 8 on the real
    SmolLM2. Every prefix ending in the same token has nearly the same state, and without the projection the
    greedy pursuit took those near-copies for each other: it ran to its 575-pick limit and kept 573 prefixes,
    no sentence right (measured with ``deflate=False``). Projected away from the bag's context-averaged states,
    the 117 true prefixes are the sparsest fit, and all four reviews come back (their last tokens as far as the
    matching of the model's likeliest next tokens reads them)."""
    model, tokenizer = lora_smollm2  # the same adapters as the CoLA test above: lora_B != 0
    reviews = [s for s, _ in read_tsv(data_file("sst2_dev.tsv"), limit=12)][8:12]
    batch = _lm_batch(tokenizer, reviews)
    truth = _truth(batch)
    assert sum(len(t) for t in truth) == 121
    recon = _attack(model, batch, tapped=[n for n, p in model.named_parameters() if p.requires_grad])
    assert recon.info["order"] == "pursuit" and recon.info["pursuit_deflated"] > 0, recon.info
    assert recon.info["pursuit_kept"] == sum(len(t) - 1 for t in truth), recon.info  # the true prefixes, no other
    assert "lower_bound" not in recon.info  # the fit closed (relative residual below 1e-4): a measurement
    assert len(recon.sequences) == 4, [tokenizer.decode(q) for q in recon.sequences]
    for t in truth:  # every review, at least up to its last token (read by matching the model's likeliest ones)
        assert any(q[: len(t) - 1] == t[:-1] and len(q) >= len(t) - 1 for q in recon.sequences), tokenizer.decode(t)


def test_under_dp_noise_span_decoder_ranks_a_partial_bag(smollm2) -> None:
    """DP-SGD-style release of one CoLA sentence's gradient (clipped to norm 1, Gaussian noise of std s per
    coordinate): nothing lies in the noised span, so the rows are ranked against its directions above the noise
    edge. At s = 1e-4 about half the tokens come back with few wrong ones; at s = 0.1 (a noise multiplier of
    0.1 at B = 1) the noise drowns every direction and nothing is claimed."""
    model, tokenizer = smollm2
    spec, replica = text_model_spec(model), ModelReplica(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    found = {1e-4: [0, 0, 0], 0.1: [0, 0, 0]}  # right, recovered, true
    for sentence, _ in read_tsv(data_file("cola_dev.tsv"), limit=4):
        batch = _lm_batch(tokenizer, [sentence])
        model.zero_grad()
        model(**batch).loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        scale = min(1.0, 1.0 / float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))))
        attack = get_attack("span_decoder", "text")
        names = attack.requirements(spec, grads.keys()).gradients
        truth = set(_truth(batch)[0])
        for std, counts in found.items():
            noised = {n: grads[n] * scale + std * torch.randn(grads[n].shape, generator=gen) for n in names}
            recon = attack(AttackInput(noised, params, spec, 1, replica=replica, noise_std=std))
            assert recon.sequences is None and recon.info["noised"] == 1
            bag = set(recon.token_bag)
            counts[0] += len(bag & truth)
            counts[1] += len(bag)
            counts[2] += len(truth)
    right, recovered, true = found[1e-4]
    assert right / true >= 0.4 and right / recovered >= 0.75, found
    assert found[0.1][1] == 0, found


def test_the_attackers_evidence_under_next_token_loss(smollm2) -> None:
    """gradient_residual re-runs a reconstruction under the model's own next-token loss: the exact batch explains
    the gradient, a batch one token short less so, a scrambled one not at all."""
    from leak_audit.attacks.base import Reconstruction
    from leak_audit.attacks.evidence import gradient_residual

    model, tokenizer = smollm2
    batch = _lm_batch(tokenizer, [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=4)])
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.detach() for n, p in model.named_parameters()}
    inp = AttackInput(grads, params, text_model_spec(model), 4, replica=ModelReplica(model))
    truth = _truth(batch)
    exact = gradient_residual(Reconstruction("x", sequences=truth), inp)
    short = gradient_residual(Reconstruction("x", sequences=[t[:-1] for t in truth]), inp)
    scrambled = gradient_residual(Reconstruction("x", sequences=[t[::-1] for t in truth]), inp)
    assert exact < 1e-4 < 0.1 < short < 0.5 < 1.0 < scrambled


def test_massive_first_position_directions_are_read_in_a_balanced_frame(lora_smollm2, monkeypatch) -> None:
    """After 50 steps of adapter training, massive activations spread the singular values of layer 0's stacked
    adapter rows over seven decades (SmolLM2, CoLA dev 44-47 in the benchmark: 650 and 335, then 0.032 down to
    4.9e-5): the rank read at rtol 1e-6 fell to 11 of 16, the span test passed two tokens and one sentence came back.
    Here two such directions, 3e6 times the smallest, are added to the real CoLA dev 0-3 gradient along two of its own
    inputs (the row space is unchanged) and the sum is rounded to float32 as a real gradient is. The two candidates do
    not span the rows, so the rows are read as saturated and in the balanced frame: the four sentences exactly."""
    import leak_audit.attacks.text.span_decoder as span_decoder
    from leak_audit.models import EmbeddingTables

    model, tokenizer = lora_smollm2
    batch = _lm_batch(tokenizer, [s for s, _ in read_tsv(data_file("cola_dev.tsv"), limit=4)])
    truth = _truth(batch)
    spec = text_model_spec(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    names = [a.a for a in spec.layers[0].lora]
    smallest = float(torch.linalg.svdvals(torch.cat([grads[n].double() for n in names]))[-1])
    tables = EmbeddingTables.from_params(params, spec)
    inputs = tables.normalize(tables.word[torch.tensor(sorted({t[0] for t in truth})[:2])].double())  # [2, d]
    gen = torch.Generator().manual_seed(0)
    for n in names:
        massive = torch.randn(grads[n].shape[0], 2, generator=gen, dtype=torch.float64) @ inputs
        grads[n] = (grads[n].double() + massive / massive.norm() * 3e6 * smallest).float()

    def attack() -> Reconstruction:
        a = get_attack("span_decoder", "text")
        a.requirements(spec, grads.keys())
        return a.run(AttackInput(grads, params, spec, 4, replica=ModelReplica(model)))

    recon = attack()
    assert recon.info["rank_read"] < 16 and recon.info["saturated"] == 1 and "balanced_noise" in recon.info, recon.info
    assert sorted(recon.sequences) == sorted(truth), [tokenizer.decode(q) for q in recon.sequences]
    assert "lower_bound" not in recon.info and recon.info["last_token"].endswith(": 4 of 4"), recon.info
    # read at round-off level, an end that matches no candidate may be a sentence cut short: marked (only then)
    from leak_audit.attacks.gaps import DECODER_ENDS_UNVERIFIED, decoder_ends_gap

    assert decoder_ends_gap(True, [13, None]) == DECODER_ENDS_UNVERIFIED
    assert decoder_ends_gap(True, [13, 13]) is None and decoder_ends_gap(False, [None]) is None
    # read as before (the rank taken at its word): a couple of candidates, no sentence, the gap marked
    monkeypatch.setattr(span_decoder, "unexplained", lambda *a: 0.0)
    raw = attack()
    assert raw.info["candidates"] < 8 and not set(map(tuple, raw.sequences or [])) & set(map(tuple, truth)), raw.info
    assert "lower_bound" in raw.info
