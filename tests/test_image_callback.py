"""LeakageAudit on image classifiers inside real Lightning Trainer runs (DLG's LeNet, CPU).

Real images: CIFAR-10 from ../shared/data (the test fails, naming the path, when it is absent) and scikit-learn's
bundled 8×8 digits (always there). The step budgets of the attacks, not wall-clock ones, bind.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from leak_audit import BatchAdapterError, ImageBatch, LeakageAudit, read_audit_log
from leak_audit.attacks import get_attack
from leak_audit.attacks.image.dlg import ImageDLG
from leak_audit.attacks.image.inverting_gradients import InvertingGradients
from leak_audit.capture.batch import default_image_batch_adapter
from leak_audit.demos.image_models import LeNet
from leak_audit.models import UnsupportedModelError, find_image_network, model_modality
from tests.conftest import small_bert


class ImageClassifier(L.LightningModule):
    """DLG's sigmoid LeNet (weights uniform in [-0.5, 0.5]) trained with SGD on batch-mean cross-entropy."""

    def __init__(self, channels: int = 3, size: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.model = LeNet(10, channels, size, seed=0)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch if not isinstance(batch, dict) else (batch["x"], batch["y"])
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of scikit-learn's bundled 8×8 digits: ``([n, 1, 8, 8]`` in ``[0, 1]``, ``[n]`` labels)."""
    load_digits = pytest.importorskip("sklearn.datasets", reason="scikit-learn's bundled digits").load_digits

    data = load_digits()
    return torch.from_numpy(data.images[:n]).float()[:, None] / 16, torch.from_numpy(data.target[:n]).long()


def fit(module, loader, tmp_path: Path, callbacks, max_steps: int, loggers=False, **kwargs) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=list(callbacks), logger=loggers, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
        devices=1, **kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def test_dlg_audits_lenet_training_on_real_cifar10(cifar10, tmp_path):
    """B = 1, whole-model tap, default attacks (DLG, 1000 L-BFGS evaluations, about 4 s each): every audited
    step's image comes back (measured: PSNR 37.4 and 38.0 dB, SSIM 0.984 and 0.978 at steps 0 and 1; iDLG's
    label exact), the scores reach the loggers, and no pixel reaches the log."""
    images, labels = cifar10
    loader = DataLoader(TensorDataset(images[:2], labels[:2]), batch_size=1)
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path / "audit", max_pending=4, worker_niceness=None)
    logger = CSVLogger(tmp_path, name="csv")
    fit(ImageClassifier(), loader, tmp_path, [audit], max_steps=2, loggers=[logger], log_every_n_steps=1)

    records = read_audit_log(audit.log_path)
    assert [(r.step, r.attack, r.status) for r in records] == [(0, "dlg", "ok"), (1, "dlg", "ok")]
    for r in records:
        assert r.metrics["psnr"] >= 25.0, r.metrics
        assert r.metrics["ssim"] >= 0.8, r.metrics
        assert r.metrics["label_accuracy"] == 1.0 and r.info["label_source"] == "bias"
        assert r.batch_size == 1 and r.modules == [""] and r.samples is None  # "": the whole LightningModule
        assert "lpips" in r.info or r.info["lpips_status"].startswith("unavailable")
    assert audit.worst["leak/max/psnr"] == max(r.metrics["psnr"] for r in records)
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("leak/max/psnr")]
    assert sorted(int(r["step"]) for r in rows) == [0, 1]
    assert all(float(r["leak/dlg/ssim"]) >= 0.8 for r in rows)
    assert not (tmp_path / "audit" / "samples").exists()
    assert audit.log_path.stat().st_size < 2000  # scores and timings only (a 32x32x3 image is 12 KB)


