"""``leak-audit bench image``: image gradient inversion on real images, per attack and batch size.

For each batch size ``B`` the first ``--n`` images of ``--data`` (an ``.npz`` with ``images`` uint8
``[N, H, W, C]`` or ``[N, H, W]`` and ``labels`` ``[N]``, e.g. CIFAR-10 test images) are cut into
batches; for each batch the observed gradient is DLG's LeNet's (every parameter, weights drawn from
``--seed``, pixels in ``[0, 1]``, batch-mean cross-entropy), and each attack reconstructs the batch from
it alone. The attacks are the registered image attacks (:func:`~leak_audit.attacks.get_attack`), run by
the same :class:`~leak_audit.runtime.auditor.Auditor` the training callback runs, with its scorer
(:class:`~leak_audit.metrics.scoring.ImageScorer`) and its per-attack random generators (seeded by
``--seed``, the batch's index and the attack's name). Labels: at ``B = 1`` iDLG's rule on the classifier
bias gradient fixes the label (exact for cross-entropy); at ``B > 1`` they are optimised as soft labels with
the images (DLG). Reconstructions are matched to the originals (Hungarian, MSE) and scored with PSNR,
SSIM and LPIPS (:mod:`leak_audit.metrics.image`). Rows: ``{attack, batch_size, psnr, ssim, lpips,
label_accuracy, seconds_per_batch, n_images, steps}``; ``--grid`` draws originals above reconstructions for
the first batch of every (attack, B).

Attacks: ``dlg`` (l2 distance, L-BFGS) and ``inverting_gradients`` (cosine + total variation, signed Adam,
2 restarts), at the step budgets of their published configurations
(:data:`~leak_audit.attacks.image.inversion.IMAGE_ATTACKS`, 3000 per restart) unless ``--max-steps``; and
``peftleak``, the malicious-provider attack on bottleneck-adapter gradients
(:mod:`leak_audit.threats.peftleak`, a threat, not a registered attack): its model is the crafted ViT for
``--vit-hidden``/``--vit-layers``/``--vit-patch`` with adapters of ``--adapter-r`` units, its public images
the last ``--public`` images of ``--data`` (disjoint from the audited ones), and its rows add ``patches``
(the fraction of patches recovered exactly).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from leak_audit.attacks import Attack, Reconstruction, get_attack
from leak_audit.attacks.image.inversion import IMAGE_ATTACKS
from leak_audit.capture.batch import ImageBatch
from leak_audit.capture.snapshot import AuditSnapshot
from leak_audit.cli.bench.common import (
    BenchError,
    command_line,
    fmt,
    intra_op_threads,
    markdown_report,
    parse_batch_sizes,
    parse_list,
    write_json,
    write_markdown,
    wrote,
)
from leak_audit.demos.datasets import load_images
from leak_audit.demos.image_models import LeNet
from leak_audit.metrics.image import lpips_status, score_image_reconstruction
from leak_audit.metrics.scoring import ImageScorer, Score
from leak_audit.models import image_model_spec
from leak_audit.models.image_replica import ImageReplica
from leak_audit.results.grids import write_grid
from leak_audit.runtime.auditor import Auditor
from leak_audit.threats.peftleak import malicious_vit, peftleak

__all__ = [
    "ATTACKS",
    "PEFTLEAK",
    "ImageBenchConfig",
    "add_image_arguments",
    "bench_attack",
    "bench_image_command",
    "bench_images",
    "rows_markdown",
    "run_image_bench",
]


def bench_images(path: str | Path, n: int, last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (``last``: last) ``n`` images of ``--data`` (:func:`~leak_audit.demos.datasets.load_images`).

    Raises:
        BenchError: unreadable file, missing ``images``/``labels`` arrays, wrong shapes or dtype, ``n`` too large.
    """
    try:
        images, labels = load_images(path)
    except ValueError as exc:
        raise BenchError(f"--data {exc}") from None
    if n > len(images):
        raise BenchError(f"--n {n} exceeds the {len(images)} images in {path}")
    part = slice(len(images) - n, None) if last else slice(0, n)
    return images[part].contiguous(), labels[part]


