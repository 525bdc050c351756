"""The report's HTML sections: run summary, gate, audit table and the privacy (samples) section."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from leak_audit.cli.report.format import (
    duration_text,
    escape,
    finite_epsilon,
    format_metric,
    format_number,
    metric_label,
    module_set,
    ordered_metrics,
    parse_time,
    sort_records,
)
from leak_audit.cli.report.plots import image_grid
from leak_audit.gate.policy import VERDICT_WORDS, GateError, GatePolicy
from leak_audit.results.records import CANARY_RECORD, LOWER_BOUND, PICK, AuditRecord, run_ids, worst_values

__all__ = ["audit_section", "canary_section", "gate_section", "samples_section", "summary_section"]


def summary_section(records: Sequence[AuditRecord], source: str | None, attacks: Sequence[str], sets: Sequence[str]) -> str:
    """The run summary: audits, record statuses, steps, attacks, tapped modules, batch sizes, time span, DP-SGD."""
    status = Counter(r.status for r in records)
    # per run: runs appended to one log number their audits alike; the canaries' closing record is no audit
    audits = {(r.run, r.audit, r.step) for r in records if r.attack != CANARY_RECORD}
    ran = {(r.run, r.audit, r.step) for r in records if r.status != "skipped" and r.attack != CANARY_RECORD}
    rows: list[tuple[str, str]] = [("audit log", escape(source) if source else "–")]
    rows.append(("audits", f"{len(audits)} ({len(ran)} ran, {len(audits) - len(ran)} skipped entirely)"))
    rows.append(("records", f"{len(records)}: <span class=\"s-ok\">{status['ok']} ok</span>, "
                 f"<span class=\"{'s-timeout' if status['timeout'] else 's-zero'}\">{status['timeout']} timed out</span>, "
                 f"<span class=\"{'s-failed' if status['failed'] else 's-zero'}\">{status['failed']} failed</span>, "
                 f"<span class=\"s-skipped\">{status['skipped']} skipped</span>"))
    runs = run_ids(records)

    def per_run(label: str, run: str) -> str:  # one row per run: runs appended to one log restart steps
        return label + (f", run {escape(run or 'unnamed')}" if len(runs) > 1 else "")

    for run in runs:
        steps = [r.step for r in records if r.run == run]
        epochs = [r.epoch for r in records if r.run == run]
        epoch_text = f"epoch {min(epochs)}" if min(epochs) == max(epochs) else f"epochs {min(epochs)}–{max(epochs)}"
        rows.append((per_run("steps", run), f"{min(steps)}–{max(steps)} ({epoch_text})"))
    counts = Counter(r.attack for r in records)
    rows.append(("attacks", ", ".join(f"{escape(a)} ({counts[a]})" for a in attacks) or "–"))
    rows.append(("tapped modules", "<br>".join(escape(s) for s in sets) or "–"))
    sizes = sorted({r.batch_size for r in records if r.batch_size})
    if sizes:
        rows.append(("batch size", ", ".join(str(b) for b in sizes)))
    for run in runs:
        times = sorted(t for r in records if r.run == run and (t := parse_time(r.time)) is not None)
        if times:
            span = (times[-1] - times[0]).total_seconds()
            fmt = "%Y-%m-%d %H:%M:%S UTC"
            rows.append((per_run("time span", run),
                         f"{times[0].strftime(fmt)} → {times[-1].strftime(fmt)} ({duration_text(span)})"))
    dp_runs = run_ids(r for r in records if r.privacy)
    for run in dp_runs:  # one row per run: runs appended to one log train (and spend ε) apart
        last = max((r for r in records if r.privacy and r.run == run), key=lambda r: (r.step, r.audit))
        p = last.privacy or {}
        eps = finite_epsilon(last)
        eps_text = f"{eps:.4g}" if eps is not None else "∞ / not computed" + (f" ({escape(p.get('error'))})" if p.get("error") else "")
        fields = [f"ε = {eps_text} at step {last.step}"]
        fields += [f"{label} = {escape(format_number(p[k]))}" for k, label in (
            ("delta", "δ"), ("noise_multiplier", "σ"), ("max_grad_norm", "C"), ("sample_rate", "q"),
            ("accountant", "accountant"), ("epsilon_accountant", "ε from")) if p.get(k) is not None]
        rows.append((per_run("DP-SGD", run), ", ".join(fields)))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<section id="summary"><h2>Run summary</h2><table class="kv">{body}</table></section>'


def _worst_table(records: Sequence[AuditRecord]) -> str:
    worst = worst_values(records)
    if not worst:
        return '<p class="note">No successful audit: no worst values.</p>'
    picked = worst_values(r for r in records if r.info.get(PICK))
    rows = "".join(
        f"<tr><td>{escape(m)}</td><td class=\"num\">{format_metric(m, worst[m][0])}</td><td>{escape(worst[m][1])}</td>"
        f"<td class=\"num\">{format_metric(m, picked[m][0]) if m in picked else '–'}</td>"
        f"<td>{escape(picked[m][1]) if m in picked else ''}</td></tr>"
        for m in ordered_metrics(worst)
    )
    timeouts = sum(r.status == "timeout" for r in records)
    missing = (f" {timeouts} timed-out attack record(s) are missing evidence and count in neither column."
               if timeouts else "")
    bounds = [r for r in records if r.status == "ok" and r.info.get(LOWER_BOUND)]
    if bounds:
        missing += (f" {len(bounds)} record(s) are lower bounds (shown as ≥ x below; the gate never counts them toward "
                    f"a pass): {bounds[0].info[LOWER_BOUND]}.")
    return ("<h3>Worst value per metric</h3><table class=\"grid\"><thead><tr><th>metric</th>"
            "<th>worst (oracle)</th><th>where</th><th>worst (attacker's pick)</th><th>where</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
            '<p class="note"><b>Oracle:</b> the largest value over successful records of every attack and step, '
            "each scored against the real batch (every metric grows with leakage): the worst case over the "
            "attack portfolio, which no single attacker without the answer achieves. <b>Attacker's pick:</b> per "
            "audit, the one reconstruction an attacker keeps from its own evidence, the smallest gradient "
            f"residual; '–' where no record of the log has one.{escape(missing)}</p>")


def gate_section(records: Sequence[AuditRecord], policy: GatePolicy | None) -> tuple[str, str | None]:
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
                  f'<p class="note">The policy cannot be evaluated on this log: {escape(exc)}</p>')
        return head + banner + _worst_table(records) + "</section>", None
    verdict = str(report.verdict)
    word, css = VERDICT_WORDS.get(verdict, verdict.upper()), verdict if verdict in VERDICT_WORDS else "none"
    rows = []
    for res in report.results:
        rule = res.rule
        status = str(res.status)
        value_text = res.value_text  # as precise as the comparison with the limit needs
        agg = rule.aggregation_text
        rows.append(
            f'<tr class="r-{escape(status)}"><td>{escape(rule.name)}</td><td>{escape(rule.metric)}</td>'
            f"<td>{escape(agg)}</td><td class=\"num\">{value_text}</td>"
            f"<td>{escape(rule.limit_text)}</td><td class=\"status\">{escape(status)}</td>"
            f"<td>{escape(res.message or '')}</td><td>{escape(res.where or '')}</td></tr>"
        )
    table = ("<table class=\"grid wide\"><thead><tr><th>rule</th><th>metric</th><th>aggregation</th><th>value</th>"
             "<th>threshold</th><th>status</th><th>message</th><th>where</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    banner = f'<div class="verdict v-{css}" data-verdict="{escape(report.verdict)}">{escape(word)}</div>'
    note = ('<p class="note">The verdict is shown, not enforced: <code>leak-audit report</code> exits 0 '
            "whenever the page is written; <code>leak-audit gate</code> fails a release.</p>")
    return head + banner + note + table + _worst_table(records) + "</section>", word


def audit_section(records: Sequence[AuditRecord], attacks: Sequence[str], sets: Sequence[str]) -> str:
    """The audit table: one row per record (every metric, ε under DP, seconds, error; the run where the log holds
    several)."""
    if not records:
        return '<section id="audits"><h2>Audits</h2><p class="note">The log holds no record.</p></section>'
    metrics = ordered_metrics({*(m for r in records for m in r.metrics),
                                *(k[len("partial_"):] for r in records if r.status == "timeout"
                                  for k in r.info if k.startswith("partial_"))})
    with_eps = any(r.privacy for r in records)
    with_modules = len(sets) > 1
    with_rank = any("process_rank" in r.info for r in records)
    with_run = len({r.run for r in records}) > 1  # a log several runs appended to
    head = (["run"] if with_run else []) + ["step", "audit", "attack", "status", "pick"]
    head += (["rank"] if with_rank else []) + (["modules"] if with_modules else []) + [metric_label(m) for m in metrics]
    head += (["ε"] if with_eps else []) + ["seconds", "error"]
    body = []
    for r in sort_records(records, attacks):
        cells = [f"<td>{escape(r.run or 'unnamed')}</td>"] if with_run else []
        cells += [f'<td class="num">{r.step}</td>', f'<td class="num">{escape(r.audit)}</td>',
                  f"<td>{escape(r.attack)}</td>", f'<td class="status">{escape(r.status)}</td>',
                  f'<td>{"attacker" if r.info.get(PICK) else ""}</td>']
        if with_rank:
            cells.append(f'<td class="num">{escape(r.info.get("process_rank", ""))}</td>')
        if with_modules:
            cells.append(f"<td>{escape(module_set(r))}</td>")
        cells += [f'<td class="num">{_metric_cell(r, m)}</td>' for m in metrics]
        if with_eps:
            eps = finite_epsilon(r)
            cells.append(f'<td class="num">{f"{eps:.4g}" if eps is not None else ("∞" if r.privacy else "")}</td>')
        cells.append(f'<td class="num">{r.seconds:.2f}</td>')
        cells.append(f'<td class="error">{escape(r.error) if r.error else ""}</td>')
        body.append(f'<tr class="r-{escape(r.status)}">{"".join(cells)}</tr>')
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    return (f'<section id="audits"><h2>Audits</h2><table class="grid wide audits"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></section>")


def _metric_cell(r: AuditRecord, metric: str) -> str:
    """The record's value, or for a timed-out attack its partial value as a lower bound (``≥ x``); a record marked
    ``info["lower_bound"]`` also shows ``≥ x``, with the reason as its tooltip."""
    if metric in r.metrics:
        if isinstance(why := r.info.get(LOWER_BOUND), str) and why:
            return f'<span class="partial" title="{escape(why)}">≥ {format_metric(metric, r.metrics[metric])}</span>'
        return format_metric(metric, r.metrics[metric])
    partial = r.info.get(f"partial_{metric}") if r.status == "timeout" else None
    if isinstance(partial, int | float) and not isinstance(partial, bool) and math.isfinite(partial):
        return f'<span class="partial" title="partial result of a timed-out attack">≥ {format_metric(metric, partial)}</span>'
    return ""


def samples_section(records: Sequence[AuditRecord], include_samples: bool, base: Path | None,
                     attacks: Sequence[str]) -> str:
    """The privacy section: whether reconstructed samples are on the page and, when asked for, the samples."""
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
    for r in sort_records(with_samples, attacks):
        parts.append(f"<h3>step {escape(r.step)} · audit {escape(r.audit)} · {escape(r.attack)}</h3>")
        for sample in r.samples or []:
            file = sample.get("file") if isinstance(sample, Mapping) else None
            if isinstance(file, str):
                path = (base / file) if base is not None else Path(file)
                try:
                    parts.append(f'<div class="sample-images">{image_grid(path)}</div>')
                except (OSError, KeyError, ValueError) as exc:
                    parts.append(f'<p class="note">{escape(file)}: cannot show ({escape(exc)}).</p>')
                continue
            if isinstance(sample, Mapping):
                rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in sample.items())
                parts.append(f'<table class="kv sample">{rows}</table>')
            else:
                parts.append(f'<pre class="sample">{escape(sample)}</pre>')
    return "\n".join(parts) + "</section>"


def canary_section(records: Sequence[AuditRecord]) -> str:
    """The ε DP-SGD delivered, per audited step: the accountant's ε against the canaries' empirical lower bound
    (``privacy.epsilon_empirical``), its GDP estimate and ceiling; empty when no record carries canaries."""
    by_step: dict[tuple[str, int], Mapping] = {}  # (run, step): runs appended to one log share steps
    closing: set[tuple[str, int]] = set()  # the record over the whole run (CANARY_RECORD), per run
    for r in records:
        p = r.privacy or {}
        if isinstance(p.get("epsilon_empirical"), int | float):
            by_step[(r.run, r.step)] = p
            if r.attack == CANARY_RECORD:
                closing.add((r.run, r.step))
    if not by_step:
        return ""
    runs = run_ids(r for r in records if (r.run, r.step) in by_step)
    several = len(runs) > 1
    rows, verdicts = [], []
    for run in runs:
        steps = sorted(step for rr, step in by_step if rr == run)
        faults = []
        for step in steps:
            p = by_step[(run, step)]
            eps, low = p.get("epsilon"), float(p["epsilon_empirical"])
            fault = isinstance(eps, int | float) and low > eps
            if fault:
                faults.append(step)
            cells = [run or "unnamed"] if several else []
            cells += [f"{step} (end of run)" if (run, step) in closing else str(step),
                      format_number(eps) if eps is not None else "∞ / not computed", format_number(low),
                      format_number(p.get("epsilon_empirical_gdp")), format_number(p.get("epsilon_empirical_ceiling")),
                      "above" if fault else "ok"]
            rows.append("<tr>" + "".join(f'<td class="num">{escape(c)}</td>' for c in cells) + "</tr>")
        last = steps[-1]
        where = f"At the end of the run (step {last})" if (run, last) in closing else f"At the last audited step ({last})"
        if several:
            where += f" of run {run or 'unnamed'}"
        verdicts.append(f"<p><strong>DP implementation fault:</strong> {where[0].lower() + where[1:]} the canaries' 95% "
                        "lower bound on ε exceeds the accountant's ε: this run leaks more than its accountant says.</p>"
                        if last in faults else
                        f"<p>{where} the canaries' lower bound stays at or below the accountant's ε "
                        "(the gate's check; each row is one 95% test, so an isolated earlier \"above\" is weaker "
                        "evidence).</p>")
    m = ", ".join(dict.fromkeys(str(p.get("canaries")) for p in by_step.values()))  # one count per run, usually one
    verdict = "".join(verdicts)
    head = "".join(f"<th>{h}</th>" for h in ("run",) * several + (
        "step", "accountant ε", "empirical ε (95% lower bound)", "GDP estimate", "ceiling", "check"))
    return (f'<section id="canaries"><h2>The ε DP-SGD delivered ({escape(m)} canaries)</h2>'
            "<p>Dirac canaries in the same run (Steinke, Nasr, Jagielski 2023): a lower bound on the true ε at the "
            "accountant's δ. The ceiling is the most these canaries can certify; the GDP estimate assumes a Gaussian "
            f"trade-off curve.</p>{verdict}<table><tr>{head}</tr>{''.join(rows)}</table></section>")
