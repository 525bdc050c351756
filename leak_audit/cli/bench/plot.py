"""Leakage against DP noise: the PNG that ``leak-audit bench text --dp-noise ... --plot OUT.png`` writes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_noise_curves"]


def plot_noise_curves(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Plot leakage against σ (top) and against ε (bottom), one line per (view, B).

    Each point is the worst case over the attacks that ran: per metric, the highest value any attack
    reached on that (view, B, σ) (the mean over batches), so the token bag, which has no ROUGE, still
    shows in token recall. Columns: ROUGE-1, token recall, label accuracy.

    Args:
        rows: benchmark rows with ``noise_multiplier`` and ``epsilon`` (``None`` for ε = ∞ at σ = 0).
        path: PNG to write (parent directories are created).

    Returns:
        The written path. σ = 0 sits at the left edge of the σ axis (symlog scale, linear below 1e-4);
        rows with ε = ∞ are left out of the ε plots, whose x axis is logarithmic and reversed (more
        privacy to the right, as on the σ axis).

    Raises:
        ValueError: no row carries ``noise_multiplier``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp_rows = [r for r in rows if "noise_multiplier" in r]
    if not dp_rows:
        raise ValueError("no row has a noise_multiplier: run the benchmark with --dp-noise")
    metrics = (("rouge1", "ROUGE-1"), ("token_recall", "token recall"), ("label_accuracy", "label accuracy"))
    points: dict[tuple[str, int], dict[float, dict[str, Any]]] = {}
    for r in dp_rows:
        sigma = float(r["noise_multiplier"])
        cell = points.setdefault((str(r["view"]), int(r["batch_size"])), {}).setdefault(
            sigma, {"epsilon": r.get("epsilon")}
        )
        for key, _ in metrics:
            if r.get(key) is not None:
                cell[key] = max(float(r[key]), cell.get(key, -math.inf))
    fig, axes = plt.subplots(2, len(metrics), figsize=(16, 8), constrained_layout=True)
    styles = ("-o", "--s", ":^", "-.D")
    views = sorted({v for v, _ in points})
    for col, (key, label) in enumerate(metrics):
        for (view, b), by_sigma in sorted(points.items()):
            sigmas = sorted(by_sigma)
            ys = [by_sigma[s].get(key, math.nan) for s in sigmas]
            if all(math.isnan(y) for y in ys):
                continue
            short = view if len(view) <= 40 else "…" + view[-39:]
            style = styles[views.index(view) % len(styles)]
            axes[0][col].plot(sigmas, ys, style, label=f"{short}, B={b}", alpha=0.85)
            finite = [(float(by_sigma[s]["epsilon"]), y) for s, y in zip(sigmas, ys, strict=True)
                      if by_sigma[s]["epsilon"] is not None]
            if finite:
                axes[1][col].plot(*zip(*finite, strict=True), style, label=f"{short}, B={b}", alpha=0.85)
        top, bottom = axes[0][col], axes[1][col]
        top.set_xscale("symlog", linthresh=1e-4)
        top.set_xlabel("noise multiplier σ")
        bottom.set_xscale("log")
        bottom.set_xlabel("ε at δ = 1e-5, one epoch (RDP)")
        for ax in (top, bottom):
            ax.set_ylabel(f"{label} (worst over attacks)")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(True, alpha=0.3)
        bottom.invert_xaxis()
    axes[0][0].legend(fontsize=8)
    data = sorted({str(r["data"]) for r in dp_rows})
    clip = sorted({float(r.get("max_grad_norm", math.nan)) for r in dp_rows})
    fig.suptitle(f"Leakage under DP-SGD ({', '.join(data)}; max grad norm {', '.join(f'{c:g}' for c in clip)})")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
