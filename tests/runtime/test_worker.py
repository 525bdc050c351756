import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from leak_audit.runtime.worker import ThreadAuditWorker


def test_results_come_back_in_order_and_close_drains():
    w = ThreadAuditWorker(lambda x: x * 2, lambda s, e: -1, max_pending=3)
    assert all(w.submit(i) for i in range(3))
    assert w.close(timeout=10)
    assert w.drain() == [0, 2, 4]


def test_backpressure_refuses_instead_of_queueing():
    gate = threading.Event()
    w = ThreadAuditWorker(lambda x: gate.wait(10) and x, lambda s, e: None, max_pending=1)
    assert w.submit(1)
    assert w.busy and not w.submit(2)
    gate.set()
    assert w.close(timeout=10)
    assert w.drain() == [1]


def test_errors_become_results():
    def boom(x):
        raise RuntimeError(f"attack {x} exploded")

    w = ThreadAuditWorker(boom, lambda s, e: f"failed: {e}")
    w.submit(7)
    w.close(timeout=10)
    assert w.drain() == ["failed: attack 7 exploded"]


def test_worker_threads_do_not_change_the_training_thread():
    before = torch.get_num_threads()
    w = ThreadAuditWorker(lambda x: torch.get_num_threads(), lambda s, e: None, num_threads=1)
    w.submit(0)
    w.close(timeout=10)
    assert w.drain() == [1]
    assert torch.get_num_threads() == before


def test_training_never_waits_on_a_slow_audit():
    """The audit blocks until the test releases it: a ``submit`` that waited for it would return only after
    the gate's 30 s timeout, with the audit done and nothing in flight (no wall-clock threshold to flake)."""
    gate = threading.Event()
    w = ThreadAuditWorker(lambda x: gate.wait(30) and x, lambda s, e: None, max_pending=1)
    assert w.submit(7)
    assert w.in_flight == 1
    gate.set()
    assert w.close(timeout=10)
    assert w.drain() == [7]


def test_only_the_worker_thread_is_niced_on_linux():
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are a Linux feature")
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    w = ThreadAuditWorker(lambda x: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), lambda s, e: None, niceness=19)
    w.submit(0)
    w.close(timeout=10)
    assert w.drain() == [19] and w.thread_niceness == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice


# ---------------------------------------------------------------- the forked-process worker
def _double_sum(snapshot):
    return float(snapshot["x"].sum()) * 2, os.getpid()


def test_process_worker_runs_in_a_child_and_reads_shared_tensors():
    from leak_audit.runtime.worker import ProcessAuditWorker

    w = ProcessAuditWorker(_double_sum, lambda s, e: ("failed", str(e)), max_pending=2)
    assert w.submit({"x": torch.arange(4.0)}) and w.submit({"x": torch.ones(1000, 1000)})
    assert w.close(timeout=60)
    (a, pid_a), (b, pid_b) = w.drain()
    assert (a, b) == (12.0, 2_000_000.0)
    assert pid_a == pid_b == w.pid != os.getpid()


def test_process_worker_backpressure_errors_and_niceness():
    from leak_audit.runtime.worker import ProcessAuditWorker

    gate = multiprocessing.get_context("fork").Event()  # inherited by the child, forked at construction

    def slow_or_boom(s):
        if s == "boom":
            raise RuntimeError("attack exploded")
        gate.wait(30)
        return os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads()

    w = ProcessAuditWorker(slow_or_boom, lambda s, e: f"failed: {e}", max_pending=1, niceness=19, num_threads=1)
    assert w.submit("slow")
    # the caller never waits for the audit: it is still blocked on the gate when submit returns
    assert w.busy and not w.submit("other")
    gate.set()
    deadline = time.time() + 30
    while w.busy and time.time() < deadline:
        time.sleep(0.05)
    assert w.submit("boom")
    assert w.close(timeout=30)
    assert w.drain() == [(19, 1), "failed: attack exploded"]


@pytest.mark.skipif(not Path("/proc/self/oom_score_adj").exists(),
                    reason="the OOM score is set through /proc/self/oom_score_adj (Linux), absent here")
def test_process_worker_child_is_the_oom_killers_first_choice():
    """When memory runs out the kernel kills the audit, not training: the child's OOM score adjustment is the
    maximum, 1000, and training's own is untouched."""
    from leak_audit.runtime.worker import ProcessAuditWorker

    oom = Path("/proc/self/oom_score_adj")
    before = int(oom.read_text())
    w = ProcessAuditWorker(lambda s: int(Path("/proc/self/oom_score_adj").read_text()), lambda s, e: f"failed: {e}")
    assert w.submit("x")
    assert w.close(timeout=30)
    assert w.drain() == [1000]
    assert int(oom.read_text()) == before


def test_process_worker_turns_a_dead_child_into_failed_audits_and_restarts():
    import signal

    from leak_audit.runtime.worker import ProcessAuditWorker

    w = ProcessAuditWorker(lambda s: time.sleep(s) or s, lambda s, e: f"failed {s}: {e}", max_pending=1)
    first = w.pid
    assert w.submit(30)
    time.sleep(0.5)
    os.kill(first, signal.SIGKILL)
    deadline = time.time() + 20
    results = []
    while not results and time.time() < deadline:
        time.sleep(0.1)
        results = w.drain()
    assert results == ["failed 30: the audit worker process died (exit code -9)"]
    assert w.submit(0) and w.pid != first  # a fresh child
    assert w.close(timeout=30)
    assert w.drain() == [0]


def test_process_worker_close_kills_an_audit_past_the_timeout():
    from leak_audit.runtime.worker import ProcessAuditWorker

    w = ProcessAuditWorker(lambda s: time.sleep(s) or s, lambda s, e: f"failed {s}", max_pending=1)
    w.submit(60)
    t0 = time.perf_counter()
    assert w.close(timeout=0.5) is False
    assert time.perf_counter() - t0 < 10
    assert w.drain() == ["failed 60"]


def test_process_worker_restart_keeps_each_childs_jobs_apart():
    """A job submitted right after the child died belongs to the fresh child: it is answered once, ok."""
    import signal

    from leak_audit.runtime.worker import ProcessAuditWorker

    w = ProcessAuditWorker(lambda s: time.sleep(s) or f"ok {s}", lambda s, e: f"failed {s}", max_pending=2)
    assert w.submit(30)
    time.sleep(0.5)
    os.kill(w.pid, signal.SIGKILL)
    w._child.process.join(5)  # dead and reaped, but the old reader (polling every 0.2 s) has not noticed yet
    assert w.submit(0.2)
    assert w.in_flight == 1  # only the new job; the dead child's was failed before the fork
    assert w.close(timeout=30)
    assert w.drain() == ["failed 30", "ok 0.2"]


def test_process_worker_fails_a_snapshot_that_cannot_be_pickled():
    from leak_audit.runtime.worker import ProcessAuditWorker

    w = ProcessAuditWorker(lambda s: "ran", lambda s, e: f"failed: {type(e).__name__}", max_pending=1)
    assert w.submit({"callback": lambda: None})  # lambdas do not pickle
    deadline = time.time() + 20
    while w.busy and time.time() < deadline:
        time.sleep(0.05)
    assert not w.busy  # the job was settled, the worker takes the next one
    assert w.submit({"x": 1})
    assert w.close(timeout=30)
    out = w.drain()
    assert out == ["failed: AttributeError", "ran"]  # "Can't pickle local object": failed, not lost


CHILD_SCRIPT = r"""
import sys, time
from pathlib import Path
from leak_audit.runtime.worker import ProcessAuditWorker

out = Path(sys.argv[1])
def job(n):
    time.sleep(1.0)
    with out.open("a") as fh:
        fh.write(f"{n}\n")
    return n
w = ProcessAuditWorker(job, lambda s, e: None, max_pending=3)
print(w.pid, flush=True)
for n in range(3):
    w.submit(n)
time.sleep(60)
"""


def test_process_worker_child_dies_with_its_parent(tmp_path):
    """SIGKILL the training process with three 1 s audits queued: the child goes too and writes nothing more."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "written.txt"
    proc = subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    child = int(proc.stdout.readline())
    time.sleep(0.3)  # the first audit is running
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the audit child outlived its parent")
    time.sleep(1.5)
    assert not out.exists() or len(out.read_text().split()) == 0


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:1`` and records ``record_stream`` calls (no GPU needed)."""

    calls: list = []

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)

    def record_stream(self, stream):
        _OnGpu.calls.append(("record_stream", stream.device))


def test_side_stream_is_made_on_the_snapshots_gpu_and_waits_for_the_copies(monkeypatch):
    """The CUDA path's order of calls, with torch.cuda faked: a low-priority stream on the snapshot's GPU
    (cuda:1, not the worker thread's current cuda:0), made once; it waits on the training stream's event
    before the attack runs and marks every snapshot tensor with ``record_stream``."""
    calls = _OnGpu.calls
    calls.clear()

    class FakeStream:
        def __init__(self, device=None, priority=0):
            self.device = torch.device(device)
            calls.append(("stream", self.device, priority))

        def wait_event(self, event):
            calls.append(("wait_event", event))

        def synchronize(self):
            calls.append(("synchronize",))

    class FakeContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            calls.append(("enter", self.stream.device))

        def __exit__(self, *exc):
            calls.append(("exit",))

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", FakeContext)
    snapshot = {"g": torch.zeros(2).as_subclass(_OnGpu), "h": [torch.ones(1).as_subclass(_OnGpu), 3]}
    worker = ThreadAuditWorker(lambda s: calls.append(("attack",)) or "done", lambda s, e: repr(e), niceness=None)
    assert worker.submit(snapshot, ready="event-1")
    assert worker.close(timeout=10)
    assert worker.drain() == ["done"]
    assert calls == [
        ("stream", torch.device("cuda", 1), 0), ("enter", torch.device("cuda", 1)), ("wait_event", "event-1"),
        ("record_stream", torch.device("cuda", 1)), ("record_stream", torch.device("cuda", 1)), ("attack",),
        ("synchronize",), ("exit",),
    ]


def test_each_worker_owns_its_copy_rule_for_frozen_parameters():
    """A thread shares frozen weights; a process omits those unchanged since its fork (its own copy is current)
    and copies one changed in place since, or one it was not given at the fork."""
    from leak_audit.runtime.worker import make_worker

    kept, changed, other = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3)), torch.ones(2)
    for p in (kept, changed):
        p.requires_grad_(False)
    thread = make_worker("thread", lambda s: s, lambda s, e: None)
    process = make_worker("process", lambda s: s, lambda s, e: None, frozen={"kept": kept, "changed": changed})
    try:
        changed.add_(1.0)  # an in-place update bumps the tensor's version
        assert [thread.frozen_copy(n, p) for n, p in (("kept", kept), ("changed", changed))] == ["share", "share"]
        assert process.frozen_copy("kept", kept) == "omit"
        assert process.frozen_copy("changed", changed) == "copy"
        assert process.frozen_copy("other", other) == "copy"
    finally:
        assert thread.close(10) and process.close(10)
    with pytest.raises(ValueError, match="worker must be one of"):
        make_worker("fiber", lambda s: s, lambda s, e: None)
