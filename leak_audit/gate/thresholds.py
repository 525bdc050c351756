"""Release gate, the ``--max METRIC=VALUE`` form: compare the worst leakage in an audit log with maxima.

Every metric grows with leakage, so a threshold is a maximum: the gate fails when the worst value over
all successful (``status == "ok"``) records, across attacks and steps, exceeds it. A metric that no record
reports is a failure too: a gate must not pass on missing evidence.

This is the shorthand of a :class:`~leak_audit.gate.policy.GatePolicy` of max rules aggregated by ``max``
(:meth:`GatePolicy.from_thresholds <leak_audit.gate.policy.GatePolicy.from_thresholds>`);
:func:`policy_from_args` combines it with a policy file as ``leak-audit gate`` does. Policies with warn
levels, other aggregations and scopes (attacks, modules, steps) live in :mod:`leak_audit.gate.policy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from leak_audit.gate.policy import KNOWN_METRICS, GateError, GatePolicy, check_metric

__all__ = ["GateError", "KNOWN_METRICS", "parse_threshold", "policy_from_args"]


def parse_threshold(text: str) -> tuple[str, float]:
    """Parse ``"metric=value"`` (a record metric of :data:`KNOWN_METRICS`, or ``epsilon``).

    Raises:
        GateError: not of that form, unknown metric (with the closest names), or value not a number
            (a :class:`~leak_audit.gate.policy.PolicyError`, a subclass, for the metric).
    """
    if "=" not in text:
        raise GateError(f"threshold {text!r} is not of the form METRIC=VALUE (e.g. rouge1=0.5)")
    name, _, raw = text.partition("=")
    name = name.strip()
    check_metric(name)
    try:
        value = float(raw)
    except ValueError:
        raise GateError(f"threshold for {name!r} is not a number: {raw!r}") from None
    return name, value


def policy_from_args(policy_file: str | None, maxes: Sequence[str]) -> GatePolicy | None:
    """The policy of ``--policy FILE`` and ``--max METRIC=VALUE ...``, combined as ``leak-audit gate`` does
    (the file's rules, then one max rule per ``--max``); ``None`` when neither is given.

    Raises:
        leak_audit.gate.policy.GateError: a bad policy file or threshold (``PolicyError`` is a subclass).
    """
    rules = GatePolicy.from_toml(policy_file).rules if policy_file is not None else ()
    if maxes:
        taken = {r.name for r in rules}
        extra = GatePolicy.from_thresholds(dict(parse_threshold(t) for t in maxes)).rules
        rules += tuple(replace(r, name=f"{r.name} (--max)") if r.name in taken else r for r in extra)
    return GatePolicy(rules) if rules else None
