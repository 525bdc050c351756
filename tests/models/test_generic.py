"""A Hugging Face model no architecture family knows (a random-init OPT): the model-agnostic attacks run and
say so, the span attacks say why they do not apply, and the auditor refuses only when nothing applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from leak_audit import LeakageAudit
from leak_audit.models import UnsupportedModelError, text_model_spec


def _opt(cls_name: str):
    import transformers
    from transformers import OPTConfig

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=500, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, word_embed_proj_dim=64,
                       pad_token_id=1, num_labels=2)
    return getattr(transformers, cls_name)(config)


class Module(LightningModule):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


IDS = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))


def test_the_generic_spec_and_the_strict_one():
    model = _opt("OPTForSequenceClassification")
    with pytest.raises(UnsupportedModelError, match="OPTForSequenceClassification.*model_type 'opt'"):
        text_model_spec(model)
    spec = text_model_spec(model, generic=True)
    assert (spec.family, spec.layers, spec.classifier_weight) == ("generic", (), "score.weight")
    assert spec.word_embeddings == "model.decoder.embed_tokens.weight" and not spec.causal
    lm = text_model_spec(_opt("OPTForCausalLM"), generic=True)
    assert lm.causal and lm.tied_embeddings and lm.classifier_weight is None


def test_an_unknown_sequence_classifier_gets_the_model_agnostic_attacks(tmp_path: Path):
    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": torch.tensor([0, 1])}]
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path, max_seconds=15)
    trainer = Trainer(max_steps=1, callbacks=[audit], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="no architecture family knows this 'opt' model; only the model-agnostic"):
        trainer.fit(Module(_opt("OPTForSequenceClassification")), DataLoader(batches, batch_size=None))
    records = {r["attack"]: r for r in map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())}
    assert set(records) == {"token_bag", "labels", "gradient_matching"}
    assert records["labels"]["status"] == "n/a" or "B = 1" in (records["labels"].get("error") or ""), records["labels"]
    assert records["token_bag"]["status"] == "ok"
    assert records["token_bag"]["metrics"]["token_recall"] == 1.0  # the untied embedding's nonzero rows
    assert records["gradient_matching"]["status"] in {"ok", "timeout"}
    assert trainer.global_step == 1


def test_nothing_applies_to_an_unknown_tied_causal_lm_and_setup_says_what_would(tmp_path: Path):
    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS.clone()}]
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path)
    trainer = Trainer(max_steps=1, callbacks=[audit], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"no attack can use.*register one \(leak_audit.models.register_family\)"):
        trainer.fit(Module(_opt("OPTForCausalLM")), DataLoader(batches, batch_size=None))


def test_a_text_model_without_an_embedding_table_is_refused_with_what_would_help():
    from transformers import PretrainedConfig, PreTrainedModel

    class NoTableConfig(PretrainedConfig):
        model_type = "no-table"

    class NoTable(PreTrainedModel):  # reads one-hot rows through a linear map: no nn.Embedding to read
        config_class = NoTableConfig
        main_input_name = "input_ids"

        def __init__(self, config):
            super().__init__(config)
            self.proj = torch.nn.Linear(50, 8)

        def forward(self, input_ids, **_):
            return self.proj(torch.nn.functional.one_hot(input_ids, 50).float())

    with pytest.raises(UnsupportedModelError) as err:
        text_model_spec(NoTable(NoTableConfig()), generic=True)
    message = str(err.value)
    assert "NoTable has no input embedding table" in message and "get_input_embeddings" in message
    assert "modality='image'" in message


class TinyLM(torch.nn.Module):
    """A plain nn.Module language model: embedding, a GRU, a vocabulary projection (tied or not)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(500, 32)
        self.rnn = torch.nn.GRU(32, 32, batch_first=True)
        self.out = torch.nn.Linear(32, 500, bias=False)
        if tied:
            self.out.weight = self.embed.weight

    def forward(self, input_ids):
        return self.out(self.rnn(self.embed(input_ids))[0])


class PlainModule(LightningModule):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.lm = TinyLM(tied)

    def training_step(self, batch, batch_idx):
        logits = self.lm(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_a_plain_nn_module_language_model_gets_what_applies(tmp_path: Path):
    """No Hugging Face model inside: an nn.Embedding and no convolution make it a text model; its untied
    embedding's gradient gives the token bag (all but each sequence's last token), and training goes on."""
    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS.clone()}]
    spec = text_model_spec(PlainModule(tied=False), generic=True)
    assert (spec.word_embeddings, spec.lm_head, spec.tied_embeddings, spec.causal) == ("lm.embed.weight",
                                                                                      "lm.out.weight", False, True)
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path)
    trainer = Trainer(max_steps=1, callbacks=[audit], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="no architecture family knows this 'PlainModule' model"):
        trainer.fit(PlainModule(tied=False), DataLoader(batches, batch_size=None))
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    status = {r["attack"]: r["status"] for r in records}
    assert status == {"token_bag": "ok", "labels": "skipped", "gradient_matching": "skipped"}  # no classifier
    (bag,) = [r for r in records if r["attack"] == "token_bag"]
    # every token but each sequence's last, which predicts nothing, so its embedding row gets no gradient
    assert bag["metrics"]["token_recall"] == pytest.approx(16 / 18) and bag["metrics"]["token_precision"] == 1.0
    assert trainer.global_step == 1
    # tied to its output projection, the embedding's gradient is dense: nothing applies, and setup says so
    tied = Trainer(max_steps=1, callbacks=[LeakageAudit(log_dir=tmp_path / "t")], logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="no attack can use.*tied to the LM head.*register one"):
        tied.fit(PlainModule(tied=True), DataLoader(batches, batch_size=None))
