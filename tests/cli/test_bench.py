"""``leak-audit bench text``: end to end on real CoLA sentences, reproducibility, views, bad input."""

from __future__ import annotations

import json
import math

import pytest

from leak_audit.cli.bench.common import BenchError, parse_batch_sizes
from leak_audit.cli.bench.text import parse_attacks
from leak_audit.cli.bench.text_rows import BEST, METRICS, PICK_ROW, ROW_KEYS, reference_for, rows_markdown, summarize
from leak_audit.cli.bench.text_run import bench_attack, split_batches
from leak_audit.cli.bench.views import resolve_view
from leak_audit.cli.main import main
from leak_audit.results.records import AuditRecord
from tests.conftest import data_file

QUERY = "bert.encoder.layer.0.attention.self.query"


def bench_args(data, out) -> list[str]:
    return [
        "bench", "text", "--data", str(data), "--n", "4", "--batch-sizes", "1,2,8",
        "--views", f"full,linear:{QUERY}", "--attacks", "span_check,token_bag,best", "--dropout", "off",
        "--seed", "0", "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cola_file():
    return data_file("cola_dev.tsv")


@pytest.fixture(scope="module")
def first_run(minilm_path, cola_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench1")
    argv = bench_args(cola_file, out)
    rc = main(argv)
    return rc, argv, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def row(rows, view, b, attack):
    hits = [r for r in rows if r["view"] == view and r["batch_size"] == b and r["attack"] == attack]
    assert len(hits) == 1, (view, b, attack, hits)
    return hits[0]


def test_end_to_end_json_schema(first_run):
    rc, _, rows, _ = first_run
    assert rc == 0
    linear = f"linear:{QUERY}"
    # B=8 > n=4 is skipped; token_bag needs the word-embedding gradient, absent from the linear view
    assert {(r["view"], r["batch_size"], r["attack"]) for r in rows} == {
        *((v, b, a) for v in ("full", linear) for b in (1, 2) for a in ("span_check", BEST, PICK_ROW)),
        ("full", 1, "token_bag"),
        ("full", 2, "token_bag"),
    }
    for r in rows:
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
        assert r["data"] == "cola_dev" and r["dropout"] == "off" and r["seed"] == 0
        assert r["n_sentences"] == 4 and isinstance(r["n_sentences"], int)
        assert r["status_counts"]["ok"] == 4 // r["batch_size"] and r["status_counts"]["failed"] == 0
        for m in METRICS:
            v = r[m]
            assert v is None or (isinstance(v, float) and 0.0 <= v <= 1.0), (m, v)
        assert isinstance(r["seconds_per_batch"], float) and r["seconds_per_batch"] >= 0
        assert 0 < r["params_fraction"] <= 1
    assert row(rows, "full", 1, "span_check")["rouge1"] >= 0.99
    bag = row(rows, "full", 1, "token_bag")
    assert bag["rouge1"] is None and bag["exact_match"] is None and bag["token_recall"] == pytest.approx(1.0)
    assert row(rows, "full", 1, "span_check")["params_fraction"] == 1.0
    total = row(rows, linear, 1, "span_check")["params_fraction"]
    assert total == pytest.approx((384 * 384 + 384) / 22_713_986, rel=0.01)
    best = row(rows, "full", 2, BEST)
    assert best["rouge1"] == row(rows, "full", 2, "span_check")["rouge1"]  # token_bag has no ROUGE
    parts = [row(rows, "full", 2, a)["seconds_per_batch"] for a in ("span_check", "token_bag")]
    assert best["seconds_per_batch"] == pytest.approx(sum(parts), abs=1e-4)
    assert best["best_of"] == {"span_check": 2}
    # the attacker keeps span_check too: token_bag has no sequences, so no gradient residual
    assert row(rows, "full", 2, PICK_ROW)["best_of"] == {"span_check": 2}
    assert [ref["source"] for ref in row(rows, "full", 1, "span_check")["reference"]] == ["LAMP", "DAGER"]
    assert row(rows, linear, 1, "span_check")["reference"] is None


def test_markdown_has_command_and_table(first_run):
    _, _, rows, md = first_run
    assert md.splitlines()[0] == "# leak-audit bench text"
    assert "leak-audit bench text --data " in md and f"--views full,linear:{QUERY}" in md
    table = [line for line in md.splitlines() if line.startswith("| cola_dev |")]
    assert len(table) == len(rows)
    assert "| data | view | B | attack |" in md and "reference |" in md
    assert "LAMP R-1 0.896" in md


def test_same_seed_same_numbers(first_run, cola_file, tmp_path, capsys):
    _, _, rows1, _ = first_run
    rc = main(bench_args(cola_file, tmp_path))
    out = capsys.readouterr().out
    assert rc == 0
    assert "skipping B=8" in out and "token_bag does not apply" in out and "span_check" in out
    rows2 = json.loads((tmp_path / "bench.json").read_text())

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds_per_batch"} for r in rows]

    assert strip(rows1) == strip(rows2)


# ------------------------------------------------------------------------------------------- views


def test_views_resolve_to_parameter_sets(minilm):
    total = sum(p.numel() for p in minilm.parameters())
    full = resolve_view("full", minilm)
    assert full.parameters == tuple(n for n, _ in minilm.named_parameters()) and full.params_fraction == 1.0
    layer = resolve_view("layer:0", minilm)
    assert len(layer.parameters) == 16 and all(n.startswith("bert.encoder.layer.0.") for n in layer.parameters)
    assert layer.numel == sum(p.numel() for n, p in minilm.named_parameters() if n.startswith("bert.encoder.layer.0."))
    lin = resolve_view(f"linear:{QUERY}", minilm)
    assert lin.parameters == (f"{QUERY}.weight", f"{QUERY}.bias")
    assert lin.numel == 384 * 384 + 384 and math.isclose(lin.params_fraction, lin.numel / total)
    assert 22.5e6 < total < 23e6


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (f"linear:{QUERY}y", ["'bert.encoder.layer.0.attention.self.queryy'", f"{QUERY}"]),
        ("linear:bert.encoder.layer.0", ["has no weight of its own", "layer:K"]),
        ("layer:9", ["'layer:9'", "6 encoder layers", "layer:5"]),
        ("layer:x", ["'x'", "layer:0"]),
        ("layers:0", ["unknown view 'layers:0'", "'layer:0'"]),
        ("ful", ["unknown view 'ful'", "'full'"]),
    ],
)
def test_bad_views_name_value_and_suggest(minilm, view, expected):
    with pytest.raises(BenchError) as err:
        resolve_view(view, minilm)
    for text in expected:
        assert text in str(err.value)


