"""PEFTLeak (Sami et al., CVPR 2025): bottleneck adapters in a ViT, the crafted model, the analytic attack.

The leakage test uses real CIFAR-10 images: the batch comes from the first images, the provider's
"public" images (bin thresholds) from a disjoint slice of the same file.
"""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from leak_audit.threats.peftleak import malicious_vit, peftleak
from leak_audit.metrics.image import match_images, ssim
from leak_audit.threats.vit_adapters import AdaptedLinear, add_bottleneck_adapters


def _config(layers: int = 4, hidden: int = 384, heads: int = 6) -> ViTConfig:
    return ViTConfig(
        image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, num_labels=10,
    )


def _adapter_gradients(model, images, labels) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(pixel_values=images, labels=labels).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if ".adapter." in n}


def _patch_grid(images: torch.Tensor, p: int = 8) -> torch.Tensor:
    """``[B, C, H, W]`` to ``[B, N, C, p, p]`` patches."""
    B, C, H, W = images.shape
    g = H // p
    return images.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C, p, p)


def test_adapters_freeze_the_backbone_and_start_as_identity():
    torch.manual_seed(0)
    model = ViTForImageClassification(_config(layers=2, hidden=64, heads=2))
    x = torch.rand(2, 3, 32, 32)
    before = model(pixel_values=x).logits
    sites = add_bottleneck_adapters(model, r=8, placement="houlsby")
    assert [(s.layer, s.sublayer) for s in sites] == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{s.name}.{lin}.{w}" for s in sites for lin in ("down", "up") for w in ("weight", "bias")} | {
        "classifier.weight",
        "classifier.bias",
    }
    torch.testing.assert_close(model(pixel_values=x).logits, before)  # up-projection starts at zero
    assert sum(isinstance(m, AdaptedLinear) for m in model.modules()) == 4

    pfeiffer = ViTForImageClassification(_config(layers=2, hidden=64, heads=2))
    assert [s.sublayer for s in add_bottleneck_adapters(pfeiffer, r=8, placement="pfeiffer")] == ["mlp", "mlp"]
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        add_bottleneck_adapters(pfeiffer, r=8)
    with pytest.raises(ValueError, match="placement must be one of"):
        add_bottleneck_adapters(ViTForImageClassification(_config(2, 64, 2)), placement="parallel")


def test_malicious_vit_names_the_bound_a_config_misses():
    public = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"hidden_size 128 < patch pixels 192"):
        malicious_vit(_config(hidden=128, heads=2), public)
    with pytest.raises(ValueError, match=r"head dim 16 < tokens 17"):
        malicious_vit(_config(hidden=384, heads=24), public)
    with pytest.raises(ValueError, match=r"public_images must be \[M, 3, 32, 32\]"):
        malicious_vit(_config(), torch.rand(4, 3, 16, 16))
    with pytest.raises(ValueError, match=r"2 usable adapters x r=4 units < 2 units x 16 positions x 3 measurements"):
        malicious_vit(_config(layers=2), public, r=4, measurements=3)


def test_peftleak_rebuilds_an_8_image_cifar_batch_from_adapter_gradients(cifar10):
    images, labels = cifar10
    batch, y = images[:8], labels[:8]
    model, design = malicious_vit(_config(layers=4), images[300:500], r=64, measurements=3)
    grads = _adapter_gradients(model, batch, y)
    # the user's side: only adapters (and the head) train; the backbone gets no gradient to share
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads) | {
        "classifier.weight",
        "classifier.bias",
    }

    rec = peftleak(grads, design, batch_size=8)

    assert rec.recovered_fraction >= 0.9
    pairs = match_images(rec.images.clamp(0, 1), batch)
    pred = _patch_grid(rec.images[[p for p, _ in pairs]].clamp(0, 1))
    true = _patch_grid(batch[[t for _, t in pairs]])
    per_patch = ssim(pred.flatten(0, 1), true.flatten(0, 1))  # [B * 16] SSIM of every 8x8 patch
    assert (per_patch >= 0.8).float().mean() >= 0.9, per_patch
    # recovered patches are exact up to float32 rounding, not approximations
    err = torch.stack(
        [(true[:, pos] - patch).abs().amax((1, 2, 3)).min() for patch, pos in zip(rec.patches, rec.positions, strict=True)]
    )
    assert err.max() < 1e-3


def test_peftleak_needs_every_adapter_gradient(cifar10):
    images, labels = cifar10
    model, design = malicious_vit(_config(layers=2), images[300:340], r=32, measurements=1)
    grads = _adapter_gradients(model, images[:2], labels[:2])
    grads.pop(f"{design.chains[0].site}.down.bias")
    with pytest.raises(KeyError, match="down.bias is missing"):
        peftleak(grads, design, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        peftleak(grads, design, batch_size=0)


def test_bench_image_runs_peftleak(cifar10, tmp_path):
    """``leak-audit bench image --attacks peftleak`` on 16 real images with a 4-layer crafted ViT: rows with the
    recovered patch share, and the public images may not overlap the audited ones."""
    import json

    from leak_audit.cli.main import main
    from tests.conftest import data_file

    npz = str(data_file("cifar10_test_500.npz"))
    out = tmp_path / "rows.json"
    rc = main(["bench", "image", "--data", npz, "--n", "16", "--batch-sizes", "8", "--attacks", "peftleak",
               "--public", "100", "--vit-layers", "4", "--json", str(out), "--markdown", str(tmp_path / "rows.md")])
    assert rc == 0
    (row,) = json.loads(out.read_text())
    assert row["attack"] == "peftleak" and row["batch_size"] == 8 and row["n_images"] == 16
    assert row["patches"] >= 0.9 and row["ssim"] >= 0.9 and row["label_accuracy"] is None
    assert "| peftleak | 8 | 16 |" in (tmp_path / "rows.md").read_text()
    assert main(["bench", "image", "--data", npz, "--n", "16", "--attacks", "peftleak", "--public", "490"]) == 2
    assert main(["bench", "image", "--data", npz, "--n", "16", "--attacks", "peftleak", "--vit-hidden", "128"]) == 2
