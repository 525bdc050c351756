"""Every attack runs where the snapshot's tensors are, e.g. on the training GPU (``attack_device=None``).

CI has no GPU, so the audits run on a simulated accelerator (``tests/helpers/simulated_device.py``): real CPU
values, CUDA's refusal of ops that mix devices, of CPU generators for accelerator tensors and of
``.numpy()`` on accelerator tensors. Each audit must give the same records as on the CPU: the same status
and the same metrics. Budgets are step counts (never seconds), and no attack picks a method by timing it, so both runs
do the same work.

Before these tests, six of the eight text attacks failed on the first op that mixed devices (a CPU
``torch.randn`` or ``torch.arange``, CPU token ids indexing GPU scores, SciPy on GPU tensors).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from leak_audit.attacks import get_attack
from leak_audit.attacks.text.dlg import DLG
from leak_audit.attacks.text.gradient_matching import GradientMatching
from leak_audit.attacks.image.dlg import ImageDLG
from leak_audit.attacks.image.inverting_gradients import InvertingGradients
from leak_audit.attacks.image.labels import ImageLabelRecovery
from leak_audit.attacks.text.span_cluster import SpanCluster
from leak_audit.attacks.text.span_search import SpanSearch
from leak_audit.runtime.auditor import Auditor
from leak_audit.capture.batch import ImageBatch, default_batch_adapter
from leak_audit.demos.image_models import LeNet
from leak_audit.models.image_replica import ImageReplica
from leak_audit.models import TextModelSpec, image_model_spec, text_model_spec
from leak_audit.models.replica import ModelReplica
from leak_audit.capture.snapshot import AuditSnapshot
from tests.conftest import gradients, small_bert
from tests.helpers.simulated_device import ACCEL, AcceleratorTensor, DeviceMixError, SimulatedAccelerator

SENTENCES = ["the cat sat on the mat .", "john thinks that mary left early ."]


def _text_attacks():
    fixed = {
        "gradient_matching": GradientMatching(max_steps=3, discrete_steps=1, top_k=2, candidates=4, max_seconds=1e6),
        "dlg": DLG(max_steps=3, max_seconds=1e6),
        # screen="off": "auto" times a bfloat16 forward to choose its screening dtype, so under load the two runs
        # could rank candidates in different dtypes (the dropout-on case differed once in a full suite, 2026-12-07)
        "span_search": SpanSearch(steps=3, max_seconds=1e6, max_perturbations=2, screen="off"),
    }
    names = ["labels", "token_bag", "span_check", "span_attention", *fixed]
    return [fixed.get(n) or get_attack(n) for n in names]


def _audit(model, spec, attacks, grads, batch, decode, accelerated: bool):
    params = {n: p.detach() for n, p in model.named_parameters()}
    snap = AuditSnapshot(0, 0, 0.0, dict(grads), params, batch, ("",))
    with SimulatedAccelerator() if accelerated else contextlib.nullcontext():
        device = ACCEL if accelerated else None
        if isinstance(spec, TextModelSpec):
            replica = ModelReplica(model, device=device)
        else:
            replica = ImageReplica(model, device=device)
        if accelerated:
            snap = snap.to(ACCEL)
            assert isinstance(next(iter(snap.gradients.values())), AcceleratorTensor)
        auditor = Auditor(spec, attacks, set(grads), decode, replica=replica)
        return {r.attack: r for r in auditor(snap)}


def _assert_same(cpu, accel, nondeterministic=()):
    assert cpu.keys() == accel.keys()
    for name, want in cpu.items():
        got = accel[name]
        assert want.status in ("ok", "skipped"), (name, want.error)  # skipped: the attack does not apply
        assert got.status == want.status, (name, got.error)
        if want.status == "ok" and name not in nondeterministic:
            assert got.metrics == pytest.approx(want.metrics, abs=1e-6), name


@pytest.mark.parametrize("train", [False, True], ids=["dropout-off", "dropout-on"])
def test_text_attacks_on_an_accelerator_match_the_cpu(tokenizer, train):
    """The text attacks on a 2-layer BERT, with exact (eval) and training-mode (dropout) gradients. Seven
    run; span_cluster does not apply to this model's batch (its query gradient is not spanned by the bag: it
    skipped here, after 9-12 s of the simulated accelerator's 21-44 s per audit), so it runs on MiniLM below."""
    model = small_bert(vocab_size=tokenizer.vocab_size, dropout=0.1)
    spec = text_model_spec(model).with_tokenizer(tokenizer)
    enc, grads = gradients(model, tokenizer, SENTENCES, [0, 1], train=train, seed=1)
    batch = default_batch_adapter({**enc, "labels": torch.tensor([0, 1])})
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    cpu = _audit(model, spec, _text_attacks(), grads, batch, decode, accelerated=False)
    accel = _audit(model, spec, _text_attacks(), grads, batch, decode, accelerated=True)
    _assert_same(cpu, accel)
    assert cpu["token_bag"].metrics["token_recall"] == 1.0  # the audit measured something real
    ran = {n for n, r in cpu.items() if r.status == "ok"}
    assert ran >= {"labels", "token_bag", "span_check", "span_attention", "gradient_matching", "dlg"}
    if not train:
        assert "span_search" in ran