def test_bad_view_exits_2_with_suggestions(minilm_path, cola_file, tmp_path, capsys):
    rc = main(["bench", "text", "--data", str(cola_file), "--n", "2", "--batch-sizes", "1",
               "--views", "full,linear:bert.encoder.layer.0.attention.self.querry"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "'bert.encoder.layer.0.attention.self.querry'" in err and QUERY in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--attacks", "span_chek"], ["unknown attack 'span_chek'", "'span_check'"]),
        (["--batch-sizes", "1,x"], ["'x' is not an integer"]),
        (["--batch-sizes", "1,1"], ["repeats '1'"]),
        (["--n", "0"], ["--n must be >= 1"]),
        (["--max-steps", "0"], ["--max-steps must be >= 1, got 0"]),
        (["--dropout", "maybe"], ["invalid choice: 'maybe'"]),
        (["--views", "lora"], ["--views lora taps LoRA adapters: add --lora-r R"]),
        (["--lora-r", "0"], ["LoRA rank r must be >= 1, got 0"]),
        (["--lora-r", "8", "--lora-steps", "5,x"], ["--lora-steps must be non-negative integers"]),
        (["--task", "translation"], ["invalid choice: 'translation'", "'causal-lm'", "'seq-class'"]),
        (["--task", "causal-lm", "--dp-noise", "0.1"], ["--task causal-lm runs without --dp-noise"]),
    ],
)
def test_bad_options_exit_2(tmp_path, capsys, args, expected):
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\nA cat sat.\t1\n")
    rc = main(["bench", "text", "--data", str(data), *args])
    err = capsys.readouterr().err
    assert rc == 2
    for text in expected:
        assert text in err


def test_missing_data_exits_2(tmp_path, capsys):
    assert main(["bench", "text", "--data", str(tmp_path / "none.tsv"), "--attacks", "span_check"]) == 2
    assert "none.tsv" in capsys.readouterr().err


