"""Small helpers every attack shares to honour its :class:`~leak_audit.attacks.base.Budget`.

An attack makes its budget once, at the start (``budget = inp.budget(own_seconds)``), hands
``budget.deadline`` to the helpers it calls (they take a ``time.monotonic()`` value, ``None`` or ``inf``
for none, and report whether the deadline cut them short), and sets ``Reconstruction.timed_out`` when
the deadline stopped it and the audit's deadline was the binding limit (``budget.audit_bound``). Deadline
checks go through :func:`late` (or :meth:`~leak_audit.attacks.base.Budget.expired`), except where one clock
reading also sets the next time slice (gradient matching's restarts); a loop that can only be left by an
exception (an L-BFGS closure) raises :class:`OutOfBudget`.
"""

from __future__ import annotations

import time

from leak_audit.attacks.base import Budget, Reconstruction

__all__ = ["NO_TIME_LEFT", "OutOfBudget", "late", "started_late"]

NO_TIME_LEFT = "started with no time left"
"""``info["progress"]`` of an attack that returned at once because its budget was already spent."""


class OutOfBudget(Exception):
    """Raised inside an optimiser's closure to end the optimisation at a step or time limit.

    ``torch.optim.LBFGS.step(closure)`` runs up to ``max_iter`` evaluations and offers no other exit: the
    closure raises this when the attack's step count is reached or :func:`late` says the deadline passed,
    and the attack catches it around ``step`` and keeps its best point so far. It never leaves the attack.
    """


def late(deadline: float | None) -> bool:
    """Whether ``deadline`` (a ``time.monotonic()`` value; ``None`` or ``inf``: none) has passed."""
    return deadline is not None and time.monotonic() >= deadline


def started_late(attack: str, budget: Budget) -> Reconstruction | None:
    """The empty, timed-out result of an attack whose audit deadline had passed before it started, or
    ``None`` when there is time left (or only the attack's own limit is spent, which is no timeout)."""
    if budget.audit_bound and budget.expired():
        return Reconstruction(attack=attack, timed_out=True, info={"progress": NO_TIME_LEFT})
    return None
