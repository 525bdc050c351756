"""The shipped LightningCLI config builds a LeakageAudit with its policy, and a short run audits."""

from __future__ import annotations

import importlib.util

import pytest

from leak_audit import LeakageAudit, read_audit_log
from leak_audit.gate.policy import GatePolicy
from tests.conftest import REPO


def _cli_module():
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (the examples extra)")
    spec = importlib.util.spec_from_file_location("lightning_cli_example", REPO / "examples" / "lightning_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_example_config_configures_and_runs_the_audit(minilm_path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config names examples/leak-policy.toml relative to the checkout
    cli = _cli_module().main([
        "fit", "--config", "examples/lightning_cli.yaml", "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks.init_args.log_dir", str(tmp_path / "audit"),
        "--trainer.callbacks.init_args.every_n_steps", "2", "--data.n", "24",
        "--trainer.enable_progress_bar", "false",
    ])
    [audit] = [cb for cb in cli.trainer.callbacks if isinstance(cb, LeakageAudit)]
    assert audit.policy == GatePolicy.from_toml(REPO / "examples" / "leak-policy.toml")
    assert audit.on_breach == "warn" and audit.every_n_steps == 2 and audit.log_samples is False
    records = read_audit_log(tmp_path / "audit" / "audit.jsonl")
    assert sorted({r.step for r in records}) == [0, 2]
    assert {r.attack for r in records} == {"token_bag", "span_check", "labels"}
    # the policy was evaluated during training: token_bag recovers every token, and the example policy's
    # token_recall rule (mean of the last 3 audits, max 0.9) fails on 1.0
    assert audit.verdict == "fail" and audit.breach is not None and audit.breach.metric == "token_recall"


def test_an_inline_policy_in_yaml_is_accepted(tmp_path):
    pytest.importorskip("jsonargparse")
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LeakageAudit, "audit")
    cfg = parser.parse_string(
        "audit:\n  on_breach: stop\n  policy:\n    rule:\n      - {metric: rouge1, max: 0.5, warn: 0.3}\n"
    )
    audit = parser.instantiate_classes(cfg).audit
    assert audit.on_breach == "stop"
    [rule] = audit.policy.rules
    assert (rule.metric, rule.max, rule.warn) == ("rouge1", 0.5, 0.3)
