"""``leak-audit report AUDIT.jsonl -o report.html``: one self-contained HTML page about an audit log.

The page is a single file that loads nothing: inline CSS, no JavaScript, plots drawn with matplotlib's
Agg renderer and embedded as base64 PNG ``data:`` URIs, no fonts, no links to any server. A
Content-Security-Policy ``<meta>`` (``default-src 'none'; img-src data:; style-src 'unsafe-inline'``) makes a
browser refuse anything else, so the page cannot reach the network even if a log held hostile text.
Every string that comes from the log (paths, attack and module names, errors, privacy fields, samples)
is HTML-escaped.

What the page shows, top to bottom:

1. **Run summary**: the log's path, audits (distinct ``(audit, step)`` pairs), records ok / failed /
   skipped, step and epoch range, attacks, tapped module sets, batch sizes, time span and, for DP-SGD
   runs, the privacy parameters and the last ε.
2. **Gate**: with a policy (:class:`leak_audit.gate.policy.GatePolicy`, the one ``leak-audit gate`` applies),
   its verdict, PASS / WARN / BREACH, and one row per rule (value, thresholds, status, message, where).
   Without one, "no policy given". In both cases the worst value of each metric over the successful
   records, and where it was reached.
3. **Plots** (each skipped with a one-line note when it has no data):
   (a) leakage against the optimizer step, one line per attack, one panel per headline metric present
   (``rouge1``, ``token_recall``, ``exact_match`` for text; ``psnr``, ``ssim`` for images; other metrics
   only when none of these is present); (b) the same, worst over attacks, one line per tapped module set,
   when the log has more than one; (c) worst leakage against ε for records whose ``privacy.epsilon`` is a
   number (DP-SGD runs); (d) attack seconds per audited step, per attack and in total.
4. **Audits**: one table row per record (step, audit, attack, status, every metric, ε under DP, seconds,
   error).
5. **Privacy**: reconstructed text and images (``record.samples``) are the private data the attacks
   recovered. They are **never** on the page unless ``include_samples=True`` (``--include-samples``); the
   page says which. With it, text samples are shown as escaped text, and image samples (``.npz`` files
   next to the log) as originals above reconstructions. Record ``info`` dicts are never shown.

The report never judges: a breach of the policy is shown, but ``leak-audit report`` still exits 0 when
the page was written (``leak-audit gate`` is the command whose exit code fails a release). It exits 2 on
bad input: a missing or malformed log, a bad policy or threshold, an unwritable output.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from leak_audit.gate.thresholds import policy_from_args
from leak_audit.gate.policy import GateError, GatePolicy
from leak_audit.results.records import PICK, AuditLogError, AuditRecord, read_audit_log, worst_values

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "HEADLINE_METRICS",
    "ReportError",
    "add_report_arguments",
    "policy_from_args",
    "render_report",
    "report_command",
    "write_report",
]

HEADLINE_METRICS: tuple[str, ...] = ("rouge1", "token_recall", "exact_match", "psnr", "ssim")
"""The metrics plotted when present: text (ROUGE-1, token recall, exact sequences), then images (PSNR, SSIM)."""

_METRIC_ORDER: tuple[str, ...] = (
    "rouge1", "rouge2", "rougeL", "token_precision", "token_recall", "exact_match", "position_recall",
    "psnr", "ssim", "label_accuracy",
)
_LABELS: dict[str, str] = {
    "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "token_precision": "token precision",
    "token_recall": "token recall", "exact_match": "exact match", "position_recall": "position recall",
    "psnr": "PSNR (dB)", "ssim": "SSIM", "label_accuracy": "label accuracy",
}
_VERDICTS: dict[str, tuple[str, str]] = {"pass": ("PASS", "pass"), "warn": ("WARN", "warn"), "fail": ("BREACH", "fail")}
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_MAX_SAMPLE_IMAGES = 8

EXIT_WRITTEN, EXIT_BAD_INPUT = 0, 2


class ReportError(ValueError):
    """Bad report input: a bad policy or threshold, or an output that cannot be written."""


# --------------------------------------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    """``html.escape(str(value))``, quotes included: every string from the log goes through here."""
    return html.escape(str(value), quote=True)


def _label(metric: str) -> str:
    return _LABELS.get(metric, metric)


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if metric == "psnr":
        return f"{value:.2f}"
    return f"{value:.3f}" if metric in _METRIC_ORDER else f"{value:.4g}"


def _fmt_num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _module_set(record: AuditRecord) -> str:
    """The record's tapped modules joined with ", " (``""``, the whole model, reads "(whole model)")."""
    return ", ".join(m if m else "(whole model)" for m in record.modules) or "(whole model)"


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _ordered_metrics(names: Iterable[str]) -> list[str]:
    present = set(names)
    return [m for m in _METRIC_ORDER if m in present] + sorted(present - set(_METRIC_ORDER))