def test_max_steps_rows_depend_on_the_seed_alone(minilm_path, cola_file, tmp_path):
    """Work-bounded optimisation attacks: two runs give the same numbers, whatever the machine's load."""
    def run(out):
        argv = ["bench", "text", "--data", str(cola_file), "--n", "1", "--batch-sizes", "1",
                "--views", "linear:bert.encoder.layer.3.attention.self.query", "--attacks", "dlg,gradient_matching",
                "--seed", "0", "--max-steps", "6", "--json", str(out)]  # fmt: skip
        assert main(argv) == 0
        return [{k: r[k] for k in METRICS + ("attack", "label_accuracy")} for r in json.loads(out.read_text())]

    first, second = run(tmp_path / "a.json"), run(tmp_path / "b.json")
    assert [r["attack"] for r in first] == ["dlg", "gradient_matching"]
    assert all(r["rouge1"] is not None for r in first)
    assert first == second


def test_bench_attack_work_bounds():
    gm = bench_attack("gradient_matching", 200)
    assert (gm.max_steps, gm.max_seconds, gm.discrete_steps) == (200, math.inf, 2)
    dlg = bench_attack("dlg", 50)
    assert (dlg.max_steps, dlg.max_seconds) == (50, math.inf)
    assert bench_attack("span_search", 50).max_seconds == math.inf
    assert bench_attack("span_check", 50).name == "span_check"
    assert bench_attack("gradient_matching").max_seconds == 20.0  # registered default: time-bounded
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1, got 0"):
        bench_attack("dlg", 0)


def test_bench_screen_sets_span_search_precision_and_rejects_unknown_values(capsys):
    """``--screen`` reaches span_search (time- or work-bounded) and no other attack; a bad value is refused
    with the valid ones named."""
    assert bench_attack("span_search").screen == "auto"
    assert bench_attack("span_search", screen="off").screen == "off"
    work = bench_attack("span_search", 50, screen="bfloat16")
    assert (work.screen, work.max_seconds) == ("bfloat16", math.inf)
    assert bench_attack("span_check", screen="off").name == "span_check"
    with pytest.raises(ValueError, match="screen must be one of"):
        bench_attack("span_search", screen="half")
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1, got 0"):
        bench_attack("span_search", 0)
    assert main(["bench", "text", "--attacks", "span_search", "--screen", "half"]) == 2
    assert "argument --screen: invalid choice: 'half' (choose from 'auto', 'bfloat16', 'off')" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- pure helpers


def rec(attack, step, status="ok", seconds=1.0, info=None, **metrics):
    return AuditRecord(step=step, attack=attack, status=status, batch_size=2, metrics=metrics, seconds=seconds,
                       info=info or {})


def test_summarize_best_per_batch():
    batches = [
        [
            rec("a", 0, rouge1=0.5, token_recall=0.9),
            rec("b", 0, rouge1=0.5, token_recall=1.0),
            rec("bag", 0, token_recall=1.0),
        ],
        [
            rec("a", 1, rouge1=0.8, token_recall=0.8),
            rec("b", 1, status="failed", seconds=3.0),
            rec("bag", 1, token_recall=1.0),
        ],
        [
            rec("a", 2, rouge1=0.1, token_recall=0.2, info={"attacker_pick": 1}),
            rec("b", 2, status="timeout", seconds=2.0, info={"partial_rouge1": 0.9}),
            rec("bag", 2, token_recall=1.0),
        ],
    ]
    out = {e["attack"]: e for e in summarize(batches, ["bag", "a", "b"], with_best=True)}
    assert out["a"]["rouge1"] == pytest.approx(1.4 / 3, abs=1e-6) and out["a"]["n_sentences"] == 6
    # a timed-out attack is missing evidence: its partial 0.9 counts nowhere
    assert out["b"]["n_sentences"] == 2 and out["b"]["rouge1"] == 0.5
    assert out["b"]["status_counts"] == {"ok": 1, "timeout": 1, "skipped": 0, "failed": 1, "lower_bound": 0}
    assert out["b"]["seconds_per_batch"] == 2.0
    assert out["bag"]["rouge1"] is None and out["bag"]["token_recall"] == 1.0
    best = out[BEST]
    assert best["best_of"] == {"b": 1, "a": 2}  # batch 0: tie on rouge1, b wins on token recall
    assert best["rouge1"] == pytest.approx(1.4 / 3, abs=1e-6) and best["token_recall"] == pytest.approx(2.0 / 3, abs=1e-6)
    assert best["seconds_per_batch"] == pytest.approx(4.0)  # (1+1+1 + 1+3+1 + 1+2+1) / 3
    assert best["n_sentences"] == 6
    assert best["status_counts"] == {"ok": 3, "timeout": 1, "skipped": 0, "failed": 0, "lower_bound": 0}  # batch 2 is marked
    pick = out[PICK_ROW]  # only batch 2 has a record with the attacker's mark
    assert pick["best_of"] == {"a": 1} and pick["rouge1"] == pytest.approx(0.1)
    assert pick["status_counts"] == {"ok": 1, "timeout": 1, "skipped": 0, "failed": 2, "lower_bound": 0}


