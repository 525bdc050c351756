"""The leakage policy (leak_audit.gate.policy) and ``leak-audit gate --policy`` on crafted audit logs."""

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from leak_audit.cli.main import main
from leak_audit.gate.thresholds import GateError, policy_from_args
from leak_audit.gate.policy import AGGREGATIONS, DP_FAULT_NAME, GatePolicy, GateReport, MetricRule, PolicyError, RuleResult
from leak_audit.results.records import CANARY_RECORD, AuditRecord, read_audit_log
from leak_audit.results.sinks import AuditLog

REPO = Path(__file__).resolve().parents[2]
QUERY = "model.bert.encoder.layer.0.attention.self.query"
EMBED = "model.bert.embeddings.word_embeddings"

# Per step: span_check (query module) and token_bag (embeddings), every ok record carries epsilon.
#   step                 0     10    20    30
#   span_check rouge1    0.2   0.6   0.4   0.3
#   token_bag  rouge1    0.1   0.3   0.45  0.2     -> per-step max 0.2, 0.6, 0.45, 0.3
#   token_bag  token_recall 0.5 0.9  0.7   0.8
#   span_check label_accuracy 1.0 0.9 0.75 0.8
#   token_bag  label_accuracy 0.5  -    -   0.7    -> per-step min 0.5, 0.9, 0.75, 0.7
#   epsilon              1.0   2.0   3.0   4.0
SPAN = {0: (0.2, 1.0), 10: (0.6, 0.9), 20: (0.4, 0.75), 30: (0.3, 0.8)}
BAG = {0: (0.1, 0.5, 0.5), 10: (0.3, 0.9, None), 20: (0.45, 0.7, None), 30: (0.2, 0.8, 0.7)}
EPS = {0: 1.0, 10: 2.0, 20: 3.0, 30: 4.0}


def records():
    out = []
    for step in (0, 10, 20, 30):
        privacy = {"epsilon": EPS[step], "delta": 1e-5}
        r1, acc = SPAN[step]
        out.append(
            AuditRecord(step=step, attack="span_check", status="ok", modules=[QUERY], batch_size=4,
                        metrics={"rouge1": r1, "label_accuracy": acc, "exact_match": 0.0}, privacy=privacy)
        )
        r1, recall, acc = BAG[step]
        metrics = {"rouge1": r1, "token_recall": recall} | ({} if acc is None else {"label_accuracy": acc})
        out.append(
            AuditRecord(step=step, attack="token_bag", status="ok", modules=[EMBED], batch_size=4,
                        metrics=metrics, privacy=privacy)
        )
    # failed and skipped records never count, whatever they carry
    out.append(AuditRecord(step=30, attack="labels", status="failed", modules=[QUERY], metrics={"rouge1": 0.99}))
    out.append(AuditRecord(step=40, attack="span_check", status="skipped", modules=[QUERY], metrics={"rouge1": 0.99}))
    return out


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "audit.jsonl"
    w = AuditLog(path)
    w.write(records())
    w.close()
    return path


@pytest.fixture
def recs(log):
    return read_audit_log(log)


