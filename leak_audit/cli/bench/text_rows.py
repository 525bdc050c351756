"""The rows of ``leak-audit bench text``: per-attack summaries of audit records, published references,
and the rows as a markdown report and a console table (see :mod:`leak_audit.cli.bench.text`)."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from leak_audit.cli.bench.common import fmt, markdown_report
from leak_audit.results.records import LOWER_BOUND, PICK, AuditRecord

__all__ = [
    "BEST",
    "EXTRA_METRICS",
    "METRICS",
    "PICK_ROW",
    "ROW_KEYS",
    "reference_for",
    "rows_markdown",
    "rows_table",
    "summarize",
]

BEST = "best"
"""The oracle row: per batch the attack that scored highest against the real batch."""


PICK_ROW = "pick"
"""The attacker's-pick row: per batch the attack with the smallest gradient residual (its own evidence)."""


METRICS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "token_recall", "exact_match")
"""The metrics every row carries (means over batches; ``None`` when the attack does not report one)."""


EXTRA_METRICS: tuple[str, ...] = ("token_precision", "position_recall", "label_accuracy")


ROW_KEYS: tuple[str, ...] = (
    "data",
    "view",
    "batch_size",
    "attack",
    "n_sentences",
    *METRICS,
    "seconds_per_batch",
    "dropout",
    "params_fraction",
)
"""The mandatory keys of a JSON row, in output order. Rows also carry :data:`EXTRA_METRICS`, ``seed``,
``model``, ``status_counts``, ``best_of`` and ``reference``."""


# -------------------------------------------------------------------------------------------- summary


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 6) if values else None


def _status_counts(records: Sequence[AuditRecord]) -> dict[str, int]:
    """Records per status, and ``lower_bound``: the ``ok`` ones marked ``info["lower_bound"]``."""
    counts = Counter(r.status for r in records)
    return {**{s: counts.get(s, 0) for s in ("ok", "timeout", "skipped", "failed")}, "lower_bound": _bounds(records)}


def _bounds(records: Sequence[AuditRecord]) -> int:
    return sum(r.status == "ok" and bool(r.info.get(LOWER_BOUND)) for r in records)


def _best_key(record: AuditRecord) -> tuple[float, float]:
    r1 = record.metrics.get("rouge1")
    tr = record.metrics.get("token_recall")
    return (-1.0 if r1 is None else float(r1), -1.0 if tr is None else float(tr))


def _portfolio_entry(
    name: str, batches: Sequence[Sequence[AuditRecord]], chosen: set[str], choose: Any
) -> dict[str, Any]:
    """One row over the attacks in ``chosen``: per batch the ok record ``choose(ok_records)`` picks."""
    picks: list[AuditRecord] = []
    seconds: list[float] = []
    timed_out = 0
    for batch in batches:
        mine = [r for r in batch if r.attack in chosen]
        seconds.append(sum(float(r.seconds) for r in mine))
        timed_out += any(r.status == "timeout" for r in mine)
        found = choose([r for r in mine if r.status == "ok"])
        if found is not None:
            picks.append(found)
    entry: dict[str, Any] = {"attack": name, "n_sentences": sum(r.batch_size for r in picks)}
    for m in (*METRICS, *EXTRA_METRICS):
        entry[m] = _mean([float(r.metrics[m]) for r in picks if r.metrics.get(m) is not None])
    entry["rouge_batches"] = sum(r.metrics.get("rouge1") is not None for r in picks)
    entry["seconds_per_batch"] = _mean(seconds)
    entry["status_counts"] = {"ok": len(picks), "timeout": timed_out, "skipped": 0,
                              "failed": len(batches) - len(picks), "lower_bound": _bounds(picks)}
    entry["best_of"] = dict(Counter(r.attack for r in picks))
    return entry