def test_lower_bound_batches_are_counted_in_the_means_and_named_in_the_table():
    batches = [[rec("a", 0, rouge1=0.4, info={"lower_bound": "read where our attack is weak"})], [rec("a", 1, rouge1=0.6)]]
    (a,) = summarize(batches, ["a"])
    assert a["status_counts"] == {"ok": 2, "timeout": 0, "skipped": 0, "failed": 0, "lower_bound": 1}
    assert a["rouge1"] == pytest.approx(0.5)  # as read: the mark says the value is a lower bound
    row = {"data": "d", "view": "lora", "batch_size": 2, "dropout": "off", "params_fraction": 0.01, "reference": None,
           "seconds_per_batch": 1.0, **a}
    assert "| 2 ok (1 lower bound) |" in rows_markdown([row], "leak-audit bench text")


def test_small_parsers():
    assert parse_batch_sizes("1, 4,16") == [1, 4, 16]
    with pytest.raises(BenchError, match="must be >= 1"):
        parse_batch_sizes("0")
    names, best = parse_attacks("best", registered=["x", "y"])
    assert names == ["x", "y"] and best
    assert parse_attacks("y", registered=["x", "y"]) == (["y"], False)
    rows = [(str(i), 0) for i in range(7)]
    assert [len(b) for b in split_batches(rows, 3)] == [3, 3] and split_batches(rows, 8) == []
    assert reference_for("sst2_dev", "full", 1)[0]["rouge1"] == 0.888
    assert [r["source"] for r in reference_for("cola_dev", "full", 4)] == ["DAGER"]
    assert reference_for("cola_dev", "layer:0", 1) is None and reference_for("imdb", "full", 1) is None


def test_lora_rows_at_initialisation_and_after_training(minilm_path, tmp_path):
    """LoRA r=8 on query/value, B=1, the two shortest of the first CoLA sentences: at step 0 (B = 0) the
    span check reads lora_B's rank deficit, after 3 AdamW steps the lora_A gradients; both exact."""
    short = tmp_path / "short.tsv"
    short.write_text("sentence\tlabel\nBill left.\t1\nThe dog barked.\t1\n")
    out = tmp_path / "lora.json"
    argv = ["bench", "text", "--data", str(short), "--n", "2", "--batch-sizes", "1", "--views", "lora",
            "--attacks", "span_check", "--lora-r", "8", "--lora-steps", "0,3", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["lora_steps"], r["lora_r"], r["n_sentences"]) for r in rows] == [(0, 8, 2), (3, 8, 2)]
    assert all(r["exact_match"] == 1.0 and r["rouge1"] == 1.0 for r in rows)
    assert rows[0]["params_fraction"] < 0.004  # the 24 adapter matrices alone


def test_decoder_lora_rows_on_smollm2(smollm2_path, tmp_path):
    """LoRA r=8 on SmolLM2 (the default targets resolve to q_proj/v_proj), causal LM, B=1, two short CoLA
    sentences: nothing at initialisation, every token but the last after 20 AdamW steps."""
    short = tmp_path / "short.tsv"
    short.write_text("sentence\tlabel\nBill left the room.\t1\nThe dog barked at the cat.\t1\n")
    out = tmp_path / "lora.json"
    argv = ["bench", "text", "--model", "smollm2", "--task", "causal-lm", "--data", str(short), "--n", "2",
            "--batch-sizes", "1", "--views", "lora", "--attacks", "span_decoder", "--lora-r", "8",
            "--lora-steps", "0,20", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["lora_steps"], r["lora_targets"], r["task"]) for r in rows] == [
        (0, ["q_proj", "v_proj"], "causal-lm"), (20, ["q_proj", "v_proj"], "causal-lm")]
    assert rows[0]["token_recall"] == 0.0
    assert rows[1]["token_recall"] >= 0.8 and rows[1]["token_precision"] == 1.0
    assert rows[1]["rouge_batches"] == 2  # both batches came back as sentences (up to their last token)