def test_digits_audit_with_gradient_accumulation_and_every_image_attack(tmp_path):
    """Two micro-batches of 2 digits make one audited batch of 4; DLG recovers all 4 (measured 73.5 dB, soft
    labels all right), the labels attack and Inverting Gradients (measured 25.2 dB after 200 steps) run by name
    under the image modality; no samples are written."""
    x, y = digits(8)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    ig = InvertingGradients(max_steps=200, restarts=1)
    audit = LeakageAudit(attacks=("dlg", "labels", ig), every_n_steps=2, log_dir=tmp_path / "a", max_pending=4,
                         worker_niceness=None)
    fit(ImageClassifier(channels=1, size=8), loader, tmp_path, [audit], max_steps=2, accumulate_grad_batches=2)

    records = {r.attack: r for r in read_audit_log(audit.log_path)}
    assert set(records) == {"dlg", "labels", "inverting_gradients"}
    assert all(r.status == "ok" and r.step == 0 and r.batch_size == 4 for r in records.values())
    assert records["dlg"].metrics["psnr"] >= 40.0 and records["dlg"].metrics["ssim"] >= 0.99
    assert records["dlg"].metrics["label_accuracy"] == 1.0
    assert set(records["labels"].metrics) == {"label_accuracy"}
    assert records["inverting_gradients"].info["steps"] == 200
    assert 0 < records["inverting_gradients"].metrics["psnr"] < records["dlg"].metrics["psnr"]
    assert not (tmp_path / "a" / "samples").exists() and '"samples"' not in audit.log_path.read_text()


def test_the_audit_time_budget_bounds_the_image_attack(tmp_path):
    """max_seconds=0.3: DLG stops at the audit's deadline far below its 1000 evaluations (about 3 s for 4
    digits): a timeout, missing evidence, with its partial PSNR in info and no metric."""
    x, y = digits(4)
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path / "a", max_seconds=0.3, worker_niceness=None)
    fit(ImageClassifier(channels=1, size=8), DataLoader(TensorDataset(x, y), batch_size=4), tmp_path, [audit],
        max_steps=1)
    (record,) = read_audit_log(audit.log_path)
    assert record.status == "timeout" and 0 < record.info["steps"] < 1000 and record.metrics == {}
    assert record.info["seconds"] < 3.0 and record.info["partial_psnr"] > 0 and "gradient evaluations" in record.error


def test_log_samples_writes_npz_files_next_to_the_log(tmp_path):
    x, y = digits(2)
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path / "a", log_samples=True, max_pending=4,
                         worker_niceness=None)
    fit(ImageClassifier(channels=1, size=8), DataLoader(TensorDataset(x, y), batch_size=2), tmp_path, [audit],
        max_steps=1)
    (record,) = read_audit_log(audit.log_path)
    assert record.status == "ok" and record.samples == [{"file": "samples/audit00001-step0000000-dlg.npz", "images": 2}]
    data = np.load(tmp_path / "a" / record.samples[0]["file"])
    assert data["originals"].shape == data["reconstructions"].shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(data["originals"], x.numpy())
    assert data["labels"].tolist() == y.tolist() == data["recovered_labels"].tolist()
    assert float(np.minimum(data["psnr"], 100.0).mean()) == pytest.approx(record.metrics["psnr"], rel=1e-4)
    assert record.metrics["psnr"] >= 40.0
    assert audit.log_path.stat().st_size < 1500


def test_default_image_batch_adapter_reads_tuples_and_mappings_and_names_what_it_got():
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([1, 2, 3])
    for batch in ((x, y), [x, y], {"pixel_values": x, "labels": y}, {"images": x, "label": y.tolist()}):
        read = default_image_batch_adapter(batch)
        assert torch.equal(read.images, x) and read.labels.tolist() == [1, 2, 3] and read.bounds == (0.0, 1.0)
    assert default_image_batch_adapter((x[:, 0], y)).images.shape == (3, 1, 8, 8)  # [B, H, W]: one channel
    assert ImageBatch(x * 255, y).bounds == (0.0, 255.0) and ImageBatch(x - 0.5, y, (-0.5, 0.5)).bounds == (-0.5, 0.5)
    with pytest.raises(BatchAdapterError, match=r"dict with keys \{'x': Tensor\(3, 3, 8, 8\).*'pixel_values' or 'images'"):
        default_image_batch_adapter({"x": x, "y": y})
    with pytest.raises(BatchAdapterError, match=r"tuple of 3 .*batch_adapter=fn"):
        default_image_batch_adapter((x, y, y))
    with pytest.raises(BatchAdapterError, match="integer class ids"):
        default_image_batch_adapter((x, y.float()))
    with pytest.raises(BatchAdapterError, match=r"labels must be an int64 \[B\] tensor with B = 3"):
        ImageBatch(x, y[:2])


