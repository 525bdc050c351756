"""Background execution of audits, so the training loop never waits for an attack.

One protocol, :class:`AuditWorker`, and two implementations: :class:`ThreadAuditWorker` (a background
thread, and a side CUDA stream on a GPU) and :class:`ProcessAuditWorker` (a forked CPU process with its own
interpreter lock). :func:`make_worker` builds the one ``LeakageAudit(worker=...)`` names. Each worker also
owns its copy rule for frozen parameters (:meth:`AuditWorker.frozen_copy`): a thread shares them with
training; a process reads its fork-time copy while they are unchanged.

Precedents: Lightning's ``AsyncCheckpointIO`` (a single worker thread; tensors are cloned on the caller
thread; worker errors are kept and surfaced later) and NeMo's EMA callback (a private CUDA stream).

* **Threading.** One daemon thread runs audits one at a time. Results go to a thread-safe queue and are
  drained on the Trainer's thread (``wandb.log`` and ``LightningModule.log`` are not thread-safe).
* **Backpressure.** At most ``max_pending`` audits are in flight (queued or running). ``submit`` returns
  ``False`` instead of queueing more; the caller records the audit as skipped.
* **CPU.** The worker thread sets its own intra-op thread count (``torch.set_num_threads`` is per thread),
  default 1, and on Linux lowers its own scheduling priority (``nice`` 19 by default), so that when the
  cores are all busy the kernel runs training first and the audit in what is left.
* **CUDA.** The snapshot's tensors are cloned on the training stream and an event is recorded after the
  copies; the worker waits on that event from a private stream, and marks every snapshot
  tensor with ``record_stream`` so the caching allocator does not hand its memory back to training early.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor

from leak_audit.capture.snapshot import FrozenCopy

__all__ = ["WORKER_KINDS", "AuditWorker", "ProcessAuditWorker", "ThreadAuditWorker", "check_worker_devices", "make_worker"]

WORKER_KINDS: tuple[str, ...] = ("thread", "process")
"""``LeakageAudit(worker=...)``: a background thread (default), or a forked CPU process."""

S = TypeVar("S")
R = TypeVar("R")
S_contra = TypeVar("S_contra", contravariant=True)
_STOP = object()


class AuditWorker(Protocol[S_contra, R]):
    """What the callback needs of a background worker that runs ``fn(snapshot)`` off the training thread.

    Implemented by :class:`ThreadAuditWorker` and :class:`ProcessAuditWorker`; both turn every failure
    into an ``on_error(snapshot, exc)`` result, so no audit is lost.
    """

    @property
    def in_flight(self) -> int:
        """Audits queued or running."""
        ...

    @property
    def busy(self) -> bool:
        """Whether ``submit`` would refuse a new audit now (``max_pending`` in flight)."""
        ...

    def submit(self, snapshot: S_contra, ready: torch.cuda.Event | None = None) -> bool:
        """Hand a snapshot (already copied) to the worker; ``False`` (and nothing done) when busy.

        Raises:
            RuntimeError: the worker was closed (or, for a process, no fresh child could be forked).
            ValueError: a CUDA snapshot for a worker that cannot take one.
        """
        ...

    def drain(self) -> list[R]:
        """Results finished since the last call, oldest first (never blocks)."""
        ...

    def close(self, timeout: float | None = None) -> bool:
        """Let submitted audits finish (up to ``timeout`` seconds) and stop; ``True`` if it finished in time."""
        ...

    def frozen_copy(self, name: str, param: Tensor) -> FrozenCopy:
        """How a snapshot carries the frozen (``requires_grad=False``) parameter ``name`` to this worker:
        ``"share"``, ``"copy"`` or ``"omit"`` (:data:`~leak_audit.capture.snapshot.FrozenCopy`). Trainable
        parameters are always copied (the update is in place), whatever the worker."""
        ...


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def _check_settings(max_pending: int, num_threads: int | None, niceness: int | None) -> None:
    if max_pending < 1:
        raise ValueError(f"max_pending must be >= 1, got {max_pending}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    if niceness is not None and not 0 <= niceness <= 19:
        raise ValueError(f"niceness must be in 0..19 or None, got {niceness}")


def _drain(box: queue.SimpleQueue[R]) -> list[R]:
    out = []
    while True:
        try:
            out.append(box.get_nowait())
        except queue.Empty:
            return out


class ThreadAuditWorker(Generic[S, R]):
    """Run ``fn(snapshot)`` on a background thread, with at most ``max_pending`` audits in flight
    (an :class:`AuditWorker`).

    Args:
        fn: the audit, ``snapshot -> result``. It should handle its own errors.
        on_error: called on the worker thread as ``on_error(snapshot, exception)`` if ``fn`` raises; its
            return value becomes the result (a failed audit), so a crashing audit never goes unnoticed.
        max_pending: audits queued or running at once (≥ 1).
        num_threads: intra-op threads for the worker thread on CPU (``None`` keeps torch's default).
        niceness: Linux ``nice`` value (0..19) of the worker thread only; higher yields more CPU to
            training. ``None`` leaves it unchanged. Ignored on other platforms.
        name: thread name.

    Raises:
        ValueError: ``max_pending < 1``, ``num_threads < 1`` or ``niceness`` outside 0..19.
    """

    def __init__(
        self,
        fn: Callable[[S], R],
        on_error: Callable[[S, BaseException], R],
        *,
        max_pending: int = 1,
        num_threads: int | None = 1,
        niceness: int | None = 19,
        name: str = "leak-audit-worker",
    ) -> None:
        _check_settings(max_pending, num_threads, niceness)
        self._niceness = niceness
        self.thread_niceness: int | None = None  # what the worker thread actually got (Linux)
        self._fn = fn
        self._on_error = on_error
        self._max_pending = max_pending
        self._num_threads = num_threads
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._outbox: queue.SimpleQueue[R] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per GPU
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def frozen_copy(self, name: str, param: Tensor) -> FrozenCopy:
        """``"share"``: the thread reads frozen weights in place, in the training process's own memory."""
        return "share"

    @property
    def in_flight(self) -> int:
        """Audits queued or running."""
        with self._lock:
            return self._in_flight

    @property
    def busy(self) -> bool:
        """Whether ``submit`` would refuse a new audit now."""
        return self.in_flight >= self._max_pending

    def submit(self, snapshot: S, ready: torch.cuda.Event | None = None) -> bool:
        """Hand a snapshot to the worker. Returns ``False`` (and does nothing) when ``max_pending`` are in flight.

        Args:
            snapshot: the audit's inputs, already copied.
            ready: a CUDA event recorded on the training stream after the copies (GPU snapshots only).

        Raises:
            RuntimeError: the worker was closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the audit worker is closed")
            if self._in_flight >= self._max_pending:
                return False
            self._in_flight += 1
        self._inbox.put((snapshot, ready))
        return True

    def drain(self) -> list[R]:
        """Results finished since the last call, oldest first (never blocks)."""
        return _drain(self._outbox)

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting audits, let the queued ones finish, and join the thread.

        Args:
            timeout: seconds to wait for in-flight audits (``None``: as long as they take).

        Returns:
            ``True`` if the thread finished; ``False`` if it was still running at the timeout (it is a
            daemon thread, so it never blocks interpreter exit).
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        if self._niceness is not None and sys.platform.startswith("linux"):
            try:  # on Linux a thread is a task with its own nice value; this lowers only the worker
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), self._niceness))
                self.thread_niceness = os.getpriority(os.PRIO_PROCESS, tid)
            except OSError:
                pass
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            snapshot, ready = item
            try:
                result = self._run(snapshot, ready)
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a failed audit
                try:
                    result = self._on_error(snapshot, exc)
                except BaseException:  # noqa: BLE001
                    result = None  # type: ignore[assignment]
            finally:
                with self._lock:
                    self._in_flight -= 1
            if result is not None:
                self._outbox.put(result)

    def _run(self, snapshot: S, ready: torch.cuda.Event | None) -> R:
        cuda = [t for t in _tensors(snapshot) if t.is_cuda]
        if ready is None or not cuda:
            return self._fn(snapshot)
        # The side stream must be on the snapshot's GPU (under DDP rank r trains on cuda:r, while this
        # thread's current device is cuda:0). Priority 0 is CUDA's lowest, but also the default stream's, so
        # the side stream runs beside training without yielding to it: backpressure and max_seconds bound it.
        device = cuda[0].device
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device, priority=0)
        with torch.cuda.stream(stream):  # also makes the stream's device current for this thread
            stream.wait_event(ready)
            for t in cuda:
                t.record_stream(stream)
            result = self._fn(snapshot)
            stream.synchronize()
        return result


@dataclass
class _Child(Generic[S]):
    """One forked child and what belongs to it alone: its queues, the jobs it owes, the thread reading it."""

    process: Any
    inbox: Any
    results: Any
    pending: dict[int, S] = field(default_factory=dict)  # job id -> snapshot, in submission (= answer) order
    reader: threading.Thread | None = None


class ProcessAuditWorker(Generic[S, R]):
    """Run ``fn(snapshot)`` in a forked child process (CPU only), with at most ``max_pending`` in flight.

    An :class:`AuditWorker`, like :class:`ThreadAuditWorker`. The child is forked at construction, so it
    holds a copy-on-write image of everything ``fn`` reaches (the attack replica, frozen weights, the open
    audit log) as it was then; build this worker only once that state is final. Snapshots travel through a
    ``torch.multiprocessing`` queue: CPU tensors move into shared memory (one copy, made by the queue's
    feeder thread, not the caller), and tensors already in shared memory pass as handles. Results come
    back pickled and are collected by a reader thread. The child has its own interpreter lock, so attack
    code in Python never holds up the training thread's.

    The child lowers its own priority (``niceness``), runs ``num_threads`` intra-op threads, ignores
    ``SIGINT`` (the parent closes it), restores the default ``SIGTERM``/``SIGUSR1`` handling (not the
    Trainer's), and dies with its parent (Linux ``PR_SET_PDEATHSIG``; elsewhere it checks its parent before
    every audit), so a killed training run leaves no orphan writing to the audit log.

    Failures become ``on_error(snapshot, exc)`` results, never lost jobs: an exception in ``fn`` (in the
    child); a snapshot that cannot be pickled, an answer that cannot be read, or a child that died (out
    of memory, a signal; in the parent). After a death the next ``submit`` first fails the dead child's
    jobs, then forks a fresh child; if that fork fails, ``submit`` raises ``RuntimeError``.

    Frozen parameters passed as ``frozen`` are recorded with their tensor version at construction (the
    first fork): while a parameter keeps that version the child's fork-time copy is current, and
    :meth:`frozen_copy` says ``"omit"``. In-place writes through ``p.data`` do not bump the version, so
    such a change goes unseen.

    Args:
        fn, on_error, max_pending, num_threads, niceness, name: as for :class:`ThreadAuditWorker`.
        frozen: ``{name: parameter}`` of frozen parameters the child may read from its own copy.

    Raises:
        ValueError: as :class:`ThreadAuditWorker`; also on a platform without ``fork``.
    """

    def __init__(
        self,
        fn: Callable[[S], R],
        on_error: Callable[[S, BaseException], R],
        *,
        max_pending: int = 1,
        num_threads: int | None = 1,
        niceness: int | None = 19,
        name: str = "leak-audit-worker",
        frozen: Mapping[str, Tensor] | None = None,
    ) -> None:
        import torch.multiprocessing as mp

        _check_settings(max_pending, num_threads, niceness)
        if "fork" not in mp.get_all_start_methods():
            raise ValueError("worker='process' forks a child process, which this platform cannot do; use 'thread'")
        self._fn = fn
        self._on_error = on_error
        self._max_pending = max_pending
        self._num_threads = num_threads
        self._niceness = niceness
        self._name = name
        self._ctx = mp.get_context("fork")
        self._outbox: queue.SimpleQueue[R] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._next_id = 0
        self._closed = False
        self._fork_versions = {n: p._version for n, p in (frozen or {}).items()}  # what the child holds
        self._child = self._fork()

    def frozen_copy(self, name: str, param: Tensor) -> FrozenCopy:
        """``"omit"`` while ``param`` is as it was at the fork (the child holds it); else ``"copy"``: the
        queue moves what it sends into shared memory, which would swap the live weight's storage."""
        return "omit" if self._fork_versions.get(name) == param._version else "copy"

    def _fork(self) -> _Child[S]:
        inbox, results = self._ctx.Queue(), self._ctx.Queue()
        process = self._ctx.Process(target=self._child_main, args=(os.getpid(), inbox, results), name=self._name,
                                    daemon=True)
        child: _Child[S] = _Child(process, inbox, results)
        # a snapshot the feeder thread cannot pickle fails its job instead of vanishing
        inbox._on_queue_feeder_error = lambda exc, obj: self._answer(child, obj[0], None, exc)
        process.start()
        child.reader = threading.Thread(target=self._read, args=(child,), name=f"{self._name}-reader", daemon=True)
        child.reader.start()
        return child

    @property
    def pid(self) -> int | None:
        """The current child's process id."""
        return self._child.process.pid

    @property
    def in_flight(self) -> int:
        """Audits submitted and not yet answered."""
        with self._lock:
            return len(self._child.pending)

    @property
    def busy(self) -> bool:
        """Whether ``submit`` would refuse a new audit now."""
        return self.in_flight >= self._max_pending

    def submit(self, snapshot: S, ready: torch.cuda.Event | None = None) -> bool:
        """As :meth:`ThreadAuditWorker.submit`.

        Raises:
            ValueError: a CUDA snapshot (``ready`` given): fork and CUDA do not mix.
            RuntimeError: the worker was closed, or a fresh child could not be forked.
        """
        if ready is not None:
            raise ValueError("worker='process' runs attacks on the CPU; CUDA snapshots need worker='thread'")
        if self._closed:
            raise RuntimeError("the audit worker is closed")
        if not self._child.process.is_alive():
            dead = self._child
            assert dead.reader is not None
            dead.reader.join()  # it fails the dead child's jobs (and writes them) before anything is forked
            self._release(dead)
            try:
                self._child = self._fork()
            except OSError as exc:  # out of memory or processes: this audit fails, the next one tries again
                raise RuntimeError(f"could not fork a new audit worker process: {exc}") from exc
        with self._lock:
            if len(self._child.pending) >= self._max_pending:
                return False
            self._next_id += 1
            job = self._next_id
            self._child.pending[job] = snapshot
        self._child.inbox.put((job, snapshot))
        return True

    def drain(self) -> list[R]:
        """Results finished since the last call, oldest first (never blocks)."""
        return _drain(self._outbox)

    def close(self, timeout: float | None = None) -> bool:
        """Let the submitted audits finish, then stop the child; past ``timeout`` it is killed and the audits
        still in flight become failed ones. Returns whether the child finished on its own."""
        child = self._child
        with self._lock:
            first = not self._closed
            self._closed = True
        if first and child.process.is_alive():
            child.inbox.put(None)
        child.process.join(timeout)
        finished = not child.process.is_alive()
        if not finished:
            child.process.kill()
            child.process.join()
        assert child.reader is not None
        child.reader.join()
        self._release(child)
        return finished

    @staticmethod
    def _release(child: _Child[S]) -> None:
        """Close a finished child's queues without waiting on their feeder threads."""
        for q in (child.inbox, child.results):
            q.cancel_join_thread()
            q.close()

    # -- parent side
    def _answer(self, child: _Child[S], job: int, result: R | None, exc: BaseException | None = None) -> None:
        """Settle ``job``: its result, or ``on_error`` of its snapshot when ``exc`` is given."""
        with self._lock:
            snapshot = child.pending.pop(job, None)
        if exc is not None:
            if snapshot is None:
                return
            try:
                result = self._on_error(snapshot, exc)
            except BaseException:  # noqa: BLE001
                return
        if result is not None:
            self._outbox.put(result)

    def _oldest(self, child: _Child[S]) -> int | None:
        with self._lock:
            return next(iter(child.pending), None)

    def _read(self, child: _Child[S]) -> None:
        while True:
            try:
                job, result = child.results.get(timeout=0.2)
            except queue.Empty:
                if child.process.is_alive():
                    continue
                try:  # the child is gone: take what it sent last, then fail the rest
                    job, result = child.results.get(timeout=0.2)
                except queue.Empty:
                    break
                except Exception:  # noqa: BLE001
                    break
            except (EOFError, OSError):
                break
            except Exception as exc:  # noqa: BLE001 - an unreadable answer: the child answers in order
                oldest = self._oldest(child)
                if oldest is not None:
                    self._answer(child, oldest, None, RuntimeError(f"the audit's result could not be read: {exc!r}"))
                continue
            self._answer(child, job, result)
        code = child.process.exitcode
        while (oldest := self._oldest(child)) is not None:
            self._answer(child, oldest, None, RuntimeError(f"the audit worker process died (exit code {code})"))

    # -- child side
    def _child_main(self, parent: int, inbox: Any, results: Any) -> None:
        import signal

        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to training, which closes the worker
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                signal.signal(sig, signal.SIG_DFL)  # not the Trainer's handlers, inherited by the fork
        try:  # Linux: when memory runs out the kernel kills the audit, not training (unprivileged: may only raise)
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write("1000")
        except OSError:
            pass
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        if self._niceness is not None and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), self._niceness))
            except OSError:
                pass
        while True:
            try:
                item = inbox.get(timeout=1.0)
            except queue.Empty:
                item = ...
            if os.getppid() != parent:
                return  # orphaned: the training process is gone; write nothing more
            if item is ...:
                continue
            if item is None:
                return
            job, snapshot = item
            try:
                result = self._fn(snapshot)
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a failed audit
                try:
                    result = self._on_error(snapshot, exc)
                except BaseException:  # noqa: BLE001
                    result = None  # type: ignore[assignment]
            del snapshot, item
            results.put((job, result))


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def check_worker_devices(kind: str, training: torch.device, attacks: torch.device | None) -> None:
    """Refuse ``kind="process"`` unless training and attacks (``None``: the training device) are on the CPU.

    Raises:
        ValueError: a process worker with a non-CPU device (a forked child cannot use CUDA).
    """
    if kind == "process" and {training.type, (attacks or training).type} != {"cpu"}:
        raise ValueError(f"LeakageAudit(worker='process') forks a CPU process, for CPU training only (training on "
                         f"{training}, attacks on {attacks or 'the same'}): use worker='thread'")


