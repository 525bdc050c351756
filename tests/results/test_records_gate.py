import json

import pytest

from leak_audit.cli.main import main
from leak_audit.gate.thresholds import GateError, parse_threshold, policy_from_args
from leak_audit.results.records import AuditLogError, AuditRecord, read_audit_log, run_ids, select_run
from leak_audit.results.sinks import AuditLog, flatten_metrics, note_earlier_runs


def rec(attack="span_check", status="ok", step=0, **metrics):
    return AuditRecord(step=step, epoch=0, attack=attack, status=status, modules=["m"], batch_size=4, metrics=metrics)


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "audit.jsonl"
    w = AuditLog(path)
    w.write([rec(rouge1=0.3, token_recall=0.6), rec("token_bag", token_recall=1.0)])
    w.write([rec(step=10, rouge1=0.45), rec("labels", status="failed", step=10)])
    w.close()
    return path


def test_round_trip_and_append_only(log):
    records = read_audit_log(log)
    assert [r.attack for r in records] == ["span_check", "token_bag", "span_check", "labels"]
    assert records[0].metrics == {"rouge1": 0.3, "token_recall": 0.6}
    AuditLog(log).write([rec(step=20, rouge1=0.1)])  # reopening appends
    assert len(read_audit_log(log)) == 5
    assert "samples" not in json.loads(log.read_text().splitlines()[0])


def test_flatten_gives_per_attack_and_worst_case():
    m = flatten_metrics([rec(rouge1=0.3, token_recall=0.6), rec("token_bag", token_recall=1.0), rec("x", "failed")])
    assert m["leak/span_check/rouge1"] == 0.3
    assert m["leak/max/token_recall"] == 1.0
    assert m["audit/failed"] == 1.0


def test_flatten_keeps_the_oracle_and_the_attackers_pick_apart():
    picked = rec("dlg", rouge1=0.2)
    picked.info["attacker_pick"] = 1
    timed_out = rec("gradient_matching", "timeout")
    timed_out.info["partial_rouge1"] = 0.9
    m = flatten_metrics([rec(rouge1=0.7), picked, timed_out])
    assert m["leak/max/rouge1"] == 0.7  # the oracle: the best attack against the truth
    assert m["leak/pick/rouge1"] == 0.2  # what an attacker without the answer keeps
    assert "leak/gradient_matching/rouge1" not in m  # a timed-out attack reports no value
    assert m["audit/timeout"] == 1.0 and m["audit/failed"] == 0.0


def test_gate_verdicts(log):
    records = read_audit_log(log)
    def gate(recs, *maxes):  # what `leak-audit gate --max ...` evaluates
        policy = policy_from_args(None, maxes)
        assert policy is not None
        return policy.evaluate(recs).results

    rows = gate(records, "rouge1=0.5", "token_recall=0.9")
    assert [(r.rule.metric, r.value, r.status) for r in rows] == [("rouge1", 0.45, "pass"), ("token_recall", 1.0, "fail")]
    assert rows[1].where == "token_bag@step 0"
    missing = gate(records, "exact_match=0.5")[0]
    assert missing.value is None and missing.status == "fail"
    with pytest.raises(GateError, match="no successful audit"):
        gate([rec(status="failed")], "rouge1=0.5")
    with pytest.raises(GateError, match="Did you mean .*rouge1"):
        parse_threshold("rouge=0.5")


def test_cli_exit_codes(log, tmp_path, capsys):
    assert main(["gate", str(log), "--max", "rouge1=0.5"]) == 0
    assert main(["gate", str(log), "--max", "rouge1=0.5", "--max", "token_recall=0.9"]) == 1
    out = capsys.readouterr().out
    assert "FAIL token_recall = 1 (max over 1 audit; worst token_bag@step 0) > max 0.9" in out and "BREACH" in out
    assert main(["gate", str(log), "--max", "exact_match=0.5"]) == 1  # missing metric fails
    assert main(["gate", str(tmp_path / "nope.jsonl"), "--max", "rouge1=0.5"]) == 2
    assert main(["gate", str(log), "--max", "rogue1=0.5"]) == 2
    assert main(["gate", str(log), "--max", "rouge1"]) == 2
    assert main(["gate", str(log)]) == 2


