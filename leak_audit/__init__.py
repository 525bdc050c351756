"""leak_audit: measure, while you train, how much of each batch an attacker could rebuild from the gradients.

The names below are imported when first used (PEP 562), so ``import leak_audit`` and the CI gate
(``leak-audit gate``) do not pay for Lightning, torch or the attacks: ``from leak_audit import
LeakageAudit`` and the class path ``leak_audit.LeakageAudit`` (LightningCLI configs) work as for an
ordinary attribute.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from leak_audit.attacks import Attack, AttackInput, NotApplicable, Reconstruction, available_attacks, get_attack
    from leak_audit.callback import LeakageAudit
    from leak_audit.capture.batch import BatchAdapterError, ImageBatch, TextBatch
    from leak_audit.capture.canaries import CanaryError
    from leak_audit.capture.tap import ModuleSelectionError
    from leak_audit.gate.breach import LeakageThresholdExceeded
    from leak_audit.gate.policy import GatePolicy, MetricRule, PolicyError
    from leak_audit.results.records import AuditRecord, read_audit_log, select_run

__all__ = [
    "Attack",
    "AttackInput",
    "AuditRecord",
    "BatchAdapterError",
    "CanaryError",
    "GatePolicy",
    "ImageBatch",
    "LeakageAudit",
    "LeakageThresholdExceeded",
    "MetricRule",
    "ModuleSelectionError",
    "NotApplicable",
    "PolicyError",
    "Reconstruction",
    "TextBatch",
    "available_attacks",
    "get_attack",
    "read_audit_log",
    "select_run",
]
__version__ = "0.1.0"

_HOMES: dict[str, str] = {
    "Attack": "leak_audit.attacks",
    "AttackInput": "leak_audit.attacks",
    "NotApplicable": "leak_audit.attacks",
    "Reconstruction": "leak_audit.attacks",
    "available_attacks": "leak_audit.attacks",
    "get_attack": "leak_audit.attacks",
    "BatchAdapterError": "leak_audit.capture.batch",
    "CanaryError": "leak_audit.capture.canaries",
    "ImageBatch": "leak_audit.capture.batch",
    "TextBatch": "leak_audit.capture.batch",
    "LeakageThresholdExceeded": "leak_audit.gate.breach",
    "LeakageAudit": "leak_audit.callback",
    "GatePolicy": "leak_audit.gate.policy",
    "MetricRule": "leak_audit.gate.policy",
    "PolicyError": "leak_audit.gate.policy",
    "AuditRecord": "leak_audit.results.records",
    "read_audit_log": "leak_audit.results.records",
    "select_run": "leak_audit.results.records",
    "ModuleSelectionError": "leak_audit.capture.tap",
}
"""The module that defines each public name."""


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (then it is an ordinary module attribute)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's attributes, the not yet imported public names included."""
    return sorted({*globals(), *__all__})
