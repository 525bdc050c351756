import pytest
from torch import nn

from leak_audit.models import text_model_spec
from leak_audit.capture.tap import GradientTap, ModuleSelectionError, select_modules
from tests.conftest import small_bert


class Wrapper(nn.Module):
    """A LightningModule-like wrapper: the HF model sits in an attribute."""

    def __init__(self):
        super().__init__()
        self.model = small_bert()


@pytest.fixture(scope="module")
def root():
    return Wrapper()


def test_suffix_names_resolve_inside_a_wrapper(root):
    mods = select_modules(root, "bert.encoder.layer.0.attention.self.query")
    assert list(mods) == ["model.bert.encoder.layer.0.attention.self.query"]


def test_glob_matches_every_layer(root):
    mods = select_modules(root, "*.attention.self.query")
    assert list(mods) == [f"model.bert.encoder.layer.{i}.attention.self.query" for i in range(2)]


def test_none_taps_the_whole_model(root):
    tap = GradientTap(root, None)
    assert tap.modules == ("",)
    assert tap.numel == sum(p.numel() for p in root.parameters())


def test_unknown_module_lists_closest_names(root):
    with pytest.raises(ModuleSelectionError) as err:
        select_modules(root, "bert.encoder.layer.0.attention.self.querry")
    msg = str(err.value)
    assert "'bert.encoder.layer.0.attention.self.querry' matches no submodule" in msg
    assert "model.bert.encoder.layer.0.attention.self.query" in msg


def test_module_without_parameters_is_rejected(root):
    with pytest.raises(ModuleSelectionError, match="has no parameters"):
        select_modules(root, "bert.embeddings.dropout")


def test_frozen_module_is_rejected_with_reason():
    root = Wrapper()
    for p in root.model.bert.embeddings.parameters():
        p.requires_grad_(False)
    with pytest.raises(ModuleSelectionError, match="frozen"):
        select_modules(root, "bert.embeddings.word_embeddings")
    with pytest.raises(ModuleSelectionError, match="frozen"):
        select_modules(root, "bert.embeddings*")
    # a glob over frozen and trainable modules keeps only the trainable ones
    tap = GradientTap(root, "bert.*")
    assert tap.parameters and not any("embeddings" in n for n in tap.parameters)


def test_nested_selection_is_deduplicated(root):
    mods = select_modules(root, ["bert.encoder.layer.0", "bert.encoder.layer.0.attention.self.query"])
    assert list(mods) == ["model.bert.encoder.layer.0"]


def test_spec_names_point_at_real_parameters(root):
    spec = text_model_spec(root)
    names = dict(root.named_parameters())
    for n in (*spec.embedding_params, *spec.layers[0].input_projections, spec.classifier_weight, spec.classifier_bias):
        assert n in names, n
    assert spec.hidden_size == 64 and spec.dropout == 0.1 and spec.num_labels == 2