def _epsilon(record: AuditRecord) -> float | None:
    """``privacy.epsilon`` when it is a finite number, else ``None``."""
    eps = (record.privacy or {}).get("epsilon")
    if isinstance(eps, int | float) and not isinstance(eps, bool) and math.isfinite(eps):
        return float(eps)
    return None


def _parse_time(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


# ----------------------------------------------------------------------------------------------- plots


def _new_figure(panels: int, height: float = 3.3) -> tuple[Figure, list[Axes]]:
    """A matplotlib figure with ``panels`` side-by-side axes (no pyplot: the global backend is untouched)."""
    from matplotlib.figure import Figure

    width = min(4.3 * panels, 13.0) if panels > 1 else 6.5
    fig = Figure(figsize=(max(width, 6.5), height), dpi=100, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _png(fig: Figure) -> str:
    """The figure as a base64 PNG ``<img>`` (no ``Software`` text chunk: the page holds no URL at all)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _style_metric_axis(ax: Axes, metric: str) -> None:
    ax.set_ylabel(_label(metric))
    if metric != "psnr":
        ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)


def _colors(keys: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {k: cmap(i % 10) for i, k in enumerate(keys)}


def _plot_metrics(records: Sequence[AuditRecord]) -> list[str]:
    """The metrics to plot: the headline metrics present in ``ok`` records, else every metric present."""
    present = {m for r in records if r.status == "ok" for m in r.metrics}
    headline = [m for m in HEADLINE_METRICS if m in present]
    return headline or _ordered_metrics(present)


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
    fig, axes = _new_figure(len(metrics))
    colors = _colors(keys)
    by_audit: dict[tuple[int, int], set[str]] = defaultdict(set)
    for r in records:
        by_audit[(r.audit, r.step)].add(r.status)
    skipped = sorted({step for (_, step), st in by_audit.items() if st == {"skipped"}})
    failed = sorted({r.step for r in records if r.status == "failed"})
    timeout = sorted({r.step for r in records if r.status == "timeout"})
    for ax, metric in zip(axes, metrics, strict=True):
        series = _series(records, key, lambda r: float(r.step), metric)
        for k in keys:
            if k in series:
                xs, ys = zip(*series[k], strict=True)
                ax.plot(xs, ys, "-o", ms=4, color=colors[k], label=_short(k), alpha=0.9)
        for steps, color, label in ((skipped, "0.55", "audit skipped"), (failed, "#c62828", "an attack failed"),
                                    (timeout, "#ef6c00", "an attack timed out")):
            for i, step in enumerate(steps):
                ax.axvline(step, color=color, ls=":", lw=1.2, alpha=0.7, label=label if i == 0 else None)
        ax.set_title(_label(metric))
        ax.set_xlabel("optimizer step")
        _style_metric_axis(ax, metric)
        if series:
            ax.legend(fontsize=8, title=legend_title, title_fontsize=8)
        else:
            ax.text(0.5, 0.5, "no record reports it", ha="center", va="center", transform=ax.transAxes, color="0.4")
    return _png(fig)


def _plot_epsilon(records: Sequence[AuditRecord], metrics: Sequence[str], sets: Sequence[str]) -> str:
    fig, axes = _new_figure(len(metrics))
    colors = _colors(sets)
    all_eps = [e for r in records if (e := _epsilon(r)) is not None]
    log_x = bool(all_eps) and min(all_eps) > 0 and max(all_eps) / min(all_eps) > 20
    for ax, metric in zip(axes, metrics, strict=True):
        series = _series(records, _module_set, _epsilon, metric)
        for k in sets:
            if k in series:
                xs, ys = zip(*series[k], strict=True)
                ax.plot(xs, ys, "-o", ms=4, color=colors[k], label=_short(k), alpha=0.9)
        ax.set_title(f"{_label(metric)} vs ε")
        deltas = {(r.privacy or {}).get("delta") for r in records if _epsilon(r) is not None}
        delta = next(iter(deltas)) if len(deltas) == 1 else None
        ax.set_xlabel("ε spent so far" + (f" (δ = {delta:.3g})" if isinstance(delta, int | float) else ""))
        if log_x:
            ax.set_xscale("log")
        _style_metric_axis(ax, metric)
        if len(series) > 1:
            ax.legend(fontsize=8, title="modules", title_fontsize=8)
        if not series:
            ax.text(0.5, 0.5, "no DP record reports it", ha="center", va="center", transform=ax.transAxes, color="0.4")
    return _png(fig)


def _plot_seconds(records: Sequence[AuditRecord], attacks: Sequence[str]) -> str:
    fig, axes = _new_figure(1)
    ax = axes[0]
    colors = _colors(attacks)
    ran = [r for r in records if r.status != "skipped"]
    per: dict[str, dict[int, float]] = defaultdict(dict)
    total: dict[tuple[int, int], float] = defaultdict(float)
    for r in ran:
        per[r.attack][r.step] = max(per[r.attack].get(r.step, 0.0), float(r.seconds))
        total[(r.audit, r.step)] += float(r.seconds)
    for a in attacks:
        if a in per:
            xs, ys = zip(*sorted(per[a].items()), strict=True)
            ax.plot(xs, ys, "-o", ms=4, color=colors[a], label=a, alpha=0.9)
    if len(per) > 1:
        by_step: dict[int, float] = {}
        for (_, step), s in total.items():
            by_step[step] = max(by_step.get(step, 0.0), s)
        xs, ys = zip(*sorted(by_step.items()), strict=True)
        ax.plot(xs, ys, "--", color="0.2", label="audit total", alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("seconds")
    ax.set_title("attack time per audit (background worker)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="attack", title_fontsize=8)
    return _png(fig)


def _figure(plot_id: str, title: str, body: str, caption: str) -> str:
    return (f'<figure class="plot" data-plot="{plot_id}"><h3>{_e(title)}</h3>{body}'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _note(plot_id: str, title: str, text: str) -> str:
    return f'<p class="note" data-plot-note="{plot_id}"><b>{_e(title)}:</b> {_e(text)}</p>'


def _plots(records: Sequence[AuditRecord], attacks: Sequence[str], sets: Sequence[str]) -> str:
    ok = [r for r in records if r.status == "ok" and r.metrics]
    metrics = _plot_metrics(records)
    parts = []
    title = "(a) leakage over steps, per attack"
    if ok:
        kind = "headline metrics" if set(metrics) <= set(HEADLINE_METRICS) else "metrics (no headline metric)"
        parts.append(_figure("leakage-by-attack", title, _plot_by(records, metrics, lambda r: r.attack, attacks, "attack"),
                             f"Each point: an attack's value at an audited step ({kind}; the largest when several "
                             "records share the step). Dotted lines, if any: audits skipped entirely (grey), steps where an "
                             "attack failed (red) or ran out of time (orange; missing evidence, no point)."))
    else:
        parts.append(_note("leakage-by-attack", title, "no successful audit with metrics, nothing to plot."))
    title = "(b) leakage over steps, per tapped module set"
    if ok and len(sets) > 1:
        parts.append(_figure("leakage-by-modules", title, _plot_by(records, metrics, _module_set, sets, "modules"),
                             "Each point: the worst value over attacks at an audited step, per set of tapped modules."))
    else:
        why = (f"every record taps the same modules: {sets[0]}; plot (a) shows them." if len(sets) == 1
               else "the log holds no record.")
        parts.append(_note("leakage-by-modules", title, why))
    title = "(c) worst leakage vs ε (DP-SGD)"
    dp_ok = [r for r in ok if _epsilon(r) is not None]
    if dp_ok:
        dp_metrics = [m for m in metrics if any(m in r.metrics for r in dp_ok)] or _plot_metrics(dp_ok)
        parts.append(_figure("leakage-vs-epsilon", title, _plot_epsilon(dp_ok, dp_metrics, sets),
                             "Each point: the worst value over attacks at one ε (privacy.epsilon of the records, "
                             "from the run's accountant). More privacy to the left."))
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
                             "sum per audit. Training does not wait for them."))
    else:
        parts.append(_note("seconds", title, "no audit ran (every record is skipped)."))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- sections


def _summary(records: Sequence[AuditRecord], source: str | None, attacks: Sequence[str], sets: Sequence[str]) -> str:
    status = Counter(r.status for r in records)
    audits = {(r.audit, r.step) for r in records}
    ran = {(r.audit, r.step) for r in records if r.status != "skipped"}
    rows: list[tuple[str, str]] = [("audit log", _e(source) if source else "–")]
    rows.append(("audits", f"{len(audits)} ({len(ran)} ran, {len(audits) - len(ran)} skipped entirely)"))
    rows.append(("records", f"{len(records)}: <span class=\"s-ok\">{status['ok']} ok</span>, "
                 f"<span class=\"{'s-timeout' if status['timeout'] else 's-zero'}\">{status['timeout']} timed out</span>, "
                 f"<span class=\"{'s-failed' if status['failed'] else 's-zero'}\">{status['failed']} failed</span>, "
                 f"<span class=\"s-skipped\">{status['skipped']} skipped</span>"))
    if records:
        steps = [r.step for r in records]
        epochs = [r.epoch for r in records]
        epoch_text = f"epoch {min(epochs)}" if min(epochs) == max(epochs) else f"epochs {min(epochs)}–{max(epochs)}"
        rows.append(("steps", f"{min(steps)}–{max(steps)} ({epoch_text})"))
    counts = Counter(r.attack for r in records)
    rows.append(("attacks", ", ".join(f"{_e(a)} ({counts[a]})" for a in attacks) or "–"))
    rows.append(("tapped modules", "<br>".join(_e(s) for s in sets) or "–"))
    sizes = sorted({r.batch_size for r in records if r.batch_size})
    if sizes:
        rows.append(("batch size", ", ".join(str(b) for b in sizes)))
    times = sorted(t for r in records if (t := _parse_time(r.time)) is not None)
    if times:
        span = (times[-1] - times[0]).total_seconds()
        fmt = "%Y-%m-%d %H:%M:%S UTC"
        rows.append(("time span", f"{times[0].strftime(fmt)} → {times[-1].strftime(fmt)} ({_duration(span)})"))
    dp = [r for r in records if r.privacy]
    if dp:
        last = max(dp, key=lambda r: (r.step, r.audit))
        p = last.privacy or {}
        eps = _epsilon(last)
        eps_text = f"{eps:.4g}" if eps is not None else "∞ / not computed" + (f" ({_e(p.get('error'))})" if p.get("error") else "")
        fields = [f"ε = {eps_text} at step {last.step}"]
        fields += [f"{label} = {_e(_fmt_num(p[k]))}" for k, label in (
            ("delta", "δ"), ("noise_multiplier", "σ"), ("max_grad_norm", "C"), ("sample_rate", "q"),
            ("accountant", "accountant"), ("epsilon_accountant", "ε from")) if p.get(k) is not None]
        rows.append(("DP-SGD", ", ".join(fields)))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<section id="summary"><h2>Run summary</h2><table class="kv">{body}</table></section>'


def _worst_table(records: Sequence[AuditRecord]) -> str:
    worst = worst_values(records)
    if not worst:
        return '<p class="note">No successful audit: no worst values.</p>'
    picked = worst_values(r for r in records if r.info.get(PICK))
    rows = "".join(
        f"<tr><td>{_e(m)}</td><td class=\"num\">{_fmt(m, worst[m][0])}</td><td>{_e(worst[m][1])}</td>"
        f"<td class=\"num\">{_fmt(m, picked[m][0]) if m in picked else '–'}</td>"
        f"<td>{_e(picked[m][1]) if m in picked else ''}</td></tr>"
        for m in _ordered_metrics(worst)
    )
    timeouts = sum(r.status == "timeout" for r in records)
    missing = (f" {timeouts} timed-out attack record(s) are missing evidence and count in neither column."
               if timeouts else "")
    return ("<h3>Worst value per metric</h3><table class=\"grid\"><thead><tr><th>metric</th>"
            "<th>worst (oracle)</th><th>where</th><th>worst (attacker's pick)</th><th>where</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
            '<p class="note"><b>Oracle:</b> the largest value over successful records of every attack and step, '
            "each scored against the real batch (every metric grows with leakage): the worst case over the "
            "attack portfolio, which no single attacker without the answer achieves. <b>Attacker's pick:</b> per "
            "audit, the one reconstruction an attacker keeps from its own evidence, the smallest gradient "
            f"residual; '–' where no record of the log has one.{_e(missing)}</p>")


def _gate(records: Sequence[AuditRecord], policy: GatePolicy | None) -> tuple[str, str | None]:
    """The gate section and the verdict word (``None`` without a policy or without a verdict)."""
    head = '<section id="gate"><h2>Gate</h2>'
    if policy is None:
        banner = ('<div class="verdict v-none" data-verdict="none">no policy given</div>'
                  '<p class="note">Pass <code>--policy FILE.toml</code> or <code>--max METRIC=VALUE</code> '
                  "for a verdict (the same policy as <code>leak-audit gate</code>).</p>")
        return head + banner + _worst_table(records) + "</section>", None
    try:
        report = policy.evaluate(records)
    except GateError as exc:
        banner = (f'<div class="verdict v-none" data-verdict="error">no verdict</div>'
                  f'<p class="note">The policy cannot be evaluated on this log: {_e(exc)}</p>')
        return head + banner + _worst_table(records) + "</section>", None
    word, css = _VERDICTS.get(str(report.verdict), (str(report.verdict).upper(), "none"))
    rows = []
    for res in report.results:
        rule = res.rule
        status = str(res.status)
        value_text = res.value_text  # as precise as the comparison with the limit needs
        agg = rule.aggregation_text
        rows.append(
            f'<tr class="r-{_e(status)}"><td>{_e(rule.name)}</td><td>{_e(rule.metric)}</td>'
            f"<td>{_e(agg)}</td><td class=\"num\">{value_text}</td>"
            f"<td>{_e(rule.limit_text)}</td><td class=\"status\">{_e(status)}</td>"
            f"<td>{_e(res.message or '')}</td><td>{_e(res.where or '')}</td></tr>"
        )
    table = ("<table class=\"grid wide\"><thead><tr><th>rule</th><th>metric</th><th>aggregation</th><th>value</th>"
             "<th>threshold</th><th>status</th><th>message</th><th>where</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    banner = f'<div class="verdict v-{css}" data-verdict="{_e(report.verdict)}">{_e(word)}</div>'
    note = ('<p class="note">The verdict is shown, not enforced: <code>leak-audit report</code> exits 0 '
            "whenever the page is written; <code>leak-audit gate</code> fails a release.</p>")
    return head + banner + note + table + _worst_table(records) + "</section>", word


def _sorted(records: Sequence[AuditRecord], attacks: Sequence[str]) -> list[AuditRecord]:
    order = {a: i for i, a in enumerate(attacks)}
    return sorted(records, key=lambda r: (r.step, r.audit, order.get(r.attack, 0)))


def _audit_table(records: Sequence[AuditRecord], attacks: Sequence[str], sets: Sequence[str]) -> str:
    if not records:
        return '<section id="audits"><h2>Audits</h2><p class="note">The log holds no record.</p></section>'
    metrics = _ordered_metrics({*(m for r in records for m in r.metrics),
                                *(k[len("partial_"):] for r in records if r.status == "timeout"
                                  for k in r.info if k.startswith("partial_"))})
    with_eps = any(r.privacy for r in records)
    with_modules = len(sets) > 1
    with_rank = any("process_rank" in r.info for r in records)
    head = ["step", "audit", "attack", "status", "pick"] + (["rank"] if with_rank else []) + (
        ["modules"] if with_modules else []) + [_label(m) for m in metrics] + (["ε"] if with_eps else []) + [
        "seconds", "error"]
    body = []
    for r in _sorted(records, attacks):
        cells = [f'<td class="num">{r.step}</td>', f'<td class="num">{_e(r.audit)}</td>', f"<td>{_e(r.attack)}</td>",
                 f'<td class="status">{_e(r.status)}</td>',
                 f'<td>{"attacker" if r.info.get(PICK) else ""}</td>']
        if with_rank:
            cells.append(f'<td class="num">{_e(r.info.get("process_rank", ""))}</td>')
        if with_modules:
            cells.append(f"<td>{_e(_module_set(r))}</td>")
        cells += [f'<td class="num">{_metric_cell(r, m)}</td>' for m in metrics]
        if with_eps:
            eps = _epsilon(r)
            cells.append(f'<td class="num">{f"{eps:.4g}" if eps is not None else ("∞" if r.privacy else "")}</td>')
        cells.append(f'<td class="num">{r.seconds:.2f}</td>')
        cells.append(f'<td class="error">{_e(r.error) if r.error else ""}</td>')
        body.append(f'<tr class="r-{_e(r.status)}">{"".join(cells)}</tr>')
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return (f'<section id="audits"><h2>Audits</h2><table class="grid wide audits"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></section>")


def _metric_cell(r: AuditRecord, metric: str) -> str:
    """The record's value, or for a timed-out attack its partial value as a lower bound (``≥ x``)."""
    if metric in r.metrics:
        return _fmt(metric, r.metrics[metric])
    partial = r.info.get(f"partial_{metric}") if r.status == "timeout" else None
    if isinstance(partial, int | float) and not isinstance(partial, bool) and math.isfinite(partial):
        return f'<span class="partial" title="partial result of a timed-out attack">≥ {_fmt(metric, partial)}</span>'
    return ""


def _image_grid(path: Path) -> str:
    """Originals (top) above reconstructions (bottom) from a samples ``.npz``, as a base64 PNG."""
    import numpy as np

    with np.load(path) as data:
        originals = np.asarray(data["originals"])[:_MAX_SAMPLE_IMAGES]
        recons = np.asarray(data["reconstructions"])[:_MAX_SAMPLE_IMAGES]
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
    return _png(fig)


def _samples_section(records: Sequence[AuditRecord], include_samples: bool, base: Path | None,
                     attacks: Sequence[str]) -> str:
    with_samples = [r for r in records if r.samples]
    head = '<section id="privacy"><h2>Privacy</h2>'
    if not include_samples:
        if with_samples:
            text = (f"{len(with_samples)} record(s) carry reconstructed samples (<code>log_samples=True</code>). "
                    "They are the private data the attacks recovered and are <b>not included</b> in this page; "
                    "<code>--include-samples</code> (<code>include_samples=True</code>) embeds them.")
        else:
            text = ("Reconstructed samples are not included in this page (the log holds none: the run used "
                    "<code>log_samples=False</code>). Only scores, timings and errors are shown.")
        return head + f'<p class="privacy" data-samples="excluded">{text}</p></section>'
    if not with_samples:
        return head + ('<p class="privacy" data-samples="none">Samples were requested, but no record carries '
                       "any (the run used <code>log_samples=False</code>).</p></section>")
    parts = [head, '<p class="privacy warn-box" data-samples="included"><b>This page contains reconstructed '
             "samples: private data.</b> Share it as you would the training data.</p>"]
    for r in _sorted(with_samples, attacks):
        parts.append(f"<h3>step {_e(r.step)} · audit {_e(r.audit)} · {_e(r.attack)}</h3>")
        for sample in r.samples or []:
            file = sample.get("file") if isinstance(sample, Mapping) else None
            if isinstance(file, str):
                path = (base / file) if base is not None else Path(file)
                try:
                    parts.append(f'<div class="sample-images">{_image_grid(path)}</div>')
                except (OSError, KeyError, ValueError) as exc:
                    parts.append(f'<p class="note">{_e(file)}: cannot show ({_e(exc)}).</p>')
                continue
            if isinstance(sample, Mapping):
                rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in sample.items())
                parts.append(f'<table class="kv sample">{rows}</table>')
            else:
                parts.append(f'<pre class="sample">{_e(sample)}</pre>')
    return "\n".join(parts) + "</section>"


_CSS = """
:root { --ok:#1a7f37; --fail:#c62828; --warn:#b26a00; --muted:#5f6368; --line:#d0d7de; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0 auto; max-width: 1240px; padding: 20px 24px 40px; color: #1f2328; background: #fff;
       font-size: 14px; line-height: 1.45; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 28px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
code { background: #f3f4f6; padding: 0 3px; border-radius: 3px; font-size: 12.5px; }
.sub, .note, figcaption { color: var(--muted); font-size: 12.5px; }
table { border-collapse: collapse; }
table.kv th { text-align: left; padding: 3px 16px 3px 0; vertical-align: top; white-space: nowrap; font-weight: 600; }
table.kv td { padding: 3px 0; word-break: break-word; }
table.grid { font-size: 12.5px; min-width: 50%; }
table.grid.wide { width: 100%; }
table.grid th, table.grid td { border: 1px solid var(--line); padding: 3px 6px; text-align: left; vertical-align: top; }
table.grid thead th { background: #f6f8fa; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.error { color: var(--fail); word-break: break-word; min-width: 240px; max-width: 420px; }
tr.r-failed td.status, tr.r-fail td.status, .s-failed { color: var(--fail); font-weight: 600; }
tr.r-skipped td, .s-skipped { color: var(--muted); }
tr.r-timeout td.status, .s-timeout { color: #ef6c00; font-weight: 600; }
.partial { color: var(--muted); font-style: italic; }
tr.r-ok td.status, tr.r-pass td.status, .s-ok { color: var(--ok); font-weight: 600; }
tr.r-warn td.status { color: var(--warn); font-weight: 600; }
tr.r-fail { background: #fdecea; }
tr.r-warn { background: #fff6e0; }
.verdict { display: inline-block; font-size: 30px; font-weight: 800; letter-spacing: 2px; color: #fff;
           padding: 8px 28px; border-radius: 8px; margin: 4px 0 8px; }
.v-pass { background: var(--ok); } .v-warn { background: var(--warn); } .v-fail { background: var(--fail); }
.v-none { background: #8b949e; font-size: 20px; letter-spacing: 0; }
figure.plot { margin: 10px 0 22px; }
figure.plot img, .sample-images img { max-width: 100%; height: auto; display: block; }
.privacy { background: #f6f8fa; border-left: 4px solid #8b949e; padding: 8px 12px; }
.warn-box { border-left-color: var(--fail); background: #fdecea; }
table.sample { margin-bottom: 8px; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 8px; }
"""


def _render(
    records: Sequence[AuditRecord], title: str, policy: GatePolicy | None, include_samples: bool,
    source: str | Path | None,
) -> tuple[str, str | None]:
    """The page and the verdict word (``PASS``/``WARN``/``BREACH``; ``None`` without a verdict)."""
    records = list(records)
    attacks = list(dict.fromkeys(r.attack for r in _sorted(records, [])))
    sets = list(dict.fromkeys(_module_set(r) for r in _sorted(records, [])))
    source_text = str(source) if source is not None else None
    base = Path(source).parent if source is not None else None
    gate_html, verdict = _gate(records, policy)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f'<header><h1>{_e(title)}</h1><p class="sub">Gradient-leakage audit report, generated {generated} by '
        "<code>leak-audit report</code>. Self-contained: no script, nothing loaded from anywhere.</p></header>",
        _summary(records, source_text, attacks, sets),
        gate_html,
        '<section id="plots"><h2>Leakage</h2>',
        _plots(records, attacks, sets),
        "</section>",
        _audit_table(records, attacks, sets),
        _samples_section(records, include_samples, base, attacks),
        "<footer>Every metric grows with leakage (higher: the attacker rebuilt more of the batch). "
        "Record <code>info</code> fields are not shown.</footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n", verdict


def render_report(
    records: Sequence[AuditRecord],
    *,
    title: str = "leak-audit report",
    policy: GatePolicy | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    include_samples: bool = False,
    source: str | Path | None = None,
) -> str:
    """The report page for ``records`` as one self-contained HTML document.

    Args:
        records: the audit log's records (:func:`leak_audit.results.records.read_audit_log`), in any order.
        title: the page title and heading (escaped).
        policy: a :class:`leak_audit.gate.policy.GatePolicy` to evaluate, or anything
            :meth:`GatePolicy.coerce <leak_audit.gate.policy.GatePolicy.coerce>` accepts (a TOML path, a
            mapping); ``None``: "no policy given" and the worst value per metric.
        include_samples: embed the records' ``samples`` (reconstructed text, and images read from the
            ``.npz`` files they name, relative to ``source``'s folder). Off by default: they are the
            private data the attacks recovered; the page says whether they are included.
        source: the log's path, shown in the summary and used to find image sample files.

    Returns:
        The HTML text. It references no external resource (no URL at all, no script); its plots are
        base64 PNGs. What is plotted and what is never included: see :mod:`leak_audit.cli.report`.

    Raises:
        leak_audit.gate.policy.PolicyError: ``policy`` is not a valid policy. A log the policy cannot be
            evaluated on (no successful audit) is not an error: the page says "no verdict" and why.
    """
    return _render(records, title, GatePolicy.coerce(policy), include_samples, source)[0]


def write_report(
    path_in: str | Path,
    path_out: str | Path,
    *,
    title: str | None = None,
    policy: GatePolicy | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    include_samples: bool = False,
) -> Path:
    """Read the audit log ``path_in`` and write its report page to ``path_out`` (parents created).

    Args:
        title: default ``"leak-audit report: <log path>"``.
        policy, include_samples: as in :func:`render_report`.

    Returns:
        ``path_out`` as a :class:`~pathlib.Path`.

    Raises:
        leak_audit.results.records.AuditLogError: the log is missing or malformed.
        leak_audit.gate.policy.PolicyError: a bad policy.
        ReportError: the page cannot be written.
    """
    return _write(path_in, path_out, title, GatePolicy.coerce(policy), include_samples)[0]


def _write(path_in: str | Path, path_out: str | Path, title: str | None, policy: GatePolicy | None,
           include_samples: bool) -> tuple[Path, int, str | None]:
    """Read, render, write: ``(path_out, number of records, verdict word or None)``."""
    records = read_audit_log(path_in)
    page, verdict = _render(records, title or f"leak-audit report: {path_in}", policy, include_samples, path_in)
    out = Path(path_out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out, len(records), verdict


# ------------------------------------------------------------------------------------------------- CLI


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``leak-audit report`` arguments to ``parser``."""
    parser.add_argument("audit_log", help="path to audit.jsonl")
    parser.add_argument("-o", "--output", default=None, metavar="OUT.html",
                        help="the page to write (default: report.html next to the log)")
    parser.add_argument("--title", default=None, help="page title (default: 'leak-audit report: <log>')")
    parser.add_argument("--policy", default=None, metavar="FILE.toml",
                        help="leakage policy to evaluate and show, as for 'leak-audit gate --policy'")
    parser.add_argument("--max", action="append", default=[], metavar="METRIC=VALUE",
                        help="maximum allowed worst-case value, e.g. rouge1=0.5 (repeatable; added to --policy's "
                        "rules, as for 'leak-audit gate')")
    parser.add_argument("--include-samples", action="store_true",
                        help="embed the reconstructed text/images the log holds (log_samples=True): private data!")


def report_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``leak-audit report`` from parsed arguments.

    Returns:
        0 when the page was written, whatever the verdict: a breach is shown, not enforced (that is
        ``leak-audit gate``'s exit code). 2 on bad input (missing or malformed log, bad policy or
        threshold, unwritable output), with ``leak-audit report: error: ...`` on stderr.
    """
    out = Path(args.output) if args.output else Path(args.audit_log).parent / "report.html"
    try:
        policy = policy_from_args(args.policy, args.max)
        path, n, verdict = _write(args.audit_log, out, args.title, policy, args.include_samples)
    except (AuditLogError, GateError, ReportError) as exc:
        print(f"leak-audit report: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if policy is None:
        said = "no policy given"
    elif verdict is None:
        said = "no verdict: the log has no successful audit"
    else:
        said = f"verdict {verdict} (shown, not enforced: use leak-audit gate to fail a release)"
    samples = "samples included" if args.include_samples else "no samples"
    console.print(f"wrote {path} ({n} records; {said}; {samples})", markup=False, highlight=False, soft_wrap=True)
    return EXIT_WRITTEN
