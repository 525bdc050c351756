"""The model-family seam: a family registered from outside is found by ``text_model_spec`` and the text
attacks read the model through its spec alone.

The toy family below is a small pre-norm Transformer with its own parameter names (``lexicon``,
``where``, ``stack.i.norm_in``, one fused ``mix`` projection for query|key|value, ``score``): nothing
BERT-shaped. ``token_bag`` and ``span_check`` recover a known sentence from its gradients through
``leak_audit.attacks.get_attack``, and :class:`~leak_audit.models.EmbeddingTables` computes layer 0's
inputs for LayerNorm with learned positions and for RMSNorm without positions.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from leak_audit.attacks import AttackInput, get_attack
from leak_audit.models import (
    EmbeddingTables,
    EncoderLayerSpec,
    TextFamily,
    TextModelSpec,
    UnsupportedModelError,
    model_modality,
    register_family,
    text_families,
    text_model_spec,
    unregister_family,
)
from leak_audit.models.hf import join_names
from tests.conftest import small_bert


class ToyConfig(PretrainedConfig):
    model_type = "toy"

    def __init__(
        self,
        vocab_size: int = 97,
        hidden_size: int = 48,
        max_positions: int = 16,
        num_layers: int = 2,
        norm: str = "layernorm",
        positions: bool = True,
        **kwargs: object,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.max_positions = max_positions
        self.num_layers = num_layers
        self.norm = norm
        self.positions = positions
        super().__init__(**kwargs)


class ToyBlock(nn.Module):
    """Pre-norm block: ``h + proj(attention(mix(norm_in(h))))`` with one fused query|key|value projection."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm_in = nn.LayerNorm(d, eps=1e-5) if config.norm == "layernorm" else nn.RMSNorm(d, eps=1e-6)
        self.mix = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.mix(self.norm_in(h)).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        return h + self.proj(scores.softmax(-1) @ v)


class ToyForClassification(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = ""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.lexicon = nn.Embedding(config.vocab_size, config.hidden_size)
        self.where = nn.Embedding(config.max_positions, config.hidden_size) if config.positions else None
        self.stack = nn.ModuleList(ToyBlock(config) for _ in range(config.num_layers))
        self.score = nn.Linear(config.hidden_size, config.num_labels)

    def _init_weights(self, module: nn.Module) -> None:  # keep torch's own initialisation
        pass

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, **_: object
    ) -> SequenceClassifierOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = self.lexicon(input_ids)
        if self.where is not None:
            h = h + self.where(torch.arange(input_ids.shape[1]))
        for block in self.stack:
            h = block(h, mask)
        logits = self.score(h[:, 0])
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def toy_spec(hf_name: str, hf: nn.Module) -> TextModelSpec:
    """The toy family's builder: its own names, a fused projection, LayerNorm or RMSNorm, positions or none."""
    cfg = hf.config
    d = cfg.hidden_size

    def name(*parts: str) -> str:
        return join_names(hf_name, *parts)

    layers = []
    for i in range(cfg.num_layers):
        lp = name("stack", str(i))
        mix = join_names(lp, "mix")
        layers.append(EncoderLayerSpec(
            lp, f"{mix}.weight", f"{mix}.weight", f"{mix}.weight", (mix, mix, mix),
            fused=True, query_dim=d, key_dim=d, value_dim=d, attention_output=join_names(lp, "proj", "weight"),
            linear_weights=(f"{mix}.weight", join_names(lp, "proj", "weight")),
        ))
    layernorm = cfg.norm == "layernorm"
    return TextModelSpec(
        hf_prefix=hf_name,
        model_type=cfg.model_type,
        word_embeddings=name("lexicon", "weight"),
        position_embeddings=name("where", "weight") if cfg.positions else None,
        token_type_embeddings=None,
        norm_weight=name("stack", "0", "norm_in", "weight"),
        norm_bias=name("stack", "0", "norm_in", "bias") if layernorm else None,
        norm_eps=float(hf.stack[0].norm_in.eps),
        layers=tuple(layers),
        classifier_weight=name("score", "weight"),
        classifier_bias=name("score", "bias"),
        hidden_size=d,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_positions,
        position_offset=0,
        num_labels=cfg.num_labels,
        pad_token_id=None,
        num_heads=1,
        family="toy",
        position_scheme="absolute" if cfg.positions else "none",
        norm_kind="layernorm" if layernorm else "rmsnorm",
        num_kv_heads=1,
    )


TOY_FAMILY = TextFamily(
    name="toy",
    description="the test's toy pre-norm Transformer: `lexicon`, `where`, `stack[i].{norm_in,mix,proj}`",
    matches=lambda hf: getattr(hf.config, "model_type", None) == "toy",
    build=toy_spec,
)