@dataclass(frozen=True)
class ImageBenchConfig:
    """One ``bench image`` run: data file, images, batch sizes, attacks, seed, step budget per attack."""

    data: Path
    n: int
    batch_sizes: tuple[int, ...]
    attacks: tuple[str, ...]
    seed: int = 0
    max_steps: int | None = None
    max_seconds: float | None = None
    public: int = 200
    vit_hidden: int = 384
    vit_layers: int = 12
    vit_patch: int = 8
    adapter_r: int = 64
    measurements: int = 3


PEFTLEAK = "peftleak"



ATTACKS: tuple[str, ...] = (*IMAGE_ATTACKS, PEFTLEAK)
"""What ``--attacks`` accepts: the registered inversions that have a published configuration, and ``peftleak``."""


def bench_attack(name: str, max_steps: int | None = None, max_seconds: float | None = None) -> Attack:
    """The registered image attack ``name`` as the benchmark runs it: ``max_steps`` gradient evaluations per
    restart (``None``: its published configuration's, :data:`~leak_audit.attacks.image.inversion.IMAGE_ATTACKS`)
    and its own time limit of ``max_seconds`` (``None``: none). A run its own limit stops is scored as it
    stands, as before the registry ran it (the audit itself has no deadline here)."""
    registered = get_attack(name, "image")
    steps = max_steps if max_steps is not None else int(IMAGE_ATTACKS[name]["max_steps"])  # type: ignore[call-overload]
    return type(registered)(max_steps=steps, max_seconds=math.inf if max_seconds is None else max_seconds)


class _KeepImages:
    """The auditor's image scorer, keeping the last reconstruction's images for the grid."""

    def __init__(self) -> None:
        self.scorer = ImageScorer()
        self.images: torch.Tensor | None = None

    def __call__(self, recon: Reconstruction, snapshot: AuditSnapshot) -> Score:
        self.images = recon.images
        return self.scorer(recon, snapshot)


def _row(config: ImageBenchConfig, model: str, attack: str, b: int, n_batches: int, scores: list[dict[str, float]],
         seconds: float, steps: float, console: Console, **extra: Any) -> dict[str, Any]:
    """One table row: means over the batches' scores, per-batch time and steps; printed as it is made."""
    mean = lambda key: sum(s[key] for s in scores) / len(scores)  # noqa: E731
    lp = mean("lpips")
    row = {
        "data": config.data.stem, "model": model, "attack": attack, "batch_size": b, "n_images": n_batches * b,
        "psnr": round(mean("psnr"), 3), "ssim": round(mean("ssim"), 4), "lpips": None if math.isnan(lp) else round(lp, 4),
        "label_accuracy": round(mean("label_accuracy"), 4) if "label_accuracy" in scores[0] else None, **extra,
        "seconds_per_batch": round(seconds / n_batches, 2), "steps_per_batch": round(steps / n_batches),
        "seed": config.seed,
    }
    more = f", patches {row['patches']:.3f}" if "patches" in row else ""
    console.print(f"{attack} B={b}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}{more}, "
                  f"{row['seconds_per_batch']:.2f} s/batch", markup=False, highlight=False)
    return row


