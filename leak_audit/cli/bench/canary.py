"""``leak-audit bench canary``: the empirical ε of Dirac canaries against the accountant's ε.

Each run trains a model with Opacus DP-SGD (``PrivacyEngine.make_private``, Poisson sampling at rate
``B/N``, the ``prv`` accountant unless ``--accountant rdp``) for ``--steps`` steps with ``--canaries`` Dirac
canaries (:class:`~leak_audit.capture.canaries.DiracCanaries`), then computes the one-run lower bound
(:func:`~leak_audit.metrics.epsilon.empirical_epsilon`) at the accountant's δ. ``--inject-noise-scale F``
is fault injection: the optimizer adds ``F·σ·C`` noise while the accountant is told σ (``F = 1``: honest).
``--canaries 0`` runs without canaries, for their effect on the final loss.

Models: ``tiny``, an MLP (32 → 1024 → 256 → 2, 296,706 parameters, room for 10⁵ canaries) on a fixed random
linearly separable task;
``minilm``, the pretrained all-MiniLM-L6-v2 with a 2-class head on CoLA sentences (``--data``).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from rich.console import Console

from leak_audit.cli.bench.common import (
    BenchError,
    command_line,
    default_data_path,
    fmt,
    markdown_report,
    parse_list,
    wide_console,
    write_json,
    write_markdown,
    wrote,
)

__all__ = ["add_canary_arguments", "bench_canary_command", "inject_noise_scale", "run_canary"]


def add_canary_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``leak-audit bench canary``."""
    p.add_argument("--model", choices=("tiny", "minilm"), default="tiny",
                   help="tiny: an MLP on a random task (fast); minilm: pretrained MiniLM on --data (default tiny)")
    p.add_argument("--data", default=None, help="TSV 'sentence<TAB>label' for --model minilm "
                   "(default $LEAK_AUDIT_DATA/cola_dev.tsv or ../shared/data/cola_dev.tsv)")
    p.add_argument("--noise-multiplier", default="1.0", metavar="S[,S...]", help="σ, comma-separated (default 1.0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="C, per-sample clipping norm (default 1.0)")
    p.add_argument("--canaries", type=int, default=1000, help="m Dirac canaries (default 1000; 0: none)")
    p.add_argument("--steps", type=int, default=300, help="DP-SGD steps T (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="expected batch size B (default 8)")
    p.add_argument("--dataset-size", type=int, default=256, help="examples N; the sample rate is B/N (default 256)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    p.add_argument("--seeds", type=int, default=1, help="runs with seeds 0..K-1 (default 1)")
    p.add_argument("--inject-noise-scale", default="1.0", metavar="F[,F...]",
                   help="fault injection: the optimizer adds F·σ·C noise, the accountant is told σ (default 1.0)")
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help="Opacus accountant (default prv)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", metavar="OUT.json", default=None, help="write the rows as JSON")
    p.add_argument("--markdown", metavar="OUT.md", default=None, help="write a markdown report")


def _floats(text: str, option: str, positive: bool) -> list[float]:
    out = []
    for item in parse_list(text, option):
        try:
            value = float(item)
        except ValueError:
            raise BenchError(f"{option}: {item!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise BenchError(f"{option}: {item} must be {'> 0' if positive else '>= 0'}")
        out.append(value)
    return out


def inject_noise_scale(dp_optimizer: Any, scale: float) -> None:
    """Fault injection: ``dp_optimizer`` adds ``scale·σ·C`` noise while its accountant is still told σ.

    Wraps ``add_noise`` on the instance (the accountant's ``step_hook`` reads ``noise_multiplier`` after it,
    restored). ``scale = 1`` leaves the optimizer as it is.
    """
    if scale == 1.0:
        return
    inner = dp_optimizer.add_noise

    def add_noise() -> None:
        told = dp_optimizer.noise_multiplier
        dp_optimizer.noise_multiplier = told * scale
        try:
            inner()
        finally:
            dp_optimizer.noise_multiplier = told

    dp_optimizer.add_noise = add_noise


def _tiny_task(n: int, seed: int) -> tuple[Any, Any, Any]:
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n, 32, generator=gen)
    w = torch.randn(32, generator=gen)
    y = (x @ w > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 2))
    return model, torch.utils.data.TensorDataset(x, y), None


def _minilm_task(n: int, seed: int, data: str | None) -> tuple[Any, Any, Any]:
    import torch

    from leak_audit.cli.bench.text_run import load_model
    from leak_audit.demos.datasets import read_tsv

    path = data or default_data_path()
    try:
        rows = read_tsv(path, limit=n)
    except (OSError, ValueError) as exc:
        raise BenchError(f"--data: cannot read {path}: {exc}") from None
    if len(rows) < n:
        raise BenchError(f"--dataset-size {n} exceeds the {len(rows)} sentences of {path}")
    model, tokenizer, _ = load_model(None, seed)
    enc = tokenizer([s for s, _ in rows], padding="max_length", truncation=True, max_length=32,
                    return_tensors="pt")
    labels = torch.tensor([label for _, label in rows])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = torch.arange(ids.shape[1]).expand_as(ids).contiguous()  # explicit [B, L]: per-sample clipping (NOTES)
    data_set = torch.utils.data.TensorDataset(ids, mask, pos, torch.zeros_like(ids), labels)
    return model, data_set, "hf"


def run_canary(model_name: str, *, noise_multiplier: float, max_grad_norm: float, canaries: int, steps: int,
               batch_size: int, dataset_size: int, delta: float, seed: int, inject: float, accountant: str,
               lr: float, data: str | None = None) -> dict[str, Any]:
    """One DP-SGD run with canaries; its bench row (see the module docstring)."""
    import torch
    from opacus import PrivacyEngine

    from leak_audit.capture.canaries import DiracCanaries
    from leak_audit.capture.privacy import epsilon_for
    from leak_audit.metrics.epsilon import canary_privacy

    start = time.perf_counter()
    if model_name == "tiny":
        model, data_set, kind = _tiny_task(dataset_size, seed)
    else:
        model, data_set, kind = _minilm_task(dataset_size, seed, data)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    loader = torch.utils.data.DataLoader(data_set, batch_size=batch_size)
    engine = PrivacyEngine(accountant=accountant)
    torch.manual_seed(seed)
    wrapped, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                               noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                               poisson_sampling=True, wrap_model=kind != "hf")
    if kind != "hf":  # hooks mode (Hugging Face) keeps the model itself; otherwise train the GradSampleModule
        model = wrapped
    inject_noise_scale(opt, inject)
    params = dict(model.named_parameters())
    canary = (DiracCanaries(opt, params, canaries, sample_rate=batch_size / dataset_size, seed=seed)
              if canaries else None)
    loss_fn = torch.nn.CrossEntropyLoss()
    done, losses = 0, []
    while done < steps:
        for batch in loader:
            if done >= steps:
                break
            opt.zero_grad()
            if kind == "hf":
                ids, mask, pos, types, y = batch
                if len(y) == 0:
                    loss = sum(p.sum() * 0 for p in model.parameters())
                else:
                    loss = model(input_ids=ids, attention_mask=mask, position_ids=pos, token_type_ids=types,
                                 labels=y).loss
            else:
                x, y = batch
                loss = loss_fn(model(x), y) if len(y) else model(x).sum() * 0
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            done += 1
    eps = epsilon_for(engine.accountant, delta)[0]
    row: dict[str, Any] = {
        "model": model_name, "noise_multiplier": noise_multiplier, "inject_noise_scale": inject,
        "max_grad_norm": max_grad_norm, "batch_size": batch_size, "dataset_size": dataset_size, "steps": steps,
        "canaries": canaries, "seed": seed, "accountant": accountant,
        "epsilon": eps if math.isfinite(eps) else None, "delta": delta,
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
    }
    if canary is not None:
        state = canary.scores()
        canary.remove()
        row.update(canary_privacy(state.llr, state.included, delta))
    else:
        row.update(epsilon_empirical=None, epsilon_empirical_ceiling=None, epsilon_empirical_gdp=None)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