class Wrapper(nn.Module):
    """Stands in for a LightningModule holding the model as ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def toy(seed: int = 0, **config: object) -> Wrapper:
    torch.manual_seed(seed)
    return Wrapper(ToyForClassification(ToyConfig(num_labels=3, **config)))


def grads_of(root: Wrapper, ids: Tensor, labels: Tensor) -> dict[str, Tensor]:
    root.zero_grad()
    root.model(input_ids=ids, labels=labels).loss.backward()
    return {n: p.grad.detach().clone() for n, p in root.named_parameters() if p.grad is not None}


@pytest.fixture
def toy_family() -> Iterator[TextFamily]:
    register_family(TOY_FAMILY)
    try:
        yield TOY_FAMILY
    finally:
        unregister_family(TOY_FAMILY.name)


SENTENCE = torch.tensor([[5, 17, 42, 8, 63, 29, 71, 11]])


def test_text_model_spec_dispatches_to_a_registered_family(toy_family):
    root = toy()
    spec = text_model_spec(root)
    assert spec.family == "toy" and spec.model_type == "toy"
    assert spec.word_embeddings == "model.lexicon.weight"
    assert spec.layers[0].input_projections == ("model.stack.0.mix.weight",)  # fused: one weight, not three
    names = dict(root.named_parameters())
    assert set(spec.embedding_params) <= set(names)
    assert model_modality(root) == "text"
    # the BERT family still reads BERT models, and is asked first
    assert text_model_spec(small_bert()).family == "bert"
    assert [f.name for f in text_families()] == ["bert", "distilbert", "llama", "gpt2", "toy"]


def test_token_bag_and_span_check_recover_a_known_sentence_through_the_spec(toy_family):
    root = toy()
    spec = text_model_spec(root)
    grads = grads_of(root, SENTENCE, torch.tensor([2]))
    params = {n: p.detach() for n, p in root.named_parameters()}

    bag_attack = get_attack("token_bag")
    req = bag_attack.requirements(spec, grads.keys())
    bag = bag_attack.run(AttackInput({n: grads[n] for n in req.gradients}, params, spec, batch_size=1))
    assert sorted(bag.token_bag) == sorted(SENTENCE[0].tolist())

    check = get_attack("span_check")
    tapped = {spec.layers[0].query: grads[spec.layers[0].query]}  # layer 0's fused projection only
    req = check.requirements(spec, tapped.keys())
    assert req.gradients == {"model.stack.0.mix.weight"}
    assert req.params == set(spec.embedding_params)
    inp = AttackInput(tapped, {n: params[n] for n in req.params}, spec, batch_size=1, priors={"token_bag": bag})
    recon = check.run(inp)
    assert recon.sequences == [SENTENCE[0].tolist()]
    assert [c[:1] for c in recon.position_candidates] == [[t] for t in SENTENCE[0].tolist()]


def test_span_check_needs_the_familys_projection(toy_family):
    spec = text_model_spec(toy())
    from leak_audit.attacks import NotApplicable

    with pytest.raises(NotApplicable, match=r"model\.stack\.0\.mix"):
        get_attack("span_check").requirements(spec, {"model.stack.0.proj.weight"})


@pytest.mark.parametrize("norm, positions", [("layernorm", True), ("rmsnorm", False)])
def test_embedding_tables_compute_layer0_inputs_for_the_familys_norm(toy_family, norm, positions):
    root = toy(norm=norm, positions=positions)
    spec = text_model_spec(root)
    assert spec.norm_kind == norm
    assert spec.position_scheme == ("absolute" if positions else "none")
    assert (spec.position_embeddings is None) == (not positions) and (spec.norm_bias is None) == (norm == "rmsnorm")
    seen: list[Tensor] = []
    root.model.stack[0].mix.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        root.model(input_ids=SENTENCE)
    tables = EmbeddingTables.from_params({n: p.detach() for n, p in root.named_parameters()}, spec)
    torch.testing.assert_close(tables.layer_inputs(SENTENCE), seen[0], rtol=0, atol=1e-6)
    pairs = tables.pair_inputs(SENTENCE[0], torch.arange(SENTENCE.shape[1]))
    assert pairs.dtype == torch.float64
    torch.testing.assert_close(pairs.float(), seen[0][0], rtol=0, atol=1e-5)
    if not positions:  # no position enters layer 0: the same token gives the same input anywhere
        assert torch.equal(tables.pair_inputs(SENTENCE[0, :1], torch.tensor([0])),
                           tables.pair_inputs(SENTENCE[0, :1], torch.tensor([7])))


def test_unsupported_model_names_its_type_and_the_supported_families():
    root = toy()  # the toy family is not registered here
    with pytest.raises(UnsupportedModelError) as err:
        text_model_spec(root)
    message = str(err.value)
    assert "ToyForClassification" in message and "model_type 'toy'" in message
    assert "supported families: bert (BERT, MiniLM, RoBERTa, ELECTRA, XLM-R" in message
    assert "encoder.layer[i].attention.self.{query,key,value}" in message
    with pytest.raises(UnsupportedModelError, match="contains no Hugging Face PreTrainedModel"):
        text_model_spec(nn.Sequential(nn.Linear(2, 2)))


def test_registry_rejects_duplicates_and_unknown_names(toy_family):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_family(TOY_FAMILY)
    with pytest.raises(KeyError, match="no text family named 'opt'"):
        unregister_family("opt")
