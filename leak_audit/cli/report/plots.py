"""The report's plots: matplotlib's Agg renderer (never pyplot), embedded as base64 PNG ``<img>`` tags."""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leak_audit.cli.report.format import (
    HEADLINE_METRICS,
    escape,
    finite_epsilon,
    metric_label,
    module_set,
    ordered_metrics,
    shorten,
)
from leak_audit.results.records import AuditRecord

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["MAX_SAMPLE_IMAGES", "image_grid", "new_figure", "plots_section", "png_image"]

MAX_SAMPLE_IMAGES = 8
"""Image samples shown per record (the first ones of its ``.npz``)."""


def new_figure(panels: int, height: float = 3.3) -> tuple[Figure, list[Axes]]:
    """A matplotlib figure with ``panels`` side-by-side axes (no pyplot: the global backend is untouched)."""
    from matplotlib.figure import Figure

    width = min(4.3 * panels, 13.0) if panels > 1 else 6.5
    fig = Figure(figsize=(max(width, 6.5), height), dpi=100, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def png_image(fig: Figure) -> str:
    """The figure as a base64 PNG ``<img>`` (no ``Software`` text chunk: the page holds no URL at all)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _style_metric_axis(ax: Axes, metric: str) -> None:
    ax.set_ylabel(metric_label(metric))
    if metric != "psnr":
        ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)


def _colors(keys: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {k: cmap(i % 10) for i, k in enumerate(keys)}


def _run_styles(records: Iterable[AuditRecord]) -> dict[str, tuple[str, str]]:
    """Per training run of ``records`` (log order): its legend suffix and line style; one run: none and solid."""
    runs = list(dict.fromkeys(r.run for r in records))
    if len(runs) < 2:
        return {run: ("", "-") for run in runs}
    return {run: (f" · run {i + 1}", ("-", "--", ":", "-.")[i % 4]) for i, run in enumerate(runs)}


def _runs_caption(records: Iterable[AuditRecord]) -> str:
    """``" Runs (line styles): 1 = <id>, 2 = <id>."`` for a log of several runs, else ``""``."""
    runs = list(dict.fromkeys(r.run for r in records))
    if len(runs) < 2:
        return ""
    return " Runs (line styles): " + ", ".join(f"{i + 1} = {run or 'unnamed'}" for i, run in enumerate(runs)) + "."


def _plot_metrics(records: Sequence[AuditRecord]) -> list[str]:
    """The metrics to plot: the headline metrics present in ``ok`` records, else every metric present."""
    present = {m for r in records if r.status == "ok" for m in r.metrics}
    headline = [m for m in HEADLINE_METRICS if m in present]
    return headline or ordered_metrics(present)


def _series(
    records: Iterable[AuditRecord], key: Callable[[AuditRecord], Any], x: Callable[[AuditRecord], float | None],
    metric: str,
) -> dict[Any, list[tuple[float, float]]]:
    """Per ``key(record)``: sorted ``(x, worst value of metric)`` points over ``ok`` records (max per x)."""
    points: dict[Any, dict[float, float]] = defaultdict(dict)
    for r in records:
        if r.status != "ok" or metric not in r.metrics:
            continue
        xv = x(r)
        if xv is None:
            continue
        cell = points[key(r)]
        cell[xv] = max(cell.get(xv, -math.inf), float(r.metrics[metric]))
    return {k: sorted(v.items()) for k, v in points.items()}


def _plot_by(records: Sequence[AuditRecord], metrics: Sequence[str], key: Callable[[AuditRecord], str],
             keys: Sequence[str], legend_title: str) -> str:
    fig, axes = new_figure(len(metrics))
    colors = _colors(keys)
    by_audit: dict[tuple[str, int, int], set[str]] = defaultdict(set)  # runs of one log number their audits alike
    for r in records:
        by_audit[(r.run, r.audit, r.step)].add(r.status)
    skipped = sorted({step for (_, _, step), st in by_audit.items() if st == {"skipped"}})
    failed = sorted({r.step for r in records if r.status == "failed"})
    timeout = sorted({r.step for r in records if r.status == "timeout"})
    styles = _run_styles(records)
    for ax, metric in zip(axes, metrics, strict=True):
        series = _series(records, lambda r: (key(r), r.run), lambda r: float(r.step), metric)
        for k in keys:
            for run, (suffix, ls) in styles.items():
                if (k, run) in series:
                    xs, ys = zip(*series[(k, run)], strict=True)
                    ax.plot(xs, ys, marker="o", ls=ls, ms=4, color=colors[k], label=shorten(k) + suffix, alpha=0.9)
        for steps, color, label in ((skipped, "0.55", "audit skipped"), (failed, "#c62828", "an attack failed"),
                                    (timeout, "#ef6c00", "an attack timed out")):
            for i, step in enumerate(steps):
                ax.axvline(step, color=color, ls=":", lw=1.2, alpha=0.7, label=label if i == 0 else None)
        ax.set_title(metric_label(metric))
        ax.set_xlabel("optimizer step")
        _style_metric_axis(ax, metric)
        if series:
            ax.legend(fontsize=8, title=legend_title, title_fontsize=8)
        else:
            ax.text(0.5, 0.5, "no record reports it", ha="center", va="center", transform=ax.transAxes, color="0.4")
    return png_image(fig)


def _plot_epsilon(records: Sequence[AuditRecord], metrics: Sequence[str], sets: Sequence[str]) -> str:
    fig, axes = new_figure(len(metrics))
    colors = _colors(sets)
    all_eps = [e for r in records if (e := finite_epsilon(r)) is not None]
    log_x = bool(all_eps) and min(all_eps) > 0 and max(all_eps) / min(all_eps) > 20
    styles = _run_styles(records)
    for ax, metric in zip(axes, metrics, strict=True):
        series = _series(records, lambda r: (module_set(r), r.run), finite_epsilon, metric)
        for k in sets:
            for run, (suffix, ls) in styles.items():
                if (k, run) in series:
                    xs, ys = zip(*series[(k, run)], strict=True)
                    ax.plot(xs, ys, marker="o", ls=ls, ms=4, color=colors[k], label=shorten(k) + suffix, alpha=0.9)
        ax.set_title(f"{metric_label(metric)} vs ε")
        deltas = {(r.privacy or {}).get("delta") for r in records if finite_epsilon(r) is not None}
        delta = next(iter(deltas)) if len(deltas) == 1 else None
        ax.set_xlabel("ε spent so far" + (f" (δ = {delta:.3g})" if isinstance(delta, int | float) else ""))
        if log_x:
            ax.set_xscale("log")
        _style_metric_axis(ax, metric)
        if len(series) > 1:  # one line per module set and run
            ax.legend(fontsize=8, title="modules", title_fontsize=8)
        if not series:
            ax.text(0.5, 0.5, "no DP record reports it", ha="center", va="center", transform=ax.transAxes, color="0.4")
    return png_image(fig)


def _plot_seconds(records: Sequence[AuditRecord], attacks: Sequence[str]) -> str:
    fig, axes = new_figure(1)
    ax = axes[0]
    colors = _colors(attacks)
    ran = [r for r in records if r.status != "skipped"]
    per: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    total: dict[tuple[str, int, int], float] = defaultdict(float)
    for r in ran:
        cell = per[(r.attack, r.run)]
        cell[r.step] = max(cell.get(r.step, 0.0), float(r.seconds))
        total[(r.run, r.audit, r.step)] += float(r.seconds)
    styles = _run_styles(ran)
    for a in attacks:
        for run, (suffix, ls) in styles.items():
            if (a, run) in per:
                xs, ys = zip(*sorted(per[(a, run)].items()), strict=True)
                ax.plot(xs, ys, marker="o", ls=ls, ms=4, color=colors[a], label=a + suffix, alpha=0.9)
    if len({a for a, _ in per}) > 1:
        for run, (suffix, ls) in styles.items():
            by_step: dict[int, float] = {}
            for (rr, _, step), sec in total.items():
                if rr == run:
                    by_step[step] = max(by_step.get(step, 0.0), sec)
            xs, ys = zip(*sorted(by_step.items()), strict=True)
            ax.plot(xs, ys, ls=ls, lw=2.2, color="0.2", label="audit total" + suffix, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("seconds")
    ax.set_title("attack time per audit (background worker)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="attack", title_fontsize=8)
    return png_image(fig)


def _figure(plot_id: str, title: str, body: str, caption: str) -> str:
    return (f'<figure class="plot" data-plot="{plot_id}"><h3>{escape(title)}</h3>{body}'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _note(plot_id: str, title: str, text: str) -> str:
    return f'<p class="note" data-plot-note="{plot_id}"><b>{escape(title)}:</b> {escape(text)}</p>'


def plots_section(records: Sequence[AuditRecord], attacks: Sequence[str], sets: Sequence[str]) -> str:
    """The four plots (or a one-line note for each that has no data) as HTML figures."""
    ok = [r for r in records if r.status == "ok" and r.metrics]
    metrics = _plot_metrics(records)
    runs = _runs_caption(records)
    parts = []
    title = "(a) leakage over steps, per attack"
    if ok:
        kind = "headline metrics" if set(metrics) <= set(HEADLINE_METRICS) else "metrics (no headline metric)"
        parts.append(_figure("leakage-by-attack", title, _plot_by(records, metrics, lambda r: r.attack, attacks, "attack"),
                             f"Each point: an attack's value at an audited step ({kind}; the largest when several "
                             "records share the step). Dotted lines, if any: audits skipped entirely (grey), steps where an "
                             "attack failed (red) or ran out of time (orange; missing evidence, no point)." + runs))
    else:
        parts.append(_note("leakage-by-attack", title, "no successful audit with metrics, nothing to plot."))
    title = "(b) leakage over steps, per tapped module set"
    if ok and len(sets) > 1:
        parts.append(_figure("leakage-by-modules", title, _plot_by(records, metrics, module_set, sets, "modules"),
                             "Each point: the worst value over attacks at an audited step, per set of tapped modules." + runs))
    else:
        why = (f"every record taps the same modules: {sets[0]}; plot (a) shows them." if len(sets) == 1
               else "the log holds no record.")
        parts.append(_note("leakage-by-modules", title, why))
    title = "(c) worst leakage vs ε (DP-SGD)"
    dp_ok = [r for r in ok if finite_epsilon(r) is not None]
    if dp_ok:
        dp_metrics = [m for m in metrics if any(m in r.metrics for r in dp_ok)] or _plot_metrics(dp_ok)
        parts.append(_figure("leakage-vs-epsilon", title, _plot_epsilon(dp_ok, dp_metrics, sets),
                             "Each point: the worst value over attacks at one ε (privacy.epsilon of the records, "
                             "from the run's accountant). More privacy to the left." + _runs_caption(dp_ok)))
    else:
        dp_any = [r for r in records if r.privacy]
        why = (f"{len(dp_any)} record(s) carry privacy data but no finite ε in a successful audit "
               "(ε infinite or not computed: see privacy.error)." if dp_any
               else "no record carries privacy.epsilon (not a DP-SGD run).")
        parts.append(_note("leakage-vs-epsilon", title, why))
    title = "(d) audit seconds per step"
    if any(r.status != "skipped" for r in records):
        parts.append(_figure("seconds", title, _plot_seconds(records, attacks),
                             "Seconds each attack ran in the background worker (ok and failed records), and their "
                             "sum per audit. Training does not wait for them." + _runs_caption(r for r in records if r.status != "skipped")))
    else:
        parts.append(_note("seconds", title, "no audit ran (every record is skipped)."))
    return "\n".join(parts)


def image_grid(path: Path) -> str:
    """Originals (top) above reconstructions (bottom) from a samples ``.npz``, as a base64 PNG."""
    import numpy as np

    with np.load(path) as data:
        originals = np.asarray(data["originals"])[:MAX_SAMPLE_IMAGES]
        recons = np.asarray(data["reconstructions"])[:MAX_SAMPLE_IMAGES]
    n = len(originals)
    if n == 0:
        raise ValueError("no image in the file")
    from matplotlib.figure import Figure

    from leak_audit.metrics.scoring import display_images

    fig = Figure(figsize=(1.1 * n + 0.4, 2.5), dpi=100, layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for row, images in enumerate(display_images(originals, recons)):
        for i in range(n):
            img = images[i] if i < len(images) else np.zeros_like(images[0])
            ax = axes[row][i]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel("original" if row == 0 else "reconstructed", fontsize=8)
    return png_image(fig)