def test_the_gate_and_report_judge_every_run_unless_told_which(log, tmp_path, capsys):
    """Two fits that append to one log: the gate judges both (a short run appended after a breach does not pass the
    log) and says so; ``--run last`` judges the last, a run id that run. A log from before runs were named is a run."""
    AuditLog(log, run="20261207T100000Z-a1b2c3").write([rec(step=0, rouge1=0.9, token_recall=0.2)])
    AuditLog(log, run="20261207T110000Z-d4e5f6").write([rec(step=0, rouge1=0.1, token_recall=0.2)])
    records = read_audit_log(log)
    assert run_ids(records) == ["", "20261207T100000Z-a1b2c3", "20261207T110000Z-d4e5f6"]
    assert [r.metrics["rouge1"] for r in select_run(records)] == [0.1]
    assert len(select_run(records, "all")) == 6 and len(select_run(records, "")) == 4
    capsys.readouterr()
    assert main(["gate", str(log), "--max", "rouge1=0.5"]) == 1
    out, err = capsys.readouterr()
    assert "rouge1 = 0.9" in out and "judged all 3 runs in" in err and "6 of 6 records (--run last" in err
    assert main(["gate", str(log), "--max", "rouge1=0.5", "--run", "last"]) == 0
    assert "judged run 20261207T110000Z-d4e5f6 (3 of 3 runs) in" in capsys.readouterr().err
    assert main(["gate", str(log), "--max", "rouge1=0.5", "--run", "20261207T100000Z-a1b2c3"]) == 1
    assert "rouge1 = 0.9" in capsys.readouterr().out
    assert main(["gate", str(log), "--max", "rouge1=0.5", "--run", "all", "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == "fail"  # the notice stays off stdout
    assert main(["gate", str(log), "--max", "rouge1=0.5", "--run", "2026"]) == 2
    err = capsys.readouterr().err
    assert "run '2026' is not in this audit log" in err and "20261207T110000Z-d4e5f6" in err
    assert main(["report", str(log), "-o", str(tmp_path / "r.html"), "--run", "last"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "audit.jsonl, run 20261207T110000Z-d4e5f6 (3 of 3 runs)" in page and "0.900" not in page
    assert "<th>run</th>" not in page  # one run: no run column
    assert main(["report", str(log), "-o", str(tmp_path / "all.html")]) == 0
    page = (tmp_path / "all.html").read_text()
    assert "audit.jsonl, all 3 runs" in page and "0.900" in page
    assert "4 (4 ran, 0 skipped entirely)" in page  # audit 0 at step 0 of each run counted apart
    rows = page.split('id="audits"')[1]
    assert "<th>run</th>" in rows and rows.index("<td>unnamed</td>") < rows.index("<td>20261207T100000Z-a1b2c3</td>") \
        < rows.index("<td>20261207T110000Z-d4e5f6</td>")  # the table names each row's run, runs in log order


def test_a_new_run_is_told_about_earlier_runs_in_its_log(log, tmp_path):
    """The warning counts other runs' records; a missing or malformed log is no reason to stop training (the gate
    names its bad line)."""
    assert note_earlier_runs(tmp_path / "none.jsonl", "r2") == 0
    AuditLog(log, run="r1").write([rec(step=0, rouge1=0.5)])
    with pytest.warns(UserWarning, match=r"already holds 5 records of 2 earlier runs; this run \('r2'\) appends"):
        assert note_earlier_runs(log, "r2") == 5
    with pytest.warns(UserWarning, match="already holds 1 record of 1 earlier run;"):
        assert note_earlier_runs(log, "") == 1  # the unnamed run's own four are not earlier
    with log.open("a") as fh:
        fh.write("{not json\n")
    assert note_earlier_runs(log, "r2") == 0


def test_cli_names_the_malformed_line(log, capsys):
    with log.open("a") as fh:
        fh.write('{"schema": 1, "step": 3, "attack": "x", "status": "ok", "metrics": {}}\n')
        fh.write('{"schema": 1, "step": 4, "attack": "x", "status"\n')
    assert main(["gate", str(log), "--max", "rouge1=0.5"]) == 2
    err = capsys.readouterr().err
    assert "audit.jsonl:6: not valid JSON" in err
    with pytest.raises(AuditLogError) as exc:
        read_audit_log(log)
    assert exc.value.line == 6


@pytest.mark.parametrize(("field", "value"), [("audit", "<i>3</i>"), ("epoch", 1.5), ("batch_size", True),
                                               ("seconds", "fast"), ("modules", ["ok", 3]), ("info", [])])
def test_reader_rejects_fields_of_the_wrong_type(tmp_path, field, value):
    """Readers (gate, report) rely on the schema's types: a string audit number would reach the HTML report."""
    import json

    path = tmp_path / "audit.jsonl"
    line = {"schema": 1, "step": 0, "attack": "x", "status": "ok", "metrics": {}, field: value}
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(AuditLogError, match=f"audit.jsonl:1: field '{field}'"):
        read_audit_log(path)


def test_gate_imports_nothing_heavy(log):
    """The CI gate reads a log: it must not pay for torch, Lightning, scipy, transformers or the attacks
    (``leak-audit gate --help`` took about 11 s when it imported them; about 0.5 s without)."""
    import subprocess
    import sys

    heavy = ["torch", "lightning", "scipy", "transformers", "torchmetrics", "leak_audit.attacks", "leak_audit.callback",
             "leak_audit.cli.bench.text", "leak_audit.cli.report"]
    code = ("import sys\nfrom leak_audit.cli import main\n"
            f"rc = main(['gate', {str(log)!r}, '--max', 'rouge1=0.5', '--format', 'json'])\n"
            f"print(rc, sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "0 []"


def test_package_names_are_lazy_but_complete():
    """``import leak_audit`` imports no submodule; every name of ``__all__`` resolves on first use, and is the
    class LightningCLI configs name (``leak_audit.LeakageAudit``)."""
    import subprocess
    import sys

    code = ("import sys, leak_audit\nprint(sorted(m for m in sys.modules if m.startswith(('leak_audit.', 'torch'))))\n"
            "assert set(leak_audit.__all__) <= set(dir(leak_audit))\n"
            "from leak_audit import LeakageAudit\nfrom leak_audit.callback import LeakageAudit as Home\n"
            "assert LeakageAudit is Home is leak_audit.LeakageAudit\n"
            "assert all(getattr(leak_audit, n) is not None for n in leak_audit.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "[]"


def test_the_run_warns_once_when_a_reading_is_a_lower_bound():
    import warnings

    from leak_audit.results.reporter import AuditReporter

    why = "span_check read LoRA adapters at B > 1"
    rec = AuditRecord(step=3, attack="span_check", status="ok", metrics={"rouge1": 0.4}, info={"lower_bound": why})
    reporter = AuditReporter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reporter.report(None, [[rec], [rec]], log=False, skipped=0)
    said = [str(w.message) for w in caught if "lower" in str(w.message) or why in str(w.message)]
    assert said == [f"LeakageAudit: 'span_check' at step 3: {why}; the gate counts such readings toward a breach, "
                    "never toward a pass"]
