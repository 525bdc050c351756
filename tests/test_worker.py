import threading
import time

import torch

from leak_audit.worker import AuditWorker


def test_results_come_back_in_order_and_close_drains():
    w = AuditWorker(lambda x: x * 2, lambda s, e: -1, max_pending=3)
    assert all(w.submit(i) for i in range(3))
    assert w.close(timeout=10)
    assert w.drain() == [0, 2, 4]


def test_backpressure_refuses_instead_of_queueing():
    gate = threading.Event()
    w = AuditWorker(lambda x: gate.wait(10) and x, lambda s, e: None, max_pending=1)
    assert w.submit(1)
    assert w.busy and not w.submit(2)
    gate.set()
    assert w.close(timeout=10)
    assert w.drain() == [1]


def test_errors_become_results():
    def boom(x):
        raise RuntimeError(f"attack {x} exploded")

    w = AuditWorker(boom, lambda s, e: f"failed: {e}")
    w.submit(7)
    w.close(timeout=10)
    assert w.drain() == ["failed: attack 7 exploded"]


def test_worker_threads_do_not_change_the_training_thread():
    before = torch.get_num_threads()
    w = AuditWorker(lambda x: torch.get_num_threads(), lambda s, e: None, num_threads=1)
    w.submit(0)
    w.close(timeout=10)
    assert w.drain() == [1]
    assert torch.get_num_threads() == before


def test_training_never_waits_on_a_slow_audit():
    w = AuditWorker(lambda x: time.sleep(1.0), lambda s, e: None)
    t0 = time.perf_counter()
    w.submit(0)
    assert time.perf_counter() - t0 < 0.1
    w.close(timeout=10)


def test_only_the_worker_thread_is_niced_on_linux():
    import os
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are a Linux feature")
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    w = AuditWorker(lambda x: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), lambda s, e: None, niceness=19)
    w.submit(0)
    w.close(timeout=10)
    assert w.drain() == [19] and w.thread_niceness == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice
