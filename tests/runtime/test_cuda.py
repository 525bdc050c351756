"""The CUDA side stream, on a real GPU. Every test skips cleanly without one (CI has none).

The CPU-side checks of the same code are ``test_worker.py::test_side_stream_is_made_on_the_snapshots_gpu_...``
(the call order, with torch.cuda faked) and ``test_device_placement.py`` (every attack on a simulated
accelerator).
"""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch

from leak_audit import LeakageAudit, read_audit_log
from leak_audit.attacks import Attack, Reconstruction, Requirements
from leak_audit.runtime.worker import ThreadAuditWorker
from tests.test_callback import QUERY0, Classifier, loader

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# the analytic text attacks (the optimisation ones, dlg and gradient_matching, run 20 s each by default)
ANALYTIC_TEXT_ATTACKS = ["labels", "token_bag", "span_check", "span_attention", "span_cluster", "span_search"]


def test_the_worker_reads_the_snapshot_after_its_copy_even_when_training_overwrites_the_source():
    """The copy is queued on the training stream behind a long matmul; the source is overwritten right
    after. The audit, on its own stream, must wait for the copy (the ready event): it sees the copied values,
    not memory the copy has yet to fill. It runs on a stream other than the training one."""
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev)
    seen = {}

    def audit(snap):
        seen["stream"] = torch.cuda.current_stream(dev)
        return float(snap["g"].double().sum())

    expected = float((a @ a).double().sum())  # the true value, computed (and synchronised) beforehand
    worker = ThreadAuditWorker(audit, lambda s, e: repr(e))
    source = a @ a  # long enough that the copy is still queued when submit returns
    snap = {"g": source.clone()}
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(dev))
    assert worker.submit(snap, ready)
    del snap
    source.zero_()
    source += 7.0
    assert worker.close(timeout=60)
    (result,) = worker.drain()
    assert result == pytest.approx(expected, rel=1e-6)
    assert seen["stream"] != torch.cuda.default_stream(dev)
    assert seen["stream"].priority == 0  # CUDA's lowest (the default stream's too)


def _train(tokenizer, tmp_path, callbacks, steps=6):
    L.seed_everything(123, verbose=False)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accelerator="cuda", devices=1)
    module = Classifier(tokenizer, dropout=0.1)
    trainer.fit(module, loader(tokenizer))
    return module, torch.cuda.get_rng_state(), torch.get_rng_state()


def test_audits_on_the_gpu_leave_training_rng_untouched_and_succeed(tokenizer, tmp_path):
    """Dropout on, an audit every step, the analytic text attacks on the training GPU: the CUDA and CPU RNG states
    after training equal those of a run without the audit, and no audit fails."""
    _, cuda_rng, cpu_rng = _train(tokenizer, tmp_path / "a", [])
    audit = LeakageAudit(attacks=ANALYTIC_TEXT_ATTACKS, every_n_steps=1, log_dir=tmp_path / "audit", max_pending=8,
                         end_timeout=None)
    _, cuda_rng_audited, cpu_rng_audited = _train(tokenizer, tmp_path / "b", [audit])
    assert torch.equal(cuda_rng, cuda_rng_audited)
    assert torch.equal(cpu_rng, cpu_rng_audited)
    records = read_audit_log(audit.log_path)
    assert len(records) == 6 * len(ANALYTIC_TEXT_ATTACKS)
    failed = [(r.attack, r.error) for r in records if r.status == "failed"]
    assert not failed, failed
    assert all(r.metrics["token_recall"] == 1.0 for r in records if r.attack == "token_bag")
    # peak_bytes: the largest torch.cuda.memory_allocated sample (every 20 ms, plus entry and exit) minus the one
    # at entry. Always measured on CUDA, but an analytic audit can end between samples with its temporaries
    # freed, so 0 is a valid figure here; the next test holds memory long enough to be seen.
    assert all(isinstance(r.info.get("peak_bytes"), int) and r.info["peak_bytes"] >= 0 for r in records
               if r.status == "ok")


GPU_HOG_BYTES = 256 * 2**20


class GpuHog(Attack):
    """Holds ``GPU_HOG_BYTES`` on the snapshot's GPU for 0.2 s, ten periods of the 20 ms peak sampler."""

    name = "gpu_hog"

    def requirements(self, spec, tapped):
        return Requirements(gradients=frozenset({QUERY0}))

    def run(self, inp):
        device = inp.gradients[QUERY0].device
        assert device.type == "cuda"  # attack_device=None: the attacks run on the training GPU
        block = torch.ones(GPU_HOG_BYTES // 4, device=device)  # counted by memory_allocated at once
        time.sleep(0.2)
        assert float(block[-1]) == 1.0
        return Reconstruction(self.name)


def test_peak_bytes_on_the_gpu_counts_what_an_attack_holds(tokenizer, tmp_path):
    """An audit whose attack holds 256 MiB on the training GPU reports a peak of about that much on each of
    its records (one figure per audit). Training runs concurrently on the same device and its own
    allocations (a 2-layer d=64 BERT: weights, gradients and Adam states under 40 MB) move the figure by
    far less than the margins."""
    audit = LeakageAudit(attacks=["labels", GpuHog()], every_n_steps=1, log_dir=tmp_path / "audit", max_pending=8,
                         end_timeout=None)
    _train(tokenizer, tmp_path, [audit], steps=2)
    records = read_audit_log(audit.log_path)
    assert sorted((r.audit, r.attack, r.status) for r in records) == [
        (1, "gpu_hog", "ok"), (1, "labels", "ok"), (2, "gpu_hog", "ok"), (2, "labels", "ok")], records
    peaks = [r.info["peak_bytes"] for r in records]
    assert all(0.75 * GPU_HOG_BYTES <= p <= GPU_HOG_BYTES + 128 * 2**20 for p in peaks), peaks
    assert len({r.info["peak_bytes"] for r in records if r.audit == 1}) == 1  # one figure per audit
