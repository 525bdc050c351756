"""Train a small CNN on images while LeakageAudit measures how much of each batch DLG rebuilds from the gradients.

The default run needs no download: scikit-learn's bundled handwritten digits (1797 grayscale 8×8 images,
10 classes, pixels scaled to [0, 1]). The model is the LeNet of Deep Leakage from Gradients (Zhu et al.
2019: three 5×5 convolutions with sigmoid activations and one linear layer, weights uniform in
[-0.5, 0.5]), trained with Adam on batch-mean cross-entropy. Every N optimizer steps the callback copies
the gradient the optimizer applied and, in a background thread, runs DLG on it (iDLG's label rule at
B = 1), then scores the reconstructions against the real batch: PSNR (dB), SSIM, label accuracy. The run
writes ``audit.jsonl`` and CSV logs, then prints a leakage summary and the release-gate verdict.

    python examples/image_classification.py                                       # digits, offline
    python examples/image_classification.py --data cifar10_test_500.npz --batch-size 1 \\
        --max-steps 20 --every-n-steps 5                                          # real CIFAR-10 images
    python examples/image_classification.py --attacks dlg inverting_gradients labels --log-samples
    python examples/image_classification.py --modules model.fc                    # the attacker sees fc only

``--data`` reads an ``.npz`` with ``images`` (uint8 ``[N, H, W, C]`` or ``[N, H, W]``, H = W a multiple of
4) and ``labels`` ``[N]``. ``--log-samples`` writes each audit's originals and reconstructions to
``LOG_DIR/samples/*.npz`` and a picture of the first ones to ``LOG_DIR/reconstructions.png``: they are
the private images, so this is opt-in.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from leak_audit import ImageBatch, LeakageAudit, available_attacks, read_audit_log, select_run
from leak_audit.demos.datasets import load_images
from leak_audit.demos.image_models import LeNet
from leak_audit.gate.render import policy_table
from leak_audit.gate.thresholds import GateError, policy_from_args
from leak_audit.metrics.names import IMAGE_METRICS
from leak_audit.results.grids import write_grid
from leak_audit.results.summary import summary_table


class ImageClassifier(L.LightningModule):
    """DLG's sigmoid LeNet trained with Adam. Batches are ``(images [B, C, H, W] in [0, 1], labels [B])``."""

    def __init__(self, num_classes: int, channels: int, size: int, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        self.model = LeNet(num_classes, channels, size, seed=seed)
        self.lr = lr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", (logits.argmax(-1) == labels).float().mean(), batch_size=len(labels))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def audit_batch(batch: list[torch.Tensor]) -> ImageBatch:
    """What the audit reads from a training batch: the images with their public box of valid values. The
    pixels are scaled to [0, 1] (``load_data``), so the box is ``(0, 1)``; after a ``Normalize(mean, std)``
    it would be ``(min(-mean / std), max((1 - mean) / std))``. Without a declared box the audit accepts only
    the standard pixel boxes [0, 1] and [0, 255] and fails on anything else, never reading the box off the
    private batch."""
    images, labels = batch
    return ImageBatch(images, labels, value_range=(0.0, 1.0))


def load_data(path: str | None, n: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images [N, C, H, W]`` in ``[0, 1]``, ``labels [N]``, a description): ``path`` (an ``.npz``) or the
    digits bundled with scikit-learn. Exits with a message on bad input."""
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float()[:, None] / 16  # 0..16 -> [0, 1]
        labels = torch.from_numpy(digits.target).long()
        source = "scikit-learn digits (8x8 grayscale, bundled)"
    else:
        try:
            images, labels = load_images(path)
        except ValueError as exc:  # its message starts with the path
            sys.exit(f"--data {exc}")
        source = path
    if n is not None:
        images, labels = images[:n], labels[:n]
    if images.shape[-1] != images.shape[-2] or images.shape[-1] % 4:
        sys.exit(f"DLG's LeNet needs square images with a side that is a multiple of 4, got {tuple(images.shape[2:])}")
    return images, labels, source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="FILE.npz", help="npz with 'images' (uint8 [N, H, W(, C)]) and 'labels' "
                   "(default: scikit-learn's bundled 8x8 digits)")
    p.add_argument("--n", type=int, default=None, help="use the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--every-n-steps", type=int, default=25, help="audit every N optimizer steps")
    p.add_argument("--modules", nargs="+", default=None, help="tapped modules (names or globs); default: the whole model")
    p.add_argument("--attacks", nargs="+", default=None,
                   help=f"image attacks, from {available_attacks('image')} (default: dlg)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time budget of each attack of an audit (seconds)")
    p.add_argument("--max-pending", type=int, default=16,
                   help="audits queued or running at once; more due audits are skipped (training an 8x8 LeNet is "
                        "faster than DLG, so the demo queues them)")
    p.add_argument("--log-dir", default="runs/image-demo", help="where audit.jsonl and the CSV logs go")
    p.add_argument("--log-samples", action="store_true",
                   help="write originals and reconstructions to LOG_DIR/samples and LOG_DIR/reconstructions.png (private!)")
    p.add_argument("--gate", nargs="+", default=["psnr=20", "ssim=0.5"], metavar="METRIC=MAX",
                   help="release-gate thresholds for the final verdict (default: psnr=20 ssim=0.5)")
    p.add_argument("--fail-on-breach", action="store_true", help="exit 1 when the gate fails")
    p.add_argument("--train-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch threads for training; the default leaves one core to the audit worker")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch_size", "epochs", "every_n_steps", "max_pending", "train_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n is not None and args.n < args.batch_size:
        p.error(f"--n {args.n} is smaller than --batch-size {args.batch_size}")
    return args


def write_reconstructions(log_dir: Path, run: str, console: Console) -> None:
    """Draw the first audit's originals above their reconstructions, per attack (``--log-samples``), of run ``run``."""
    first: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for r in select_run(read_audit_log(log_dir / "audit.jsonl"), run):
        if r.status == "ok" and r.samples and (r.attack, r.batch_size) not in first:
            with np.load(log_dir / r.samples[0]["file"]) as data:
                first[(r.attack, r.batch_size)] = (torch.from_numpy(data["originals"]).clamp(0, 1),
                                                   torch.from_numpy(data["reconstructions"]).clamp(0, 1))
    if first:
        console.print(f"originals vs reconstructions: {write_grid(first, log_dir / 'reconstructions.png')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.train_threads)
    console = Console()
    L.seed_everything(args.seed, verbose=False)
    try:
        policy = policy_from_args(None, args.gate)
    except GateError as exc:
        sys.exit(f"--gate: {exc}")
    images, labels, source = load_data(args.data, args.n)
    num_classes = max(2, int(labels.max()) + 1)
    console.print(f"data: {source}; {len(labels)} images of {tuple(images.shape[1:])}, {num_classes} classes")
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    module = ImageClassifier(num_classes, images.shape[1], images.shape[-1], lr=args.lr, seed=args.seed)
    log_dir = Path(args.log_dir)
    try:
        audit = LeakageAudit(
            modules=args.modules, every_n_steps=args.every_n_steps, attacks=args.attacks, log_dir=log_dir,
            log_samples=args.log_samples, max_pending=args.max_pending, max_seconds=args.max_seconds,
            seed=args.seed, modality="image", batch_adapter=audit_batch,
        )
    except ValueError as exc:
        sys.exit(f"LeakageAudit: {exc}")
    trainer = L.Trainer(
        max_epochs=args.epochs, max_steps=args.max_steps, callbacks=[audit],
        logger=[CSVLogger(save_dir=log_dir, name="csv")], log_every_n_steps=1, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    elapsed = time.perf_counter() - start
    console.print(
        f"trained {trainer.global_step} steps in {elapsed:.1f}s (audits included: training waits for the last ones "
        f"at the end); audits: {audit.audits} (skipped while busy: {audit.skipped}, failed: {audit.failed})"
    )
    records = select_run(read_audit_log(audit.log_path), audit.run_id)  # this run's, not earlier runs' in the log
    console.print(summary_table(records, [m for m in IMAGE_METRICS if m != "lpips"],
                                f"Leakage summary of run {audit.run_id}, worst over audits"))
    for attack in dict.fromkeys(r.attack for r in records):
        steps = [f"{r.step}: {r.metrics['psnr']:.1f}" for r in records if r.attack == attack and "psnr" in r.metrics]
        if steps:
            console.print(f"{attack} PSNR (dB) by step: {', '.join(steps)}", highlight=False)
    try:
        report = policy.evaluate(records)
    except GateError as exc:  # e.g. every audit failed: nothing to judge
        console.print(f"[red]release gate: {exc}[/red]")
        return 1
    console.print(policy_table(report, title="Release gate"))
    breach = not report.passed
    console.print(
        ("[red]verdict: BREACH[/red]" if breach else "[green]verdict: PASS[/green]")
        + f"  (check again with: leak-audit gate {audit.log_path} --run {audit.run_id} " + " ".join(f"--max {t}" for t in args.gate) + ")"
    )
    if args.log_samples:
        write_reconstructions(log_dir, audit.run_id, console)
    return 1 if (breach and args.fail_on_breach) else 0


if __name__ == "__main__":
    sys.exit(main())