def summarize(
    batches: Sequence[Sequence[AuditRecord]], attacks: Sequence[str], with_best: bool = False
) -> list[dict[str, Any]]:
    """Aggregate the audit records of one (view, batch size) setting into one entry per attack.

    Args:
        batches: per batch, the records the auditor returned (one per attack).
        attacks: the attacks to report, in order (records of other attacks are ignored).
        with_best: append two entries over the attacks. ``best`` is the *oracle*: per batch, the ok record
            that scored highest against the real batch (``rouge1``, ties ``token_recall``; a missing metric
            counts as -1; further ties: the earlier attack), the worst case over the attack portfolio,
            which no single attacker without the answer achieves. ``pick`` is the *attacker's pick*: per
            batch the ok record an attacker keeps from its own evidence, the smallest gradient residual
            (``info["attacker_pick"]``, :mod:`leak_audit.attacks.evidence`).

    Returns:
        Dicts with ``attack``, ``n_sentences`` (sentences in batches the attack scored), every metric of
        :data:`METRICS` and :data:`EXTRA_METRICS` (mean over the batches that report it, rounded to 6
        digits, else ``None``), ``rouge_batches`` (the ok batches behind the ROUGE means: an attack that returns
        a token bag for a batch reports token recall there, no ROUGE), ``seconds_per_batch`` (mean wall seconds;
        for ``best`` and ``pick`` the mean
        over batches of the summed seconds of all ``attacks``), ``status_counts`` (``{"ok", "timeout",
        "skipped", "failed"}``: records; for ``best`` and ``pick``: batches with a chosen record
        (``ok``), batches in which at least one attack ran out of time (``timeout``: the row may be lower
        than without a budget) and batches with nothing chosen (``failed``)) and ``best_of`` (``best`` and
        ``pick``: ``{attack: batches it was chosen in}``, otherwise ``None``).
    """
    out = []
    for attack in attacks:
        recs = [r for batch in batches for r in batch if r.attack == attack]
        ok = [r for r in recs if r.status == "ok"]
        entry: dict[str, Any] = {"attack": attack, "n_sentences": sum(r.batch_size for r in ok)}
        for m in (*METRICS, *EXTRA_METRICS):
            entry[m] = _mean([float(r.metrics[m]) for r in ok if r.metrics.get(m) is not None])
        entry["rouge_batches"] = sum(r.metrics.get("rouge1") is not None for r in ok)
        entry["seconds_per_batch"] = _mean([float(r.seconds) for r in recs]) if recs else None
        entry["status_counts"] = _status_counts(recs)
        entry["best_of"] = None
        out.append(entry)
    if with_best:
        chosen = set(attacks)
        out.append(_portfolio_entry(BEST, batches, chosen, lambda ok: max(ok, key=_best_key) if ok else None))
        out.append(_portfolio_entry(PICK_ROW, batches, chosen,
                                    lambda ok: next((r for r in ok if r.info.get(PICK)), None)))
    return out


# ---------------------------------------------------------------------------------------- references

_LAMP_ROUGE1 = {"cola": 0.896, "sst2": 0.888}


def _dataset_key(data: str) -> str | None:
    flat = re.sub(r"[^a-z0-9]", "", data.lower())
    if "cola" in flat:
        return "cola"
    if "sst2" in flat:
        return "sst2"
    return None


def reference_for(data: str, view: str, batch_size: int) -> list[dict[str, Any]] | None:
    """Published reference values for a setting, or ``None`` where none exists.

    Only the ``full`` view of CoLA / SST-2 data (recognised from the file stem ``data``) has references:
    LAMP (Balunović et al., NeurIPS 2022; BERT-base, B=1) ROUGE-1 0.896 on CoLA and 0.888 on SST-2; DAGER
    (Petrov et al., NeurIPS 2024) ROUGE-1 and ROUGE-2 above 0.99 at the batch sizes it supports.

    Returns:
        A list of ``{"source", "setting", ...}`` dicts with ``rouge1`` (a value) or ``rouge1_above`` /
        ``rouge2_above`` (lower bounds), all in ``[0, 1]``.
    """
    key = _dataset_key(data)
    if view != "full" or key is None:
        return None
    refs: list[dict[str, Any]] = []
    if batch_size == 1:
        refs.append({"source": "LAMP", "setting": "BERT-base, B=1", "rouge1": _LAMP_ROUGE1[key]})
    refs.append({"source": "DAGER", "setting": "batch sizes it supports", "rouge1_above": 0.99, "rouge2_above": 0.99})
    return refs