_COLUMNS = ("σ", "F", "seed", "ε (accountant)", "ε empirical", "ratio", "ε GDP estimate", "ratio GDP", "ceiling", "loss",
            "s")


def _cells(r: dict[str, Any]) -> list[str]:
    def ratio(key: str) -> float | None:
        return r[key] / r["epsilon"] if r[key] is not None and r["epsilon"] else None

    return [fmt(r["noise_multiplier"], 2), fmt(r["inject_noise_scale"], 2), str(r["seed"]), fmt(r["epsilon"], 2),
            fmt(r["epsilon_empirical"], 2), fmt(ratio("epsilon_empirical"), 2), fmt(r["epsilon_empirical_gdp"], 2),
            fmt(ratio("epsilon_empirical_gdp"), 2), fmt(r["epsilon_empirical_ceiling"], 2), fmt(r["final_loss"], 3),
            fmt(r["seconds"], 1)]


def bench_canary_command(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run ``leak-audit bench canary``; 0 when done, 2 on bad input."""
    from rich.table import Table

    from leak_audit.cli.bench.common import intra_op_threads

    console = wide_console(console or Console())
    try:
        sigmas = _floats(args.noise_multiplier, "--noise-multiplier", positive=True)
        scales = _floats(args.inject_noise_scale, "--inject-noise-scale", positive=False)
        for name, value, low in (("--canaries", args.canaries, 0), ("--steps", args.steps, 1),
                                 ("--batch-size", args.batch_size, 1), ("--seeds", args.seeds, 1),
                                 ("--threads", args.threads, 1)):
            if value < low:
                raise BenchError(f"{name} must be >= {low}, got {value}")
        if args.dataset_size < args.batch_size:
            raise BenchError(f"--dataset-size {args.dataset_size} must be >= --batch-size {args.batch_size}")
        if not 0 < args.delta < 1:
            raise BenchError(f"--delta must be in (0, 1), got {args.delta}")
    except BenchError as exc:
        console.print(f"error: {exc}", markup=False)
        return 2
    rows: list[dict[str, Any]] = []
    table = Table(title="leak-audit bench canary")
    for c in _COLUMNS:
        table.add_column(c, justify="right")
    with intra_op_threads(args.threads):
        for sigma in sigmas:
            for scale in scales:
                for seed in range(args.seeds):
                    try:
                        row = run_canary(args.model, noise_multiplier=sigma, max_grad_norm=args.max_grad_norm,
                                         canaries=args.canaries, steps=args.steps, batch_size=args.batch_size,
                                         dataset_size=args.dataset_size, delta=args.delta, seed=seed, inject=scale,
                                         accountant=args.accountant, lr=args.lr, data=args.data)
                    except (BenchError, ValueError) as exc:
                        console.print(f"error: {exc}", markup=False)
                        return 2
                    rows.append(row)
                    console.print(" ".join(_cells(row)), markup=False, highlight=False)
    for r in rows:
        table.add_row(*_cells(r))
    console.print(table)
    if args.json:
        wrote(console, write_json(rows, args.json))
    if args.markdown:
        facts = {"model": args.model, "canaries": args.canaries, "steps": args.steps, "batch size": args.batch_size,
                 "dataset size": args.dataset_size, "delta": args.delta, "accountant": args.accountant}
        note = ("ε: the accountant's, at δ. ε empirical: the one-run lower bound at 95% confidence (Steinke, Nasr, "
                "Jagielski 2023) from the canaries' log-likelihood scores (the gate's); GDP estimate: a 95% lower bound on mu "
                "assuming a Gaussian trade-off curve, converted to epsilon at delta; ceiling: the most m canaries can certify. "
                "F: injected noise scale (F < 1: the optimizer adds less noise than the accountant is told).")
        wrote(console, write_markdown(markdown_report("leak-audit bench canary", command_line(args), facts, _COLUMNS,
                                                      [_cells(r) for r in rows], note, numeric=_COLUMNS), args.markdown))
    return 0
