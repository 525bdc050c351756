"""leak_audit: measure, while you train, how much of each batch an attacker could rebuild from the gradients."""

from leak_audit.attacks import Attack, AttackInput, NotApplicable, Reconstruction, available_attacks, get_attack
from leak_audit.capture.batch import BatchAdapterError, ImageBatch, TextBatch
from leak_audit.gate.breach import LeakageThresholdExceeded
from leak_audit.callback import LeakageAudit
from leak_audit.gate.policy import GatePolicy, MetricRule, PolicyError
from leak_audit.results.records import AuditRecord, read_audit_log
from leak_audit.capture.tap import ModuleSelectionError

__all__ = [
    "Attack",
    "AttackInput",
    "AuditRecord",
    "BatchAdapterError",
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
]
__version__ = "0.1.0"