@pytest.mark.parametrize("pair_pursuit", [False, True], ids=["clustering", "pair-pursuit"])
def test_span_cluster_on_an_accelerator_runs_like_on_the_cpu(minilm, tokenizer, cola, spec, pair_pursuit):
    """span_cluster on the pretrained MiniLM, two real CoLA sentences (12 and 13 tokens): with ``pairs=0`` two
    clusters (the spectral clustering, the group lasso and the assignment all run), by default the pair pursuit
    (which returns both sentences here: 0.25 s against 1.9 s for the clustering on the CPU). The
    clustering's token order varies between runs on the CPU alone (k-means on near-tied affinities), so the
    metrics are compared by bar, not equality."""
    pairs = cola[:2]
    enc, grads = gradients(minilm, tokenizer, [s for s, _ in pairs], [y for _, y in pairs], train=False)
    batch = default_batch_adapter({**enc, "labels": torch.tensor([y for _, y in pairs])})
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    attacks = lambda: [get_attack("token_bag"), get_attack("span_check"), SpanCluster(pairs=16 if pair_pursuit else 0)]  # noqa: E731
    cpu = _audit(minilm, spec, attacks(), grads, batch, decode, accelerated=False)
    accel = _audit(minilm, spec, attacks(), grads, batch, decode, accelerated=True)
    _assert_same(cpu, accel, nondeterministic={"span_cluster"})
    for records in (cpu, accel):
        assert records["span_cluster"].status == "ok", records["span_cluster"].error
        if not pair_pursuit:
            assert records["span_cluster"].info["clusters"] == 2
        assert records["span_cluster"].metrics["token_recall"] >= 0.9


@pytest.mark.parametrize("train", [False, True], ids=["dropout-off", "dropout-on"])
def test_position_match_on_an_accelerator_matches_the_cpu(tokenizer, train):
    """position_match reads one sentence (B = 1; the two-sentence batch above skips it): the same exact sentence
    from the accelerator's tensors as from the CPU's."""
    model = small_bert(vocab_size=tokenizer.vocab_size, dropout=0.1)
    spec = text_model_spec(model).with_tokenizer(tokenizer)
    enc, grads = gradients(model, tokenizer, SENTENCES[:1], [1], train=train, seed=1)
    batch = default_batch_adapter({**enc, "labels": torch.tensor([1])})
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    cpu = _audit(model, spec, [get_attack("position_match")], grads, batch, decode, accelerated=False)
    accel = _audit(model, spec, [get_attack("position_match")], grads, batch, decode, accelerated=True)
    _assert_same(cpu, accel)
    assert cpu["position_match"].status == "ok" and cpu["position_match"].metrics["rouge1"] == 1.0


def test_image_attacks_on_an_accelerator_match_the_cpu():
    model = LeNet(seed=0)
    spec = image_model_spec(model)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(2, 3, 32, 32, generator=gen), torch.tensor([3, 7])
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    batch = ImageBatch(images, labels, (0.0, 1.0))

    def attacks():
        return [ImageLabelRecovery(), ImageDLG(max_steps=5, max_seconds=1e6),
                InvertingGradients(max_steps=5, max_seconds=1e6, restarts=1)]

    cpu = _audit(model, spec, attacks(), grads, batch, None, accelerated=False)
    accel = _audit(model, spec, attacks(), grads, batch, None, accelerated=True)
    for records in (cpu, accel):  # all three apply to LeNet with every gradient tapped: none may be skipped
        assert {n: r.status for n, r in records.items()} == dict.fromkeys(("labels", "dlg", "inverting_gradients"),
                                                                         "ok"), {n: r.error for n, r in records.items()}
        assert records["labels"].metrics["label_accuracy"] == 1.0  # the bias gradient gives the label multiset
        assert all({"psnr", "ssim"} <= records[n].metrics.keys() for n in ("dlg", "inverting_gradients"))
    _assert_same(cpu, accel)


def test_the_simulator_refuses_what_cuda_refuses():
    """The checks the tests above rely on: each raises where CUDA would, and allowed mixes pass."""
    with SimulatedAccelerator():
        x = torch.randn(3, 4).to(ACCEL)
        with pytest.raises(DeviceMixError, match="same device"):
            x + torch.randn(3, 4)
        with pytest.raises(DeviceMixError, match="cpu generator"):
            torch.randn(3, generator=torch.Generator(), device=ACCEL)
        with pytest.raises(DeviceMixError, match="accelerator indices"):
            torch.arange(5)[torch.tensor([1, 2]).to(ACCEL)]
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        y = x + torch.tensor(2.0)  # a CPU scalar is fine
        z = x[torch.tensor([0, 2])]  # CPU indices of an accelerator tensor are fine
        w = x[[0, 2]]  # so is a Python list
        made = torch.tensor([1.0, 2.0], device=x.device)
        assert isinstance(y, AcceleratorTensor) and isinstance(z, AcceleratorTensor)
        assert isinstance(made, AcceleratorTensor) and made.tolist() == [1.0, 2.0]
        assert torch.equal(w.cpu(), z.cpu()) and not isinstance(z.cpu(), AcceleratorTensor)
        assert float(y.sum()) == pytest.approx(float(x.sum()) + 24.0, rel=1e-6)
        v = torch.zeros(2, 3).to(ACCEL)
        v.unsqueeze_(0)  # an in-place op that changes the shape keeps the wrapper in step
        assert v.shape == (1, 2, 3) and v.cpu().shape == (1, 2, 3)
    assert torch.tensor is not None and torch.tensor([1]).device.type == "cpu"  # factories restored