def write_policy(tmp_path, text, name="policy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def one(recs, **kw) -> RuleResult:
    report = GatePolicy((MetricRule(**kw),)).evaluate(recs)
    assert len(report.results) == 1
    return report.results[0]


# ---------------------------------------------------------------- evaluation semantics
def test_aggregations_give_the_hand_computed_numbers(recs):
    r = one(recs, metric="rouge1", max=0.5)
    assert (r.status, r.value, r.where, r.records) == ("fail", 0.6, "span_check@step 10", 8)
    assert r.message == "rouge1 = 0.6 (max over 4 audits; worst span_check@step 10) > max 0.5"
    r = one(recs, metric="rouge1", max=0.5, aggregation="last")
    assert (r.status, r.value, r.where) == ("pass", 0.3, "")
    assert "last of 4 audits, step 30" in r.message
    r = one(recs, metric="rouge1", max=0.5, aggregation="mean_last_k", k=3)  # (0.6 + 0.45 + 0.3) / 3
    assert r.status == "pass" and r.value == pytest.approx(0.45)
    assert "mean of the last 3 of 4 audits, steps 10-30" in r.message
    r = one(recs, metric="rouge1", max=0.5, aggregation="mean_last_k", k=2)
    assert r.value == pytest.approx(0.375)
    r = one(recs, metric="rouge1", max=0.5, aggregation="mean_last_k", k=10)  # fewer steps than k: all of them
    assert r.value == pytest.approx((0.2 + 0.6 + 0.45 + 0.3) / 4)
    r = one(recs, metric="rouge1", max=0.5, aggregation="min")
    assert (r.value, r.where) == (0.2, "span_check@step 0")


def test_runs_appended_to_one_log_are_aggregated_apart():
    """Two fits in one log share step numbers: a later, cleaner run must not hide an earlier one's breach from
    ``last``/``mean_last_k`` (each run aggregated on its own, then the worst run), and ``max`` names the run."""
    def rec(run, step, value):
        return AuditRecord(step=step, attack="span_check", status="ok", metrics={"rouge1": value}, run=run)

    both = [rec("r1", 10, 0.9), rec("r2", 10, 0.1), rec("r2", 20, 0.1)]
    r = one(both, metric="rouge1", max=0.5, aggregation="last")  # per step alone: step 20's 0.1 would pass
    assert (r.status, r.value) == ("fail", 0.9)
    assert "worst of 2 runs: run r1, last of 1 audit, step 10" in r.message
    r = one(both, metric="rouge1", max=0.5, aggregation="mean_last_k", k=2)  # steps 10-20 mixed: 0.5 would pass
    assert (r.status, r.value) == ("fail", 0.9)
    r = one(both, metric="rouge1", max=0.5)
    assert r.where == "span_check@step 10 of run r1" and "max over 3 audits" in r.message
    r = one(both, metric="rouge1", min=0.05, aggregation="last")  # a min rule: the lowest run is the worst
    assert (r.value, r.status) == (0.1, "pass") and "run r2" in r.message
    assert "worst of" not in one(both[1:], metric="rouge1", max=0.5, aggregation="last").message  # one run


def test_min_rule_takes_the_per_step_minimum_across_attacks(recs):
    r = one(recs, metric="label_accuracy", min=0.6)
    assert (r.status, r.value, r.where) == ("fail", 0.5, "token_bag@step 0")
    assert r.message.endswith("< min 0.6")
    r = one(recs, metric="label_accuracy", min=0.6, aggregation="last")  # step 30: min(0.8, 0.7)
    assert (r.status, r.value) == ("pass", 0.7)
    r = one(recs, metric="label_accuracy", min=0.6, warn=0.8, aggregation="last")
    assert r.status == "warn" and "< warn 0.8 (limit: min 0.6)" in r.message


def test_warn_only_passes_the_gate(recs):
    rule = MetricRule("rouge1", max=0.5, warn=0.4, aggregation="mean_last_k", k=3)
    assert rule.name == "rouge1" and rule.aggregation == "mean_last_k"
    report = GatePolicy((rule,)).evaluate(recs)
    assert report.verdict == "warn" and report.passed and report.exit_code == 0 and report.breaches() == []


def test_fail_beats_warn_and_breaches_lists_only_failures(recs):
    policy = GatePolicy(
        (MetricRule("rouge1", max=0.7, warn=0.5), MetricRule("token_recall", max=0.85), MetricRule("exact_match", max=0.1))
    )
    report = policy.evaluate(recs)
    assert [r.status for r in report.results] == ["warn", "fail", "pass"]
    assert report.verdict == "fail" and not report.passed and report.exit_code == 1
    assert [r.rule.metric for r in report.breaches()] == ["token_recall"]


def test_scope_by_attack_module_and_step_changes_the_verdict(recs):
    assert one(recs, metric="rouge1", max=0.5).status == "fail"
    r = one(recs, metric="rouge1", max=0.5, attacks=("token_bag",))
    assert (r.status, r.value, r.where, r.records) == ("pass", 0.45, "token_bag@step 20", 4)
    assert r.rule.name == "rouge1[attack=token_bag]"
    assert one(recs, metric="rouge1", max=0.5, modules=("*.attention.self.query",)).status == "fail"
    r = one(recs, metric="rouge1", max=0.5, modules=("*.embeddings.*", "*.classifier"))
    assert (r.status, r.value) == ("pass", 0.45)
    r = one(recs, metric="rouge1", max=0.5, steps=(20, None))
    assert (r.status, r.value, r.rule.name) == ("pass", 0.45, "rouge1[step=20..]")
    assert one(recs, metric="rouge1", max=0.5, steps=(None, 10)).status == "fail"
    assert one(recs, metric="rouge1", max=0.5, steps=(0, 0)).value == 0.2  # inclusive on both ends


def test_missing_metric_fails_with_a_message(recs):
    r = one(recs, metric="psnr", max=20)
    assert (r.status, r.value, r.records, r.where) == ("fail", None, 0, "")
    assert r.message.startswith("psnr: no successful audit reports it")
    r = one(recs, metric="rouge1", max=0.5, steps=(11, 19))  # a scope with no audit
    assert r.status == "fail" and "no successful audit in scope (step=11..19)" in r.message
    r = one(recs, metric="rouge1", max=0.5, attacks=("span_chek",))  # a typo fails closed, naming what exists
    assert r.status == "fail" and "attacks with successful audits: span_check, token_bag" in r.message


def test_lower_bound_readings_count_toward_a_breach_never_toward_a_pass(recs):
    """An ok record marked ``info["lower_bound"]`` (an attack run where it reads far less than published ones, e.g.
    span_check on LoRA adapters at B > 1): its value never lets a rule pass, and beyond a max limit it is a breach."""
    why = "LoRA adapters at B > 1: tokens without their sentences"
    lora = [AuditRecord(step=s, attack="span_check", status="ok", modules=[QUERY], batch_size=4,
                        metrics={"rouge1": v, "token_recall": 0.7}, info={"lower_bound": why})
            for s, v in ((0, 0.30), (10, 0.42))]
    exact_bag = [AuditRecord(step=s, attack="token_bag", status="ok", modules=[EMBED], batch_size=4,
                             metrics={"token_recall": 1.0}) for s in (0, 10)]
    # only lower bounds report rouge1: missing evidence, not a pass, and the message says why
    r = one(lora + exact_bag, metric="rouge1", max=0.5)
    assert (r.status, r.value, r.records, r.lower_bounds) == ("fail", None, 0, 2)
    assert "lower bounds only, never evidence of a pass: span_check" in r.message
    assert r.only_lower_bounds and r.value_text == "lower bounds" and r.to_dict()["lower_bounds"] == 2
    report = GatePolicy((MetricRule(metric="rouge1", max=0.5),)).evaluate(lora + exact_bag)
    assert report.measured().verdict == "fail"  # what a run in progress logs: more audits cannot make it pass
    assert one(exact_bag, metric="rouge1", max=0.5).value_text == "missing"  # no evidence at all
    # a lower bound already beyond the limit proves the breach
    r = one(lora + exact_bag, metric="rouge1", max=0.4)
    assert (r.status, r.value, r.where) == ("fail", 0.42, "span_check@step 10")
    assert "result of span_check@step 10, run where it reads less than published attacks: a lower bound" in r.message
    # beside measured values the lower bounds are left out of the value and named in the message
    r = one(lora + exact_bag, metric="token_recall", max=1.0)
    assert (r.status, r.value, r.records, r.lower_bounds) == ("pass", 1.0, 2, 2)
    assert "2 lower-bound readings not counted" in r.message and not r.only_lower_bounds
    # the same records without the mark are ordinary measurements
    plain = [AuditRecord(step=x.step, attack=x.attack, status="ok", modules=x.modules, batch_size=4, metrics=x.metrics)
             for x in lora]
    assert one(plain, metric="rouge1", max=0.5).status == "pass"


def test_epsilon_comes_from_the_privacy_field(recs):
    r = one(recs, metric="epsilon", max=3.5)
    assert (r.status, r.value, r.where, r.records) == ("fail", 4.0, "span_check@step 30", 8)
    assert one(recs, metric="epsilon", max=8.0).status == "pass"
    assert one(recs, metric="epsilon", max=3.5, steps=(None, 20)).status == "pass"
    no_dp = [AuditRecord(step=0, attack="a", status="ok", metrics={"rouge1": 0.1})]
    r = one(no_dp, metric="epsilon", max=8)
    assert r.status == "fail" and "DP-SGD" in r.message
    inf_eps = [AuditRecord(step=0, attack="a", status="ok", privacy={"epsilon": None, "error": "no privacy: noise multiplier 0 (epsilon = inf)"})]
    r = one(inf_eps, metric="epsilon", max=8)
    assert r.value is None and r.status == "fail" and "privacy.epsilon null: no privacy" in r.message


def test_canaries_add_the_dp_fault_check_and_empirical_epsilon_rules():
    def rec(step, eps, low):
        return AuditRecord(step=step, attack="a", status="ok", metrics={"rouge1": 0.1},
                           privacy={"epsilon": eps, "epsilon_empirical": low, "epsilon_empirical_gdp": low,
                                    "canaries": 1000})

    policy = GatePolicy.from_thresholds({"rouge1": 0.5})
    honest = policy.evaluate([rec(0, 1.0, 0.2), rec(10, 3.5, 0.9)])
    fault = [r for r in honest.results if r.rule.name == DP_FAULT_NAME]
    assert honest.verdict == "pass" and len(fault) == 1 and fault[0].value == pytest.approx(0.9 - 3.5)  # the last audit
    faulty = policy.evaluate([rec(0, 1.0, 0.2), rec(10, 3.5, 4.2)])
    (breach,) = faulty.breaches()
    assert breach.rule.name == DP_FAULT_NAME and breach.value == pytest.approx(0.7)
    assert "epsilon_excess = 0.7" in breach.message and "> max 0" in breach.message
    assert faulty.exit_code == 1
    # without canaries there is no such check; epsilon_empirical is a rule metric like epsilon
    plain = [AuditRecord(step=0, attack="a", status="ok", metrics={"rouge1": 0.1}, privacy={"epsilon": 1.0})]
    assert [r.rule.name for r in policy.evaluate(plain).results] == ["rouge1"]
    report = GatePolicy((MetricRule("epsilon_empirical", max=0.5),)).evaluate([rec(0, 3.5, 0.9)])
    assert [r.status for r in report.results] == ["fail", "pass"]  # the rule, then the fault check


def test_the_dp_fault_check_reads_the_canaries_closing_record_over_the_whole_run():
    def rec(step, eps, low, attack="span_check"):
        return AuditRecord(step=step, attack=attack, status="ok", metrics={} if attack == CANARY_RECORD else {"rouge1": 0.1},
                           privacy={"epsilon": eps, "epsilon_empirical": low, "canaries": 1000})

    policy = GatePolicy.from_thresholds({"rouge1": 0.5})
    # the audits saw no excess; the run's last steps (after the last audit) did
    report = policy.evaluate([rec(0, 1.0, 0.2), rec(10, 3.5, 0.9), rec(16, 4.0, 4.6, CANARY_RECORD)])
    (breach,) = report.breaches()
    assert breach.rule.name == DP_FAULT_NAME and breach.value == pytest.approx(0.6) and "step 16" in breach.message
    # and the other way round: a closing record within the accountant's bound passes the run
    fine = policy.evaluate([rec(0, 1.0, 0.2), rec(10, 3.5, 0.9), rec(16, 4.0, 1.1, CANARY_RECORD)])
    assert fine.verdict == "pass"
    rouge = next(r for r in fine.results if r.rule.metric == "rouge1")
    assert "over 2 audits" in rouge.message  # the closing record has no metrics: it is no audit of rouge1


def test_value_is_shown_precisely_enough_to_justify_the_verdict():
    recs = [AuditRecord(step=0, attack="a", status="ok", privacy={"epsilon": 8.00001})]
    r = one(recs, metric="epsilon", max=8)
    assert r.status == "fail" and r.value_text == "8.00001" and r.message.endswith("8.00001 (max over 1 audit; worst a@step 0) > max 8")


def test_no_successful_audit_raises_gate_error(recs):
    policy = GatePolicy.from_thresholds({"rouge1": 0.5})
    with pytest.raises(GateError, match=r"no successful audit \(record statuses: failed, skipped\)"):
        policy.evaluate([r for r in recs if r.status != "ok"])
    with pytest.raises(GateError, match=r"record statuses: none"):
        policy.evaluate([])


def test_max_thresholds_are_the_max_policy(recs):
    policy = policy_from_args(None, ["rouge1=0.5", "token_recall=0.95"])
    assert policy == GatePolicy.from_thresholds({"rouge1": 0.5, "token_recall": 0.95})
    report = policy.evaluate(recs)
    assert [(r.rule.metric, r.rule.aggregation, r.status) for r in report.results] == [
        ("rouge1", "max", "fail"), ("token_recall", "max", "pass")
    ]
    assert all(r.aggregation == "max" for r in GatePolicy.from_thresholds({"epsilon": 8}).rules)


# ---------------------------------------------------------------- policy files and validation
def test_example_policy_loads():
    policy = GatePolicy.from_toml(REPO / "examples" / "leak-policy.toml")
    assert [(r.metric, r.direction, r.threshold, r.warn, r.aggregation) for r in policy.rules] == [
        ("rouge1", "max", 0.5, 0.3, "max"),
        ("token_recall", "max", 0.9, None, "mean_last_k"),
        ("exact_match", "max", 0.1, None, "max"),
    ]  # its epsilon rule is commented out: a run without DP-SGD would fail it
    assert policy.rules[1].k == 3


def test_policy_file_with_every_key(tmp_path, recs):
    path = write_policy(
        tmp_path,
        """
[[rule]]
metric = "rouge1"
max = 0.5
warn = 0.3
aggregation = "max"
attacks = ["span_check", "token_bag"]
modules = ["*.embeddings.*"]
step_min = 10
step_max = 30
name = "rouge1 of the embedding tap"

[[rule]]
metric = "label_accuracy"
min = 0.4
aggregation = "mean_last_k"
k = 2
""",
    )
    rule, acc = GatePolicy.from_toml(path).rules
    assert rule.steps == (10, 30) and rule.attacks == ("span_check", "token_bag") and rule.modules == ("*.embeddings.*",)
    report = GatePolicy.from_toml(path).evaluate(recs)
    assert [(r.status, r.value) for r in report.results] == [("warn", 0.45), ("pass", pytest.approx(0.725))]
    assert report.results[0].rule.name == "rouge1 of the embedding tap"


def test_coerce():
    policy = GatePolicy.from_thresholds({"rouge1": 0.5})
    assert GatePolicy.coerce(None) is None and GatePolicy.coerce(policy) is policy
    example = REPO / "examples" / "leak-policy.toml"
    assert GatePolicy.coerce(example) == GatePolicy.coerce(str(example)) == GatePolicy.from_toml(example)
    assert GatePolicy.coerce({"rule": [{"metric": "rouge1", "max": 0.5}]}) == policy
    with pytest.raises(TypeError):
        GatePolicy.coerce(0.5)


MALFORMED = {
    "syntax": ('[[rule]\nmetric = "rouge1"\n', r"policy\.toml: TOML syntax error: .*line 1"),
    "unknown_key": ('[[rule]]\nmetric = "rouge1"\nmaxx = 0.5\n', r"rule 1 \(rouge1\): unknown key 'maxx'\. Did you mean max"),
    "unknown_top_key": ('[[rules]]\nmetric = "rouge1"\nmax = 0.5\n', r"unknown top-level key 'rules'\. Did you mean rule"),
    "unknown_metric": ('[[rule]]\nmetric = "rogue1"\nmax = 0.5\n', r"unknown metric 'rogue1'\. Did you mean rouge1"),
    "both": ('[[rule]]\nmetric = "rouge1"\nmax = 0.5\nmin = 0.1\n', r"exactly one of max .* or min .*, got both"),
    "neither": ('[[rule]]\nmetric = "rouge1"\nwarn = 0.5\n', r"exactly one of max .* got neither"),
    "warn_above_max": ('[[rule]]\nmetric = "rouge1"\nmax = 0.5\nwarn = 0.7\n', r"warn 0\.7 must be <= max 0\.5"),
    "warn_below_min": ('[[rule]]\nmetric = "rouge1"\nmin = 0.5\nwarn = 0.3\n', r"warn 0\.3 must be >= min 0\.5"),
    "aggregation": ('[[rule]]\nmetric = "rouge1"\nmax = 0.5\naggregation = "mean_last"\n', r"unknown aggregation 'mean_last'\. Did you mean mean_last_k"),
    "k_zero": ('[[rule]]\nmetric = "rouge1"\nmax = 0.5\naggregation = "mean_last_k"\nk = 0\n', r"k must be an integer >= 1"),
    "k_without_mean": ('[[rule]]\nmetric = "rouge1"\nmax = 0.5\nk = 3\n', r"k applies only to aggregation"),
    "step_range": ('[[rule]]\nmetric = "rouge1"\nmax = 0.5\nstep_min = 10\nstep_max = 5\n', r"empty step range"),
    "string_max": ('[[rule]]\nmetric = "rouge1"\nmax = "0.5"\n', r"max must be a finite number"),
    "nan_max": ('[[rule]]\nmetric = "rouge1"\nmax = nan\n', r"max must be a finite number"),
    "no_rules": ("# nothing\n", r"no rules"),
    "table_not_array": ('[rule]\nmetric = "rouge1"\nmax = 0.5\n', r"write \[\[rule\]\], not \[rule\]"),
    "second_rule": ('[[rule]]\nmetric = "rouge1"\nmax = 0.5\n[[rule]]\nmax = 0.5\n', r"rule 2: missing key 'metric'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_policy_is_a_policy_error_and_exit_2(case, tmp_path, log, capsys):
    text, pattern = MALFORMED[case]
    path = write_policy(tmp_path, text)
    with pytest.raises(PolicyError, match=pattern):
        GatePolicy.from_toml(path)
    assert main(["gate", str(log), "--policy", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leak-audit gate: error: ")
    assert re.search(pattern, err)


def test_rule_validation_in_the_api():
    with pytest.raises(PolicyError, match="Did you mean token_recall"):
        MetricRule("token_recal", max=0.5)
    with pytest.raises(PolicyError, match="got both"):
        MetricRule("rouge1", max=0.5, min=0.1)
    with pytest.raises(PolicyError, match="must be <= max"):
        MetricRule("rouge1", max=0.5, warn=0.6)
    with pytest.raises(PolicyError, match="Valid: " + ", ".join(AGGREGATIONS)):
        MetricRule("rouge1", max=0.5, aggregation="median")
    with pytest.raises(PolicyError, match="k must be"):
        MetricRule("rouge1", max=0.5, aggregation="mean_last_k", k=0)
    with pytest.raises(PolicyError, match="empty step range"):
        MetricRule("rouge1", max=0.5, steps=(5, 1))
    with pytest.raises(PolicyError, match="no rules"):
        GatePolicy(())
    assert issubclass(PolicyError, GateError) and issubclass(PolicyError, ValueError)
    assert MetricRule("rouge1", min=0.1).aggregation == "min"
    assert MetricRule("rouge1", max=0.5, attacks=["a"], modules=["*.q"]).attacks == ("a",)  # lists become tuples
    with pytest.raises(PolicyError, match="policy file not found"):
        GatePolicy.from_toml("/nonexistent/policy.toml")


# ---------------------------------------------------------------- the command line
def test_cli_pass_breach_warn_and_missing(tmp_path, log, capsys):
    ok = write_policy(tmp_path, '[[rule]]\nmetric = "rouge1"\nmax = 0.7\n', "ok.toml")
    assert main(["gate", str(log), "--policy", str(ok)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("verdict: PASS")

    breach = write_policy(tmp_path, '[[rule]]\nmetric = "rouge1"\nmax = 0.5\n', "breach.toml")
    assert main(["gate", str(log), "--policy", str(breach)]) == 1
    out = capsys.readouterr().out
    assert "FAIL rouge1 = 0.6 (max over 4 audits; worst span_check@step 10) > max 0.5" in out
    assert out.rstrip().endswith("verdict: BREACH")

    warn = write_policy(tmp_path, '[[rule]]\nmetric = "rouge1"\nmax = 0.7\nwarn = 0.5\n', "warn.toml")
    assert main(["gate", str(log), "--policy", str(warn)]) == 0
    out = capsys.readouterr().out
    assert "WARN rouge1 = 0.6" in out and "> warn 0.5 (limit: max 0.7)" in out
    assert out.rstrip().endswith("verdict: WARN")

    assert main(["gate", str(log), "--policy", str(ok), "--max", "psnr=20"]) == 1  # rules are appended
    out = capsys.readouterr().out
    assert "FAIL psnr: no successful audit reports it" in out and "verdict: BREACH" in out

    scoped = write_policy(tmp_path, '[[rule]]\nmetric = "rouge1"\nmax = 0.5\nattacks = ["token_bag"]\n', "scoped.toml")
    assert main(["gate", str(log), "--policy", str(scoped)]) == 0
    assert "rouge1[attack=token_bag]" in capsys.readouterr().out  # the table shows the scope, not markup


def test_cli_bad_input_exits_2(tmp_path, log, capsys):
    policy = write_policy(tmp_path, '[[rule]]\nmetric = "rouge1"\nmax = 0.5\n')
    assert main(["gate", str(log)]) == 2
    assert "give a policy (--policy" in capsys.readouterr().err
    assert main(["gate", str(tmp_path / "nope.jsonl"), "--policy", str(policy)]) == 2
    assert "audit log not found" in capsys.readouterr().err
    assert main(["gate", str(log), "--policy", str(tmp_path / "nope.toml")]) == 2
    assert "policy file not found" in capsys.readouterr().err
    failed_only = tmp_path / "failed.jsonl"
    failed_only.write_text(AuditRecord(step=0, attack="a", status="failed").to_json() + "\n")
    assert main(["gate", str(failed_only), "--policy", str(policy)]) == 2
    assert "no successful audit" in capsys.readouterr().err
    assert main(["gate", str(log), "--max", "rouge1=nan"]) == 2
    assert main(["gate", str(log), "--policy", str(policy), "--output", str(tmp_path / "x.txt")]) == 2
    assert "--output writes a json or junit report" in capsys.readouterr().err
    assert main(["gate", str(log), "--policy", str(policy), "--format", "yaml"]) == 2


def test_cli_json(tmp_path, log, capsys):
    policy = write_policy(
        tmp_path,
        '[[rule]]\nmetric = "rouge1"\nmax = 0.7\nwarn = 0.5\n'
        '[[rule]]\nmetric = "token_recall"\nmax = 0.75\naggregation = "mean_last_k"\nk = 3\nstep_min = 10\n',
    )
    assert main(["gate", str(log), "--policy", str(policy), "--max", "exact_match=0.1", "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)  # stdout is the document alone
    assert (doc["verdict"], doc["exit_code"]) == ("fail", 1)
    assert [(r["name"], r["status"]) for r in doc["results"]] == [
        ("rouge1", "warn"),
        ("token_recall[step=10..]", "fail"),  # (0.9 + 0.7 + 0.8) / 3
        ("exact_match", "pass"),
    ]
    recall = doc["results"][1]
    assert recall["value"] == pytest.approx(0.8)
    assert (recall["direction"], recall["threshold"], recall["aggregation"], recall["k"], recall["records"]) == (
        "max", 0.75, "mean_last_k", 3, 3
    )
    assert recall["scope"] == {"attacks": [], "modules": [], "step_min": 10, "step_max": None}
    assert doc["results"][0]["where"] == "span_check@step 10" and doc["results"][0]["warn"] == 0.5


def test_cli_junit_and_output_file(tmp_path, log, capsys):
    policy = write_policy(
        tmp_path,
        '[[rule]]\nmetric = "rouge1"\nmax = 0.7\nwarn = 0.5\n'
        '[[rule]]\nmetric = "token_recall"\nmax = 0.85\n'
        '[[rule]]\nmetric = "exact_match"\nmax = 0.1\n'
        '[[rule]]\nmetric = "psnr"\nmax = 20\n',
    )
    out_file = tmp_path / "reports" / "gate.xml"
    out_file.parent.mkdir()
    assert main(["gate", str(log), "--policy", str(policy), "--format", "junit", "--output", str(out_file)]) == 1
    stdout = capsys.readouterr().out
    assert "verdict: BREACH" in stdout and "<testsuites" not in stdout  # the table on stdout, XML in the file
    root = ET.parse(out_file).getroot()
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures")) == ("4", "2")
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "leak-audit gate"
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": "4", "failures": "2", "errors": "0", "skipped": "0"
    }
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["rouge1", "token_recall", "exact_match", "psnr"]
    assert {c.get("classname") for c in cases} == {"leak_audit.gate.thresholds"}
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["token_recall", "psnr"]
    failure = cases[1].find("failure")
    assert failure.get("type") == "LeakageThresholdExceeded"
    assert failure.get("message") == "token_recall = 0.9 (max over 4 audits; worst token_bag@step 10) > max 0.85"
    assert cases[0].find("system-out").text.startswith("WARN: rouge1 = 0.6")
    assert cases[2].find("system-out") is None and cases[2].find("failure") is None

    assert main(["gate", str(log), "--policy", str(policy), "--format", "junit"]) == 1
    assert ET.fromstring(capsys.readouterr().out.encode()).get("failures") == "2"  # to stdout without --output


def test_report_serialisations_agree(recs):
    report = GatePolicy.from_toml(REPO / "examples" / "leak-policy.toml").evaluate(recs)
    assert isinstance(report, GateReport)
    assert json.loads(report.to_json()) == report.to_dict()
    # rouge1 (max 0.5) breaches at step 10 (0.6); token_recall's mean of the last 3 (0.8) and exact_match pass
    assert report.to_dict()["verdict"] == report.verdict == "fail"
    assert [r.rule.name for r in report.breaches()] == ["rouge1"]
    root = ET.fromstring(report.to_junit().encode())
    assert root.get("failures") == "1" and root.get("tests") == "3"


def test_rule_names_are_unique_and_max_rules_beside_a_file_get_their_own():
    """Names key the report, the warnings, the W&B summary and alerts: two rules may not share one."""
    with pytest.raises(PolicyError, match="two rules are named 'token_recall': give each a distinct name"):
        GatePolicy.from_mapping({"rule": [{"metric": "token_recall", "max": 0.9},
                                          {"metric": "token_recall", "max": 0.5, "aggregation": "last"}]})
    policy = policy_from_args(REPO / "examples" / "leak-policy.toml", ["token_recall=0.5", "psnr=20"])
    assert [r.name for r in policy.rules] == ["rouge1", "token_recall", "exact_match", "token_recall (--max)", "psnr"]
    assert [(r.metric, r.threshold) for r in policy.rules[3:]] == [("token_recall", 0.5), ("psnr", 20.0)]