def test_bench_overhead_smoke(minilm_path, cola_file, tmp_path):
    """``bench overhead`` end to end on CoLA: a baseline and an audit run per worker kind, timed steps,
    finished audits.

    Two fast attacks and one training thread keep it short: the default span attacks take tens of seconds
    per audit on 2 cores, and two training threads on 2 busy cores ran ~6x slower per step than one."""
    out = tmp_path / "overhead.json"
    argv = ["bench", "overhead", "--data", str(cola_file), "--steps", "12", "--every-n-steps", "4", "--repeats", "1",
            "--warmup", "2", "--batch-size", "4", "--attacks", "token_bag,labels", "--train-threads", "1",
            "--worker", "thread,process", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = {r["setting"]: r for r in report["rows"]}
    assert set(rows) == {"baseline", "audit (thread worker)", "audit (process worker)"}
    assert report["settings"]["workers"] == ["thread", "process"]
    assert report["settings"]["torch"] and report["settings"]["train_threads"] == 1
    assert report["settings"]["attacks"] == ["token_bag", "labels"]
    for r in rows.values():
        assert r["timed_steps"] == 10
        assert r["steps_per_second_median"] > 0 and r["steps_per_second_mean"] > 0
        assert r["ratio_mean"] > 0 and len(r["ratio_per_repeat"]) == 1
    assert rows["baseline"]["ratio_mean"] == 1.0 and rows["baseline"]["audits"] is None
    for kind in ("thread", "process"):
        audit = rows[f"audit ({kind} worker)"]
        assert audit["audits"] == 3  # steps 0, 4, 8
        assert audit["audits_ok"] >= 1 and audit["audits_failed"] == 0 and audit["audits_unfinished"] == 0
        assert audit["audits_ok"] + audit["audits_skipped"] == 3
        assert audit["audit_latency_p50_seconds"] > 0 and audit["capture_ms_per_audit"] > 0


def test_bench_overhead_missing_data_exits_2(tmp_path, capsys, monkeypatch):
    assert main(["bench", "overhead", "--data", str(tmp_path / "none.tsv"), "--steps", "4"]) == 2
    assert "none.tsv" in capsys.readouterr().err
    (tmp_path / "one.tsv").write_text("sentence\tlabel\nA cat sat.\t1\n")
    assert main(["bench", "overhead", "--data", str(tmp_path / "one.tsv"), "--steps", "8", "--worker", "thread,fork"]) == 2
    assert "--worker must be among thread, process, got 'fork'" in capsys.readouterr().err
    monkeypatch.setenv("LEAK_AUDIT_DATA", str(tmp_path / "empty"))  # the default file is absent too
    assert main(["bench", "overhead", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "cola_dev.tsv" in err and "--data" in err


def test_bench_canary_rows_and_bad_input(tmp_path, capsys):
    out = tmp_path / "canary.json"
    code = main(["bench", "canary", "--noise-multiplier", "1", "--inject-noise-scale", "1,0.1", "--canaries", "500",
                 "--steps", "100", "--json", str(out), "--markdown", str(tmp_path / "canary.md")])
    assert code == 0
    rows = json.loads(out.read_text())
    keys = {"model", "noise_multiplier", "inject_noise_scale", "max_grad_norm", "batch_size", "dataset_size", "steps",
            "canaries", "seed", "epsilon", "epsilon_empirical", "epsilon_empirical_ceiling", "delta", "seconds"}
    assert len(rows) == 2 and all(keys <= set(r) for r in rows)
    honest, faulty = rows
    assert honest["epsilon"] == faulty["epsilon"] and honest["epsilon_empirical"] <= honest["epsilon"]
    assert faulty["epsilon_empirical"] > honest["epsilon_empirical"]
    assert "leak-audit bench canary" in (tmp_path / "canary.md").read_text()
    assert main(["bench", "canary", "--noise-multiplier", "0"]) == 2
    assert "--noise-multiplier: 0 must be > 0" in capsys.readouterr().out
    assert main(["bench", "canary", "--canaries", "300000"]) == 2
    assert "use canaries <= 296706" in capsys.readouterr().out