def _peftleak_rows(config: ImageBenchConfig, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   console: Console, first: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
    from transformers import ViTConfig

    public, _ = bench_images(config.data, config.public, last=True)
    total = len(np.load(config.data)["labels"])
    if config.public + config.n > total:
        raise BenchError(f"--public {config.public} + --n {config.n} exceed the {total} images of {config.data}: "
                         "the provider's public images must not include the audited ones")
    if config.vit_hidden % 64:
        raise BenchError(f"--vit-hidden must be a multiple of 64 (heads of 64 dimensions), got {config.vit_hidden}")
    heads = config.vit_hidden // 64
    vit = ViTConfig(image_size=images.shape[-1], patch_size=config.vit_patch, num_channels=images.shape[1],
                    hidden_size=config.vit_hidden, num_hidden_layers=config.vit_layers, num_attention_heads=heads,
                    intermediate_size=4 * config.vit_hidden, num_labels=num_classes)
    try:
        model, design = malicious_vit(vit, public, r=config.adapter_r, measurements=config.measurements,
                                      seed=config.seed)
    except ValueError as exc:
        raise BenchError(f"peftleak: {exc}") from None
    name = (f"ViT D={config.vit_hidden} L={config.vit_layers} patch {config.vit_patch}, "
            f"Houlsby adapters r={config.adapter_r} (crafted)")
    rows = []
    for b in config.batch_sizes:
        batches = [(images[i:i + b], labels[i:i + b]) for i in range(0, config.n - b + 1, b)]
        scores: list[dict[str, float]] = []
        fractions: list[float] = []
        seconds = 0.0
        for k, (x, y) in enumerate(batches):
            model.zero_grad()
            model(pixel_values=x, labels=y).loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if ".adapter." in n and p.grad is not None}
            t0 = time.monotonic()
            res = peftleak(grads, design, b, deadline=None if config.max_seconds is None else t0 + config.max_seconds)
            seconds += time.monotonic() - t0
            fractions.append(res.recovered_fraction)
            scores.append(score_image_reconstruction(res.images.clamp(0, 1), x, 1.0))
            if k == 0:
                first[(PEFTLEAK, b)] = (x, res.images.clamp(0, 1))
        rows.append(_row(config, name, PEFTLEAK, b, len(batches), scores, seconds, 0, console,
                         patches=round(sum(fractions) / len(fractions), 4)))
    return rows


