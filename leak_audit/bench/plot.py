"""Leakage against DP noise: the PNG that ``leak-audit bench text --dp-noise ... --plot OUT.png`` writes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_noise_curves"]


def plot_noise_curves(rows: Sequence[Mapping[str, Any]], path: str | Path, attack: str = "best") -> Path:
    """Plot ROUGE-1 and token recall against σ (top) and against ε (bottom), one line per (view, B).

    Args:
        rows: benchmark rows with ``noise_multiplier`` and ``epsilon`` (``None`` for ε = ∞ at σ = 0).
        path: PNG to write (parent directories are created).
        attack: which rows to draw (default ``best``; falls back to every attack when none is called so).

    Returns:
        The written path. σ = 0 sits at the left edge of the σ axis (symlog scale); rows with ε = ∞ are
        left out of the ε plots, whose x axis is logarithmic.

    Raises:
        ValueError: no row carries ``noise_multiplier``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp_rows = [r for r in rows if "noise_multiplier" in r]
    if not dp_rows:
        raise ValueError("no row has a noise_multiplier: run the benchmark with --dp-noise")
    chosen = [r for r in dp_rows if r["attack"] == attack] or dp_rows
    series: dict[tuple[str, str, int], list[Mapping[str, Any]]] = {}
    for r in chosen:
        series.setdefault((str(r["attack"]), str(r["view"]), int(r["batch_size"])), []).append(r)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    metrics = (("rouge1", "ROUGE-1"), ("token_recall", "token recall"))
    for col, (key, label) in enumerate(metrics):
        for (name, view, b), pts in sorted(series.items()):
            pts = sorted(pts, key=lambda r: float(r["noise_multiplier"]))
            short = view if len(view) <= 40 else "…" + view[-39:]
            tag = f"{short}, B={b}" + ("" if name == attack else f" ({name})")
            xs = [float(r["noise_multiplier"]) for r in pts]
            ys = [float(r[key]) if r.get(key) is not None else math.nan for r in pts]
            axes[0][col].plot(xs, ys, marker="o", label=tag)
            finite = [(float(r["epsilon"]), y) for r, y in zip(pts, ys, strict=True) if r.get("epsilon") is not None]
            if finite:
                axes[1][col].plot(*zip(*finite, strict=True), marker="o", label=tag)
        top, bottom = axes[0][col], axes[1][col]
        top.set_xscale("symlog", linthresh=0.01)
        top.set_xlabel("noise multiplier σ")
        bottom.set_xscale("log")
        bottom.set_xlabel("ε at δ = 1e-5, one epoch")
        for ax in (top, bottom):
            ax.set_ylabel(label)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(True, alpha=0.3)
        bottom.invert_xaxis()  # more privacy to the right, as on the σ axis
    axes[0][0].legend(fontsize=8)
    data = sorted({str(r["data"]) for r in chosen})
    clip = sorted({float(r.get("max_grad_norm", math.nan)) for r in chosen})
    fig.suptitle(f"Leakage under DP-SGD ({', '.join(data)}; max grad norm {', '.join(f'{c:g}' for c in clip)})")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
