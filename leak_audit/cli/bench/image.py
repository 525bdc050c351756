"""``leak-audit bench image``: image gradient inversion on real images, per attack and batch size.

For each batch size ``B`` the first ``--n`` images of ``--data`` (an ``.npz`` with ``images`` uint8
``[N, H, W, C]`` or ``[N, H, W]`` and ``labels`` ``[N]``, e.g. ``../shared/data/cifar10_test_500.npz``) are
cut into batches; for each batch the observed gradient is DLG's LeNet's (every parameter, weights drawn
from ``--seed``, pixels in ``[0, 1]``, batch-mean cross-entropy), and each attack reconstructs the batch
from it alone. Labels: at ``B = 1`` iDLG's rule on the classifier bias gradient fixes the label (exact
for cross-entropy); at ``B > 1`` they are optimised as soft labels with the images (DLG). Reconstructions
are matched to the originals (Hungarian, MSE) and scored with PSNR, SSIM and LPIPS
(:mod:`leak_audit.metrics.image`). Rows: ``{attack, batch_size, psnr, ssim, lpips, label_accuracy,
seconds_per_batch, n_images, steps}``; ``--grid`` draws originals above reconstructions for the first
batch of every (attack, B).

Attacks (:data:`~leak_audit.attacks.image.inversion.IMAGE_ATTACKS`): ``dlg`` (l2 distance, L-BFGS) and
``inverting_gradients`` (cosine + total variation, signed Adam, 2 restarts); and ``peftleak``, the
malicious-provider attack on bottleneck-adapter gradients (:mod:`leak_audit.threats.peftleak`): its
model is the crafted ViT for ``--vit-hidden``/``--vit-layers``/``--vit-patch`` with adapters of
``--adapter-r`` units, its public images the last ``--public`` images of ``--data`` (disjoint from the
audited ones), and its rows add ``patches`` (the fraction of patches recovered exactly).
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

from leak_audit.attacks.image.inversion import IMAGE_ATTACKS, reconstruct_images
from leak_audit.attacks.labels import label_counts_from_bias
from leak_audit.threats.peftleak import malicious_vit, peftleak
from leak_audit.cli.bench.text import (
    BenchError,
    command_line,
    intra_op_threads,
    parse_batch_sizes,
    parse_list,
    write_json,
    write_markdown,
    wrote,
)
from leak_audit.metrics.image import lpips_status, match_images, score_image_reconstruction
from leak_audit.demos.image_models import LeNet
from leak_audit.models.image_replica import ImageReplica

__all__ = ["ImageBenchConfig", "add_image_arguments", "bench_image_command", "load_images", "run_image_bench"]


def load_images(path: str | Path, n: int, last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (``last``: last) ``n`` images of an ``.npz`` file as ``([n, C, H, W]`` floats in ``[0, 1]``,
    ``[n]`` labels).

    Raises:
        BenchError: unreadable file, missing ``images``/``labels`` arrays, wrong shapes or dtype, ``n`` too large.
    """
    try:
        data = np.load(path)
        images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(f"--data {path}: needs an .npz with 'images' (uint8 [N, H, W, C]) and 'labels' ({exc})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.shape != images.shape[:1]:
        raise BenchError(f"--data {path}: images must be uint8 [N, H, W(, C)] with one label each, got "
                         f"{images.dtype} {images.shape} and labels {labels.shape}")
    if n > len(images):
        raise BenchError(f"--n {n} exceeds the {len(images)} images in {path}")
    part = slice(len(images) - n, None) if last else slice(0, n)
    x = torch.from_numpy(images[part]).float() / 255
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.from_numpy(labels[part].astype(np.int64))


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
ATTACKS = (*IMAGE_ATTACKS, PEFTLEAK)


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

    public, _ = load_images(config.data, config.public, last=True)
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
    images, labels = load_images(config.data, config.n)
    num_classes = max(10, int(labels.max()) + 1)
    model = LeNet(num_classes, images.shape[1], images.shape[-1], seed=config.seed)
    replica = ImageReplica(model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    names = list(replica.parameter_names)
    bias_index = names.index("fc.bias")
    rows: list[dict[str, Any]] = []
    first: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for b in config.batch_sizes:
        batches = [(images[i:i + b], labels[i:i + b]) for i in range(0, config.n - b + 1, b)]
        if not batches:
            raise BenchError(f"--n {config.n} is smaller than batch size {b}")
        for attack in config.attacks:
            if attack == PEFTLEAK:
                continue
            scores: list[dict[str, float]] = []
            seconds = steps = 0.0
            for k, (x, y) in enumerate(batches):
                target = replica.gradients(params, names, x, y)
                known = None
                if b == 1:
                    known = torch.tensor([label_counts_from_bias(target[bias_index], 1).index(1)])

                def grad_fn(xx: torch.Tensor, ll: torch.Tensor, cg: bool) -> list[torch.Tensor]:
                    return replica.gradients(params, names, xx, ll, create_graph=cg)

                t0 = time.monotonic()
                res = reconstruct_images(
                    attack, grad_fn, target, x.shape, num_classes, labels=known, max_steps=config.max_steps,
                    deadline=None if config.max_seconds is None else t0 + config.max_seconds,
                    generator=torch.Generator().manual_seed(config.seed * 1000 + k),
                )
                seconds += time.monotonic() - t0
                steps += res.steps
                scores.append(score_image_reconstruction(
                    res.images.clamp(0, 1), x, 1.0, labels=res.labels.tolist(), true_labels=y.tolist()
                ))
                if k == 0:
                    first[(attack, b)] = (x, res.images.clamp(0, 1))
            rows.append(_row(config, "LeNet (DLG, sigmoid)", attack, b, len(batches), scores, seconds, steps, console))
    if PEFTLEAK in config.attacks:
        rows += _peftleak_rows(config, images, labels, num_classes, console, first)
    return rows, first


def markdown_report(rows: list[dict[str, Any]], command: str) -> str:
    """The rows as a markdown table under the command that produced them."""
    lines = ["# leak-audit bench image", "", "```", command, "```", "",
             f"- LPIPS: {lpips_status()}", "",
             "| data | model | attack | B | images | PSNR (dB) | SSIM | LPIPS | label acc | patches | s/batch | steps |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lp = "–" if r["lpips"] is None else f"{r['lpips']:.3f}"
        acc = "–" if r["label_accuracy"] is None else f"{r['label_accuracy']:.3f}"
        patches = f"{r['patches']:.3f}" if "patches" in r else "–"
        lines.append(f"| {r['data']} | {r['model']} | {r['attack']} | {r['batch_size']} | {r['n_images']} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {lp} | {acc} | {patches} | {r['seconds_per_batch']:.2f} | "
                     f"{r['steps_per_batch']} |")
    lines += ["", "PSNR and SSIM: mean over all images (matched to reconstructions by least MSE); "
              "LPIPS: – when unavailable offline."]
    return "\n".join(lines) + "\n"


def write_grid(first: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]], path: str | Path,
               per_row: int = 8) -> Path:
    """A PNG: for each (attack, B), up to ``per_row`` originals above their reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(first)
    per_row = max(2, min(per_row, max(len(x) for x, _ in first.values())))
    fig, axes = plt.subplots(2 * len(keys), per_row, figsize=(per_row * 1.0, 2.2 * len(keys)), squeeze=False)
    for r, key in enumerate(keys):
        x, rec = first[key]
        order = dict((j, i) for i, j in match_images(rec, x))
        for c in range(per_row):
            for row, img in ((2 * r, x[c] if c < len(x) else None),
                             (2 * r + 1, rec[order[c]] if c < len(x) and c in order else None)):
                ax = axes[row, c]
                ax.axis("off")
                if img is not None:
                    pic = img.permute(1, 2, 0).numpy()
                    ax.imshow(pic[..., 0] if pic.shape[-1] == 1 else pic, cmap="gray" if pic.shape[-1] == 1 else None,
                              vmin=0, vmax=1)
        axes[2 * r, 0].set_title(f"{key[0]}, B={key[1]}: originals / reconstructions", loc="left", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.25 / (2.2 * len(keys)), bottom=0.01, wspace=0.04, hspace=0.18)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
        wrote(console, write_markdown(markdown_report(rows, command_line(args)), args.markdown))
    if args.grid:
        wrote(console, write_grid(first, args.grid))
    table = Table(title="leak-audit bench image")
    for col in ("attack", "B", "PSNR", "SSIM", "LPIPS", "label acc", "patches", "s/batch"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["attack"], str(r["batch_size"]), f"{r['psnr']:.2f}", f"{r['ssim']:.3f}",
                      "–" if r["lpips"] is None else f"{r['lpips']:.3f}",
                      "–" if r["label_accuracy"] is None else f"{r['label_accuracy']:.3f}",
                      f"{r['patches']:.3f}" if "patches" in r else "–", f"{r['seconds_per_batch']:.2f}")
    console.print(table)
    return 0
