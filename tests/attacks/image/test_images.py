"""Image gradient inversion (DLG, Inverting Gradients) and image metrics on real CIFAR-10 images.

The model is DLG's LeNet (sigmoid activations, weights uniform in [-0.5, 0.5]); step budgets, not
wall-clock ones, bind, so the runs are reproducible.
"""

from __future__ import annotations

import math

import pytest
import torch

from leak_audit.attacks.image.inversion import invert_images, total_variation
from leak_audit.attacks.labels import label_counts_from_bias
from leak_audit.metrics.image import lpips, lpips_status, match_images, psnr, score_image_reconstruction, ssim
from leak_audit.demos.image_models import LeNet
from leak_audit.models.image_replica import ImageReplica


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _observed(model, images, labels):
    replica = ImageReplica(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(replica.parameter_names)
    target = replica.gradients(params, names, images, labels)

    def grad_fn(x, y, create_graph):
        return replica.gradients(params, names, x, y, create_graph=create_graph)

    return target, grad_fn, params


def test_dlg_recovers_a_real_cifar10_image(cifar10):
    """DLG (l2, L-BFGS) with iDLG's label on one real CIFAR-10 image: PSNR >= 25 dB (33 dB measured
    with 3000 evaluations in ~25 s; the issue's bar for the test is 25 dB)."""
    images, labels = cifar10
    model = LeNet(seed=0)
    x, y = images[:1], labels[:1]
    target, grad_fn, _ = _observed(model, x, y)
    bias = target[[n for n, _ in model.named_parameters()].index("fc.bias")]
    counts = label_counts_from_bias(bias, 1)
    label = torch.tensor([counts.index(1)])
    assert int(label) == int(y)  # iDLG: the label at B = 1 is exact
    res = invert_images(grad_fn, target, x.shape, 10, labels=label, loss="l2", optimizer="lbfgs",
                        max_steps=3000, bounds=(0.0, 1.0))
    quality = score_image_reconstruction(res.images, x, 1.0, with_lpips=False)
    assert quality["psnr"] >= 25.0, quality
    assert quality["ssim"] >= 0.8, quality
    assert res.distance < 1e-4 and res.steps == 3000


def test_dlg_without_labels_optimises_soft_labels(cifar10):
    """Original DLG: no label prior, soft labels optimised jointly; the label comes back and the
    gradient distance falls by orders of magnitude from the random start (measured: 0.60 -> 3e-6,
    PSNR 7.8 -> 32.4 dB)."""
    images, labels = cifar10
    model = LeNet(seed=0)
    x, y = images[1:2], labels[1:2]
    target, grad_fn, _ = _observed(model, x, y)
    start = invert_images(grad_fn, target, x.shape, 10, loss="l2", optimizer="lbfgs", max_steps=1, bounds=(0.0, 1.0))
    res = invert_images(grad_fn, target, x.shape, 10, loss="l2", optimizer="lbfgs", max_steps=1500, bounds=(0.0, 1.0))
    assert res.labels.tolist() == y.tolist()
    assert res.distance < 1e-3 * start.distance
    assert float(psnr(res.images, x).min()) >= 25.0


def test_inverting_gradients_lowers_cosine_distance_and_stays_in_the_box(cifar10):
    """Inverting Gradients' configuration (cosine + TV, signed Adam, restarts): images stay in [0, 1],
    both restarts run, and 200 steps lower the cosine distance of the random start (measured: 0.057 ->
    0.0059)."""
    images, labels = cifar10
    model = LeNet(seed=0)
    x, y = images[2:4], labels[2:4]
    target, grad_fn, _ = _observed(model, x, y)
    options = dict(labels=y, loss="cos", tv_weight=1e-4, optimizer="adam", restarts=2, bounds=(0.0, 1.0))
    start = invert_images(grad_fn, target, x.shape, 10, max_steps=1, generator=torch.Generator().manual_seed(1),
                          **options)
    res = invert_images(grad_fn, target, x.shape, 10, max_steps=200, generator=torch.Generator().manual_seed(1),
                        **options)
    assert res.restarts == 2 and res.steps == 400
    assert float(res.images.min()) >= 0.0 and float(res.images.max()) <= 1.0
    assert res.distance < 0.2 * start.distance


def test_invert_images_rejects_bad_arguments():
    fn = lambda x, y, cg: [x.sum() * torch.ones(2)]  # noqa: E731
    target = [torch.ones(2)]
    with pytest.raises(ValueError, match="shape"):
        invert_images(fn, target, (1, 3, 32), 10)
    with pytest.raises(ValueError, match="optimizer"):
        invert_images(fn, target, (1, 3, 8, 8), 10, optimizer="sgd")
    with pytest.raises(ValueError, match="labels"):
        invert_images(fn, target, (2, 3, 8, 8), 10, labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown loss"):
        invert_images(fn, target, (1, 3, 8, 8), 10, loss="l3")


def test_total_variation_of_constant_and_checkerboard():
    assert float(total_variation(torch.ones(1, 1, 4, 4))) == 0.0
    board = (torch.arange(16).view(4, 4) + torch.arange(4).view(4, 1)) % 2
    assert float(total_variation(board.float()[None, None])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        total_variation(torch.ones(4, 4))


def test_metrics_match_reconstructions_before_scoring(cifar10):
    images, _ = cifar10
    x = images[:3]
    noisy = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    shuffled = noisy[[2, 0, 1]]
    assert match_images(shuffled, x) == [(0, 2), (1, 0), (2, 1)]
    direct = score_image_reconstruction(noisy, x, with_lpips=False)
    matched = score_image_reconstruction(shuffled, x, labels=[5, 6, 7], true_labels=[6, 7, 5], with_lpips=False)
    assert matched["psnr"] == pytest.approx(direct["psnr"]) and 30 < direct["psnr"] < 40
    assert matched["ssim"] == pytest.approx(direct["ssim"])
    assert matched["label_accuracy"] == 1.0
    # a missing reconstruction counts as nothing recovered
    assert score_image_reconstruction(noisy[:1], x, with_lpips=False)["psnr"] < direct["psnr"] / 2
    assert float(psnr(x, x).min()) == math.inf
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert ssim(x[:, :, :8, :8], x[:, :, :8, :8]).tolist() == pytest.approx([1.0] * 3)  # small images: smaller window
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0)


def test_lpips_offline_is_reported_unavailable_and_never_raises():
    status = lpips_status()
    x = torch.rand(2, 3, 16, 16)
    if status != "available":
        assert status.startswith("unavailable: ")
        assert torch.isnan(lpips(x, x)).all()
        assert math.isnan(score_image_reconstruction(x, x)["lpips"])
    with pytest.raises(ValueError, match="net_type"):
        lpips_status("resnet")


def test_bench_image_writes_rows_markdown_and_grid(cifar10, tmp_path):
    """``leak-audit bench image`` on 2 real CIFAR-10 images with a tiny step budget: exit 0, one row per
    (attack, B) with the issue's keys, a markdown table and a PNG grid; bad input exits 2."""
    import json

    from leak_audit.cli.main import main
    from tests.conftest import data_file

    npz = str(data_file("cifar10_test_500.npz"))
    out = tmp_path / "rows.json"
    rc = main(["bench", "image", "--data", npz, "--n", "2", "--batch-sizes", "1,2", "--max-steps", "20",
               "--json", str(out), "--markdown", str(tmp_path / "rows.md"), "--grid", str(tmp_path / "grid.png")])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [(r["attack"], r["batch_size"]) for r in rows] == [
        ("dlg", 1), ("inverting_gradients", 1), ("dlg", 2), ("inverting_gradients", 2)
    ]
    for r in rows:
        assert {"psnr", "ssim", "lpips", "label_accuracy", "seconds_per_batch"} <= set(r)
        assert r["n_images"] == 2 and 0 < r["psnr"] < 60
    assert rows[0]["label_accuracy"] == 1.0  # iDLG at B = 1
    assert "| cifar10_test_500 | LeNet (DLG, sigmoid) | dlg | 1 | 2 |" in (tmp_path / "rows.md").read_text()
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "image", "--data", npz, "--attacks", "dgl"]) == 2
    assert main(["bench", "image", "--data", str(tmp_path / "none.npz")]) == 2
    assert main(["bench", "image", "--data", npz, "--n", "1", "--batch-sizes", "2"]) == 2


def test_bench_image_runs_the_registered_attacks():
    """``bench image`` runs the registry's image attacks (through the callback's ``Auditor``), at the step
    budgets of their published configurations unless ``--max-steps``, with no time limit unless ``--max-seconds``."""
    from leak_audit.attacks import get_attack
    from leak_audit.cli.bench.image import bench_attack

    dlg = bench_attack("dlg")
    assert type(dlg) is type(get_attack("dlg", "image")) and dlg.max_steps == 3000 and dlg.max_seconds == math.inf
    ig = bench_attack("inverting_gradients", 20, 5.0)
    assert type(ig) is type(get_attack("inverting_gradients", "image")) and (ig.max_steps, ig.max_seconds) == (20, 5.0)