def _reference_text(refs: list[dict[str, Any]] | None) -> str:
    if not refs:
        return ""
    parts = []
    for r in refs:
        if "rouge1" in r:
            parts.append(f"{r['source']} R-1 {r['rouge1']:.3f} ({r['setting']})")
        else:
            parts.append(f"{r['source']} R-1/R-2 > {r['rouge1_above']:g}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------- outputs


def _status_text(counts: Mapping[str, int]) -> str:
    bounds = counts.get("lower_bound", 0)
    parts = [f"{v} {k}" + (f" ({bounds} lower bound{'s' if bounds > 1 else ''})" if k == "ok" and bounds else "")
             for k, v in counts.items() if v and k != "lower_bound"]
    return ", ".join(parts) or "0"


_COLUMNS = ("data", "view", "B", "attack", "n", "ROUGE-1", "ROUGE-2", "ROUGE-L", "token recall", "exact match",
            "label acc", "s/batch", "dropout", "params", "batches", "reference")


_DP_COLUMNS = ("σ", "C", "ε")
"""Added after ``params`` when the rows come from ``--dp-noise`` (noise multiplier, clipping norm, ε at 1e-5)."""


_NUMERIC = {"B", "n", "LoRA r", "LoRA steps", "ROUGE-1", "ROUGE-2", "ROUGE-L", "token recall", "exact match", "label acc", "s/batch", "params",
            "R-1", "R-2", "R-L", "tok rec", "exact", "labels", *_DP_COLUMNS}


_LORA_COLUMNS = ("LoRA r", "LoRA steps")
"""Added after ``params`` when the rows come from ``--lora-r`` (adapter rank, training steps before the attack)."""


def _has_dp(rows: Sequence[Mapping[str, Any]]) -> bool:
    return any("noise_multiplier" in r for r in rows)


def _has_lora(rows: Sequence[Mapping[str, Any]]) -> bool:
    return any("lora_r" in r for r in rows)


def _columns(dp: bool, lora: bool = False) -> tuple[str, ...]:
    i = _COLUMNS.index("params") + 1
    extra = (*(_LORA_COLUMNS if lora else ()), *(_DP_COLUMNS if dp else ()))
    return (*_COLUMNS[:i], *extra, *_COLUMNS[i:])


def _eps_text(row: Mapping[str, Any]) -> str:
    eps = row.get("epsilon")
    if eps is None:
        return "∞" if row.get("noise_multiplier") == 0 else "–"
    return f"{eps:.3g}"


def _cells(row: Mapping[str, Any], dp: bool = False, lora: bool = False) -> list[str]:
    cells = [
        str(row["data"]),
        str(row["view"]),
        str(row["batch_size"]),
        _attack_text(str(row["attack"])),
        str(row["n_sentences"]),
        *(fmt(row[m]) for m in METRICS),
        fmt(row.get("label_accuracy")),
        fmt(row["seconds_per_batch"], 2),
        str(row["dropout"]),
        f"{row['params_fraction']:.3g}",
        _status_text(row.get("status_counts") or {}),
        _reference_text(row.get("reference")),
    ]
    i = _COLUMNS.index("params") + 1
    if dp:
        cells[i:i] = [f"{row.get('noise_multiplier', 0):g}", f"{row.get('max_grad_norm', 0):g}", _eps_text(row)]
    if lora:
        cells[i:i] = [str(row.get("lora_r", "–")), str(row.get("lora_steps", "–"))]
    return cells


def _attack_text(attack: str) -> str:
    return {BEST: f"{BEST} (oracle)", PICK_ROW: f"{PICK_ROW} (attacker)"}.get(attack, attack)


def rows_markdown(rows: Sequence[Mapping[str, Any]], command: str, meta: Mapping[str, Any] | None = None) -> str:
    """The rows as a markdown document: the command line, run facts, a table, notes.

    Args:
        rows: JSON rows (see :data:`ROW_KEYS`).
        command: the exact command line that produced them (shown first).
        meta: facts printed under the command (model, seed, threads, ...).
    """
    dp, lora = _has_dp(rows), _has_lora(rows)
    note = (
        "ROUGE: F-measure; every metric is the mean over the batches the attack scored, in [0, 1]; "
        "–: the attack does not report it. `best (oracle)`: per batch the attack whose reconstruction "
        "scored the highest ROUGE-1 against the real batch (ties: token recall): the worst case over the "
        "attack portfolio, not one attacker's result. `pick (attacker)`: per batch the attack an attacker "
        "without the answer keeps, the smallest gradient residual of its reconstruction. Their s/batch is "
        "the sum over all attacks; their batches column counts batches, and `timeout` there counts batches "
        "in which some attack ran out of its budget (that row may be lower than without a budget). params: "
        "tapped share of the model's parameters. label acc: share of labels recovered. batches: record "
        "statuses (`timeout`: stopped by its budget; missing evidence, not counted in the means; `lower bound`: an "
        "ok record marked info.lower_bound, where our attack is measured to read less than published ones, "
        "counted in the means as read). "
        "Reference: published values on BERT-base (LAMP, Balunović et al. 2022; DAGER, Petrov et al. "
        "2024), not measured here."
        + (
            " σ: noise multiplier, C: per-sample clipping norm (DP-SGD through Opacus); ε: at δ = 1e-5 "
            "after one epoch of the whole data file at that batch size (Opacus RDP accountant)."
            if dp else ""
        )
        + (
            " LoRA r: adapter rank; LoRA steps: adapter training steps before the attacked batches (0: at "
            "initialisation, lora_B = 0, so every lora_A gradient is 0)."
            if lora else ""
        )
    )
    cells = (_cells(row, dp, lora) for row in rows)
    return markdown_report("leak-audit bench text", command, meta or {}, _columns(dp, lora), cells, note, _NUMERIC)


def rows_table(rows: Sequence[Mapping[str, Any]], title: str = "leak-audit bench text") -> Table:
    """A compact rich table of the rows for the console (the markdown report has every column).

    Data set and dropout go into the title when every row shares them; ``best`` rows are bold.
    """
    shared = {k: {str(r[k]) for r in rows} for k in ("data", "dropout")}
    suffix = ", ".join(f"{k} {next(iter(v))}" for k, v in shared.items() if len(v) == 1)
    table = Table(title=f"{title} ({suffix})" if suffix else title, box=box.SIMPLE_HEAD, pad_edge=False)
    # console header -> markdown column: the same cells as the report, fewer and shorter headers
    columns = {"view": "view", "B": "B", "attack": "attack", "n": "n", "R-1": "ROUGE-1", "R-2": "ROUGE-2",
               "R-L": "ROUGE-L", "tok rec": "token recall", "exact": "exact match", "labels": "label acc",
               "s/batch": "s/batch", "params": "params", "batches": "batches"}
    dp, lora = _has_dp(rows), _has_lora(rows)
    if lora:
        columns.update({"r": "LoRA r", "steps": "LoRA steps"})
    if dp:
        columns.update({c: c for c in _DP_COLUMNS})
    for col in columns:
        if col == "view":
            table.add_column(col, overflow="fold", min_width=12)
        else:
            table.add_column(col, justify="left" if col in ("attack", "batches") else "right")
    for row in rows:
        report = dict(zip(_columns(dp, lora), _cells(row, dp, lora), strict=True))
        cells = [report[c] for c in columns.values()]
        cells = [escape(c) for c in cells]
        if row["attack"] in (BEST, PICK_ROW):
            cells = [f"[bold]{c}[/bold]" for c in cells]
        table.add_row(*cells)
    return table
