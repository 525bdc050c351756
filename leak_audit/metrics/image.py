"""Image reconstruction metrics: PSNR, SSIM and LPIPS (torchmetrics), after matching images to originals.

An attack returns its reconstructions in its own order; each is first matched to one original by the
assignment that minimises the total mean squared error (Hungarian algorithm, ``scipy``), as Geiping et
al. (2020) and the PEFTLeak evaluation do. Then, per matched pair:

* **PSNR** (dB): ``10 log10(data_range² / MSE)`` (``torchmetrics`` ``peak_signal_noise_ratio``);
* **SSIM** in ``[-1, 1]`` (``structural_similarity_index_measure``, Gaussian window of 11 pixels, or the
  largest odd size that fits smaller images);
* **LPIPS** (lower is more similar; ``LearnedPerceptualImagePatchSimilarity``), only when its backbone
  weights are already on disk: torchmetrics builds a torchvision network that would otherwise download
  ImageNet weights. Without them (offline, or torchvision not installed) it is reported as unavailable
  (``nan``, with the reason from :func:`lpips_status`); it never downloads and never raises.

Every function takes images ``[B, C, H, W]`` in pixel units with values in ``[0, data_range]`` (convert
normalised model inputs back first).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from leak_audit.metrics.names import IMAGE_METRICS

__all__ = [
    "IMAGE_METRICS",
    "lpips",
    "lpips_status",
    "match_images",
    "psnr",
    "score_image_reconstruction",
    "ssim",
]

# torchvision checkpoints torchmetrics' LPIPS loads for each backbone (torch hub cache file names)
_LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def _check(preds: Tensor, target: Tensor) -> None:
    if preds.dim() != 4 or preds.shape != target.shape:
        raise ValueError(
            f"images must be [B, C, H, W] with equal shapes, got {tuple(preds.shape)} and {tuple(target.shape)}"
        )


def match_images(preds: Tensor, target: Tensor) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``: reconstruction ``i`` stands for original ``j``, minimising the total MSE.

    Args:
        preds: ``[B', C, H, W]`` reconstructions; target: ``[B, C, H, W]`` originals. ``B' ≠ B`` is
            allowed: ``min(B', B)`` pairs are returned.

    Raises:
        ValueError: the images' ``C, H, W`` differ.
    """
    if preds.dim() != 4 or target.dim() != 4 or preds.shape[1:] != target.shape[1:]:
        raise ValueError(f"images must be [B, C, H, W] of one size, got {tuple(preds.shape)} and {tuple(target.shape)}")
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(preds.flatten(1).double(), target.flatten(1).double()) ** 2
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True)]


def psnr(preds: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR ``[B]`` in dB (``inf`` for an exact copy).

    Raises:
        ValueError: shapes differ or ``data_range <= 0``.
    """
    _check(preds, target)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(
        preds.float(), target.float(), data_range=data_range, reduction="none", dim=(1, 2, 3)
    )


def ssim(preds: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image SSIM ``[B]`` (Gaussian window of 11 pixels, smaller for images under 11 pixels).

    Raises:
        ValueError: shapes differ, ``data_range <= 0``, or an image side is under 3 pixels.
    """
    _check(preds, target)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    side = min(preds.shape[-2:])
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {tuple(preds.shape[-2:])}")
    from torchmetrics.functional.image import structural_similarity_index_measure

    kernel = min(11, side if side % 2 else side - 1)
    sigma = 1.5 * kernel / 11
    return structural_similarity_index_measure(
        preds.float(), target.float(), data_range=data_range, kernel_size=kernel, sigma=sigma, reduction="none"
    )


@lru_cache(maxsize=4)
def lpips_status(net_type: str = "alex") -> str:
    """``"available"``, or why LPIPS cannot be computed here (without downloading anything).

    Raises:
        ValueError: ``net_type`` is not one of ``alex``, ``vgg``, ``squeeze``.
    """
    if net_type not in _LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS net_type {net_type!r}; valid: {', '.join(_LPIPS_BACKBONES)}")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return "unavailable: torchvision is not installed (LPIPS needs its backbone)"
    path = os.path.join(torch.hub.get_dir(), "checkpoints", _LPIPS_BACKBONES[net_type])
    if not os.path.exists(path):
        return f"unavailable: the {net_type} backbone weights are not on disk ({path}); leak_audit never downloads them"
    return "available"


@lru_cache(maxsize=4)
def _lpips_model(net_type: str):  # pragma: no cover - needs torchvision weights on disk
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction="mean", normalize=True).eval()


def lpips(preds: Tensor, target: Tensor, data_range: float = 1.0, net_type: str = "alex") -> Tensor:
    """Per-image LPIPS ``[B]``, or ``nan`` for every image when :func:`lpips_status` is not ``"available"``.

    Raises:
        ValueError: shapes differ or ``data_range <= 0``.
    """
    _check(preds, target)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    nan = torch.full((preds.shape[0],), math.nan)
    if lpips_status(net_type) != "available":
        return nan
    try:  # pragma: no cover - needs torchvision weights on disk
        model = _lpips_model(net_type)
        rgb = lambda x: (x.float() / data_range).clamp(0, 1).expand(-1, 3, -1, -1)  # noqa: E731
        with torch.no_grad():
            return torch.stack([model(rgb(p[None]), rgb(t[None])) for p, t in zip(preds, target, strict=True)])
    except Exception:  # noqa: BLE001 - a metric must never crash an audit
        return nan


def score_image_reconstruction(
    images: Tensor,
    target: Tensor,
    data_range: float = 1.0,
    *,
    labels: Sequence[int] | None = None,
    true_labels: Sequence[int] | None = None,
    with_lpips: bool = True,
) -> dict[str, float]:
    """Mean PSNR, SSIM and LPIPS over matched pairs (see :func:`match_images`), and label accuracy.

    Args:
        images: ``[B', C, H, W]`` reconstructions; target: ``[B, C, H, W]`` originals, both in
            ``[0, data_range]``. Originals without a reconstruction count with PSNR 0 dB and SSIM 0.
        labels: recovered labels aligned with ``images``; true_labels: the batch's labels.
        with_lpips: compute LPIPS (``nan`` when unavailable, see :func:`lpips_status`).

    Returns:
        ``{"psnr", "ssim", "lpips"?, "label_accuracy"?}``; PSNR in dB (an exact copy is capped at 100 dB so
        means stay finite).
    """
    pairs = match_images(images, target)
    idx_p = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    idx_t = torch.tensor([j for _, j in pairs], dtype=torch.long)
    p, t = images[idx_p], target[idx_t]
    n = target.shape[0]
    out = {
        "psnr": float(psnr(p, t, data_range).clamp(max=100.0).sum()) / n,
        "ssim": float(ssim(p, t, data_range).sum()) / n,
    }
    if with_lpips:
        out["lpips"] = float(lpips(p, t, data_range).mean())
    if labels is not None and true_labels is not None:
        out["label_accuracy"] = sum(int(labels[i]) == int(true_labels[j]) for i, j in pairs) / n
    return out
