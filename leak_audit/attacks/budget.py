"""Small helpers every attack shares to honour its :class:`~leak_audit.attacks.base.Budget`.

An attack makes its budget once, at the start (``budget = inp.budget(own_seconds)``), hands
``budget.deadline`` to the helpers it calls (they take a ``time.monotonic()`` value, ``None`` or ``inf``
for none, and report whether the deadline cut them short), and sets ``Reconstruction.timed_out`` when
the deadline stopped it and the audit's deadline was the binding limit (``budget.audit_bound``). Deadline
checks go through :func:`late` (or :meth:`~leak_audit.attacks.base.Budget.expired`), except where one clock
reading also sets the next time slice (gradient matching's restarts); a loop that can only be left by an
exception (an L-BFGS closure, a constructor that works in chunks) raises :class:`OutOfBudget`. An attack
called after the audit's deadline never runs: :meth:`~leak_audit.attacks.base.Attack.__call__` returns the
empty, timed-out result (``NO_TIME_LEFT``).
"""

from __future__ import annotations

import time

from leak_audit.attacks.base import NO_TIME_LEFT

__all__ = ["NO_TIME_LEFT", "OutOfBudget", "late"]


class OutOfBudget(Exception):
    """Raised inside an optimiser's closure, or a constructor, to end the work at a step or time limit.

    ``torch.optim.LBFGS.step(closure)`` runs up to ``max_iter`` evaluations and offers no other exit: the
    closure raises this when the attack's step count is reached or :func:`late` says the deadline passed,
    and the attack catches it around ``step`` and keeps its best point so far. Likewise
    :class:`~leak_audit.attacks.text.token_scores.TokenScorer` raises it between vocabulary chunks, and the
    span check then returns what it has (nothing scanned). It never leaves the attack.
    """


def late(deadline: float | None) -> bool:
    """Whether ``deadline`` (a ``time.monotonic()`` value; ``None`` or ``inf``: none) has passed."""
    return deadline is not None and time.monotonic() >= deadline
