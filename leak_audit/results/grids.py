"""Pictures of image reconstructions: originals above what an attack rebuilt from the gradients."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from leak_audit.metrics.image import match_images

__all__ = ["write_grid"]


def write_grid(first: Mapping[tuple[str, int], tuple[torch.Tensor, torch.Tensor]], path: str | Path,
               per_row: int = 8) -> Path:
    """A PNG: for each ``(attack, B)``, up to ``per_row`` originals above their reconstructions.

    Args:
        first: ``{(attack, batch size): (originals, reconstructions)}``, both ``[B, C, H, W]`` in ``[0, 1]``;
            each original is shown above the reconstruction matched to it (:func:`~leak_audit.metrics.image.match_images`).
        path: the PNG to write (parent folders are created).
        per_row: images per row at most.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
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
