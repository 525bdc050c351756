"""Background side of an audit.

One worker protocol with a thread and a forked-process implementation (:mod:`~leak_audit.runtime.worker`);
the job a worker runs on each snapshot (:mod:`~leak_audit.runtime.job`); the auditor that runs the attacks
on one snapshot and scores them (:mod:`~leak_audit.runtime.auditor`), built for a text or an image model by
:mod:`~leak_audit.runtime.factory`; the dropout-off gradient recompute (:mod:`~leak_audit.runtime.recompute`);
and memory sampling (:mod:`~leak_audit.runtime.memory`).
"""