def make_worker(
    kind: str,
    fn: Callable[[S], R],
    on_error: Callable[[S, BaseException], R],
    *,
    max_pending: int = 1,
    num_threads: int | None = 1,
    niceness: int | None = 19,
    frozen: Mapping[str, Tensor] | None = None,
) -> AuditWorker[S, R]:
    """The worker ``kind`` names (:data:`WORKER_KINDS`), started now: a thread, or a child forked now.

    Args:
        kind: ``"thread"`` or ``"process"``.
        fn, on_error, max_pending, num_threads, niceness: as for :class:`ThreadAuditWorker`.
        frozen: for ``"process"``, the frozen parameters the child reads from its fork-time copy
            (:class:`ProcessAuditWorker`); ignored by a thread, which shares them.

    Raises:
        ValueError: an unknown ``kind``, or a setting out of range.
    """
    if kind == "thread":
        return ThreadAuditWorker(fn, on_error, max_pending=max_pending, num_threads=num_threads, niceness=niceness)
    if kind == "process":
        return ProcessAuditWorker(fn, on_error, max_pending=max_pending, num_threads=num_threads, niceness=niceness,
                                  frozen=frozen)
    raise ValueError(f"worker must be one of {', '.join(map(repr, WORKER_KINDS))}, got {kind!r}")