def test_the_value_box_is_declared_or_a_standard_pixel_box_never_read_off_the_private_batch():
    """Undeclared and outside [0, 1] and [0, 255] (normalised inputs): a BatchAdapterError that names the values
    seen and how to declare the box; a declared value_range is used exactly as given, whatever the pixels."""
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([1, 2, 3])
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0
    normalised = (x - 0.5) / 0.25  # Normalize(0.5, 0.25): values in [-2, 2]
    with pytest.raises(BatchAdapterError, match=r"images lie in \[-2, 2\], outside both standard pixel boxes .*"
                                                 r"no value_range was declared.*value_range=\(low, high\)"):
        ImageBatch(normalised, y).bounds  # noqa: B018
    with pytest.raises(BatchAdapterError, match=r"\[-2, 2\]"):
        default_image_batch_adapter((normalised, y)).bounds  # noqa: B018
    with pytest.raises(BatchAdapterError, match=r"\[0, 256\]"):
        ImageBatch(x * 256, y).bounds  # noqa: B018
    # declared: as given, not the batch's own [-2, 2] (nor a standard box)
    assert ImageBatch(normalised, y, (-3.0, 3.0)).bounds == (-3.0, 3.0)
    assert ImageBatch(x * 0.5, y, (-1, 1)).bounds == (-1.0, 1.0)
    assert ImageBatch(normalised, y, (-3.0, 3.0)).detached_copy().bounds == (-3.0, 3.0)
    # micro-batches: one declared box covers those that declare none; two different boxes are an error
    joined = ImageBatch.concat([ImageBatch(normalised[:1], y[:1], (-3, 3)), ImageBatch(normalised[1:], y[1:])])
    assert joined.bounds == (-3.0, 3.0)
    with pytest.raises(BatchAdapterError, match="different value_range"):
        ImageBatch.concat([ImageBatch(normalised[:1], y[:1], (-3, 3)), ImageBatch(normalised[1:], y[1:], (-2, 2))])


class BoxSpyDLG(ImageDLG):
    """DLG (20 steps) that also reports the value box it was given in the record's ``info``."""

    def run(self, inp):
        recon = super().run(inp)
        recon.info["box_low"], recon.info["box_high"] = inp.input_range
        return recon


def test_normalised_images_fail_the_audit_not_training_until_value_range_is_declared(tmp_path):
    """Digits normalised to [-1, 1] (Normalize(0.5, 0.5)) through the default adapter: every audit is a failed
    record whose error says to declare value_range, with a warning, and training runs to the end; an adapter
    declaring value_range=(-1, 1) makes the audit ok, and the attack receives exactly that box."""
    x, y = digits(4)
    loader = DataLoader(TensorDataset(x * 2 - 1, y), batch_size=2)
    audit = LeakageAudit(attacks=[BoxSpyDLG(max_steps=20)], every_n_steps=1, log_dir=tmp_path / "a", max_pending=4,
                         worker_niceness=None)
    with pytest.warns(UserWarning, match=r"attack 'dlg' failed at step 0: BatchAdapterError: the images lie in "
                                         r"\[-1, 1\].*value_range=\(low, high\)"):
        trainer = fit(ImageClassifier(channels=1, size=8), loader, tmp_path, [audit], max_steps=2)
    assert trainer.global_step == 2 and audit.failed == 2
    records = read_audit_log(audit.log_path)
    assert [(r.step, r.status) for r in records] == [(0, "failed"), (1, "failed")]
    assert all("no value_range was declared" in r.error and not r.metrics for r in records)

    declared = LeakageAudit(attacks=[BoxSpyDLG(max_steps=20)], every_n_steps=1, log_dir=tmp_path / "b",
                            max_pending=4, worker_niceness=None,
                            batch_adapter=lambda b: ImageBatch(b[0], b[1], value_range=(-1.0, 1.0)))
    fit(ImageClassifier(channels=1, size=8), loader, tmp_path, [declared], max_steps=1)
    (record,) = read_audit_log(declared.log_path)
    assert record.status == "ok", record.error
    assert (record.info["box_low"], record.info["box_high"]) == (-1.0, 1.0) and record.metrics["psnr"] > 0