def run_image_bench(
    config: ImageBenchConfig, console: Console
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]]:
    """Run the benchmark.

    Returns:
        ``(rows, first)``: one row per (attack, B); ``first[(attack, B)]`` = (originals, matched
        reconstructions) of the first batch, for the grid.
    """
    images, labels = bench_images(config.data, config.n)
    num_classes = max(10, int(labels.max()) + 1)
    model = LeNet(num_classes, images.shape[1], images.shape[-1], seed=config.seed)
    replica = ImageReplica(model)
    spec = image_model_spec(model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    names = list(replica.parameter_names)
    rows: list[dict[str, Any]] = []
    first: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for b in config.batch_sizes:
        batches = [(images[i:i + b], labels[i:i + b]) for i in range(0, config.n - b + 1, b)]
        if not batches:
            raise BenchError(f"--n {config.n} is smaller than batch size {b}")
        for attack in config.attacks:
            if attack == PEFTLEAK:
                continue
            scorer = _KeepImages()
            auditor = Auditor(spec, [bench_attack(attack, config.max_steps, config.max_seconds)], names,
                              scorer=scorer, seed=config.seed, replica=replica)
            scores: list[dict[str, float]] = []
            seconds = steps = 0.0
            for k, (x, y) in enumerate(batches):
                target = replica.gradients(params, names, x, y)
                snapshot = AuditSnapshot(step=k, epoch=0, time=time.time(), gradients=dict(zip(names, target, strict=True)),
                                         params=params, batch=ImageBatch(x, y, value_range=(0.0, 1.0)), modules=("",))
                (record,) = auditor(snapshot)
                if record.status != "ok":
                    raise RuntimeError(f"{attack} on batch {k} (B={b}): {record.status}: {record.error}")
                seconds += record.seconds
                steps += record.info["steps"]
                lp = record.info.get("lpips", math.nan)
                scores.append({**record.metrics, "lpips": lp})
                if k == 0:
                    assert scorer.images is not None
                    first[(attack, b)] = (x, scorer.images.clamp(0, 1))
            rows.append(_row(config, "LeNet (DLG, sigmoid)", attack, b, len(batches), scores, seconds, steps, console))
    if PEFTLEAK in config.attacks:
        rows += _peftleak_rows(config, images, labels, num_classes, console, first)
    return rows, first


def rows_markdown(rows: list[dict[str, Any]], command: str) -> str:
    """The rows as a markdown table under the command that produced them."""
    columns = ("data", "model", "attack", "B", "images", "PSNR (dB)", "SSIM", "LPIPS", "label acc", "patches",
               "s/batch", "steps")
    cells = ([str(r["data"]), str(r["model"]), str(r["attack"]), str(r["batch_size"]), str(r["n_images"]),
              f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", fmt(r["lpips"]), fmt(r["label_accuracy"]),
              fmt(r.get("patches")), f"{r['seconds_per_batch']:.2f}", str(r["steps_per_batch"])] for r in rows)
    note = ("PSNR and SSIM: mean over all images (matched to reconstructions by least MSE); "
            "LPIPS: – when unavailable offline.")
    return markdown_report("leak-audit bench image", command, {"LPIPS": lpips_status()}, columns, cells, note,
                           numeric=columns[3:])


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench image`` options to ``parser``."""
    parser.add_argument("--data", required=True, metavar="FILE.npz",
                        help="npz with 'images' (uint8 [N, H, W, C] or [N, H, W]) and 'labels' [N]")
    parser.add_argument("--n", type=int, default=32, help="images read from the top of --data (default 32)")
    parser.add_argument("--batch-sizes", default="1,4,8", metavar="B,...", help="comma-separated (default 1,4,8)")
    parser.add_argument("--attacks", default="dlg,inverting_gradients", metavar="NAME,...",
                        help=f"comma-separated, from: {', '.join(ATTACKS)}")
    parser.add_argument("--public", type=int, default=200, metavar="N",
                        help="peftleak: the provider's public images, the last N of --data (default 200)")
    parser.add_argument("--vit-hidden", type=int, default=384, help="peftleak: ViT hidden size (default 384)")
    parser.add_argument("--vit-layers", type=int, default=12, help="peftleak: ViT layers (default 12)")
    parser.add_argument("--vit-patch", type=int, default=8, help="peftleak: ViT patch size (default 8)")
    parser.add_argument("--adapter-r", type=int, default=64, help="peftleak: adapter bottleneck units (default 64)")
    parser.add_argument("--measurements", type=int, default=3,
                        help="peftleak: binnings per patch position (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's weights and the attacks' starts")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="gradient evaluations per attack and restart (default: the attack's own)")
    parser.add_argument("--max-seconds", type=float, default=None, metavar="S", help="time budget per batch and attack")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="write the rows as JSON")
    parser.add_argument("--markdown", default=None, metavar="OUT.md", help="write the rows as a markdown table")
    parser.add_argument("--grid", default=None, metavar="OUT.png", help="originals vs reconstructions, first batches")


def bench_image_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``leak-audit bench image`` from parsed arguments: 0 on success, 2 on bad input."""
    try:
        if args.n < 1 or args.threads < 1:
            raise BenchError(f"--n and --threads must be >= 1, got {args.n} and {args.threads}")
        if args.max_steps is not None and args.max_steps < 1:
            raise BenchError(f"--max-steps must be >= 1, got {args.max_steps}")
        if args.max_seconds is not None and not args.max_seconds > 0:
            raise BenchError(f"--max-seconds must be > 0, got {args.max_seconds}")
        attacks = parse_list(args.attacks, "--attacks")
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise BenchError(f"--attacks: unknown image attack(s) {unknown}; valid: {', '.join(ATTACKS)}")
        if min(args.public, args.adapter_r, args.measurements) < 1:
            raise BenchError("--public, --adapter-r and --measurements must be >= 1, got "
                             f"{args.public}, {args.adapter_r}, {args.measurements}")
        config = ImageBenchConfig(Path(args.data), args.n, tuple(parse_batch_sizes(args.batch_sizes)),
                                  tuple(attacks), args.seed, args.max_steps, args.max_seconds, args.public,
                                  args.vit_hidden, args.vit_layers, args.vit_patch, args.adapter_r, args.measurements)
        with intra_op_threads(args.threads):
            rows, first = run_image_bench(config, console)
    except BenchError as exc:
        print(f"leak-audit bench image: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        wrote(console, write_json(rows, args.json))
    if args.markdown:
        wrote(console, write_markdown(rows_markdown(rows, command_line(args)), args.markdown))
    if args.grid:
        wrote(console, write_grid(first, args.grid))
    table = Table(title="leak-audit bench image")
    for col in ("attack", "B", "PSNR", "SSIM", "LPIPS", "label acc", "patches", "s/batch"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["attack"], str(r["batch_size"]), f"{r['psnr']:.2f}", f"{r['ssim']:.3f}",
                      fmt(r["lpips"]), fmt(r["label_accuracy"]), fmt(r.get("patches")), f"{r['seconds_per_batch']:.2f}")
    console.print(table)
    return 0