def test_unreadable_batches_fail_the_audit_and_a_batch_adapter_fixes_them(tmp_path):
    x, y = digits(4)
    dict_loader = DataLoader([{"x": a, "y": b} for a, b in zip(x, y, strict=True)], batch_size=2)
    audit = LeakageAudit(every_n_steps=1, log_dir=tmp_path / "a", max_pending=4)
    with pytest.warns(UserWarning, match=r"keys \{'x'.*Pass LeakageAudit\(batch_adapter=fn\)"):
        trainer = fit(ImageClassifier(channels=1, size=8), dict_loader, tmp_path, [audit], max_steps=2)
    assert trainer.global_step == 2
    assert [r.status for r in read_audit_log(audit.log_path)] == ["failed", "failed"]

    fixed = LeakageAudit(every_n_steps=2, log_dir=tmp_path / "b", max_pending=4, worker_niceness=None,
                         batch_adapter=lambda b: ImageBatch(b["x"], b["y"]))
    fit(ImageClassifier(channels=1, size=8), dict_loader, tmp_path, [fixed], max_steps=1)
    assert [r.status for r in read_audit_log(fixed.log_path)] == ["ok"]


def test_modality_and_attack_names_are_checked_eagerly():
    with pytest.raises(ValueError, match=r"modality must be one of 'auto', 'text', 'image', got 'video'"):
        LeakageAudit(modality="video")
    with pytest.raises(ValueError, match="attack 'span_check' reads text models, but the audited model is image"):
        LeakageAudit(modality="image", attacks=["span_check"])
    with pytest.raises(ValueError, match="Did you mean 'inverting_gradients'"):
        LeakageAudit(attacks=["inverting_gradient"])
    with pytest.raises(ValueError, match="reads image models"):
        LeakageAudit(modality="text", attacks=[InvertingGradients()])
    assert [a.name for a in LeakageAudit(modality="image").attacks] == ["dlg"]
    assert type(get_attack("dlg", "image")).__name__ == "ImageDLG" and type(get_attack("dlg")).__name__ == "DLG"


def test_modality_is_decided_from_the_model_at_setup(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=64, image_size=8, patch_size=4, num_labels=3))
    assert model_modality(small_bert()) == "text"
    assert model_modality(vit) == "image" and find_image_network(vit)[1] is vit
    assert model_modality(ImageClassifier()) == "image" and find_image_network(ImageClassifier())[0] == "model"
    with pytest.raises(UnsupportedModelError, match=r"network='model.fcc' names no submodule.*closest: model\.fc"):
        find_image_network(ImageClassifier(), "model.fcc")

    x, y = digits(2)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    with pytest.raises(UnsupportedModelError, match="holds no Hugging Face model and no nn.Embedding.*modality='image'"):
        fit(ImageClassifier(1, 8), loader, tmp_path, [LeakageAudit(modality="text", log_dir=tmp_path)], max_steps=1)
    with pytest.raises(ValueError, match="recompute='eval' is implemented for text models only"):
        fit(ImageClassifier(1, 8), loader, tmp_path, [LeakageAudit(recompute="eval", log_dir=tmp_path)], max_steps=1)
    with pytest.raises(ValueError, match="no attack can use the tapped modules.*labels: needs the classifier"):
        fit(ImageClassifier(1, 8), loader, tmp_path,
            [LeakageAudit(modules="model.body.0", attacks=["labels"], log_dir=tmp_path)], max_steps=1)
