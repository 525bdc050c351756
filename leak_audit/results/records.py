"""The audit log's record schema, and a strict reader for it.

``audit.jsonl`` holds one JSON object per line, one line per (audit, attack)::

    {"schema": 1, "time": "2026-11-21T17:02:03.120Z", "run": "20261121T165812Z-3f2a9c", "audit": 3, "step": 150,
     "epoch": 0, "modules": ["model.bert.encoder.layer.0.attention.self.query"], "batch_size": 8,
     "attack": "span_check", "status": "ok", "error": null,
     "metrics": {"rouge1": 1.0, "token_recall": 1.0}, "seconds": 0.61, "info": {"rank": 96}}

``run`` names the training run (one ``Trainer.fit``, kept across a resume from its checkpoint) that wrote the
record: several runs can append to one log, and readers may take one of them (:func:`select_run`; the gate and the
report read every run unless told ``--run last`` or a run id). Logs written before the field existed read as one
run named ``""``.

``status`` is ``ok``, ``timeout`` (the attack's time budget ended it before it finished: missing
evidence, never a measured value; its partial metrics are in ``info`` as ``partial_<metric>`` and
``info["progress"]`` says how far it got), ``failed`` (``error`` says why; training went on) or
``skipped`` (the attack had nothing to work with in the tapped view, or the worker was still busy with an
earlier audit). Only ``ok`` records carry ``metrics``.

Two worst cases are kept apart. The *oracle* (``leak/max/*``, :func:`worst_values`) takes per audit the
attack that scored highest against the real batch: the worst case over the attack portfolio, which no
single attacker without the answer achieves. The *attacker's pick* (``info["attacker_pick"] = 1``,
``leak/pick/*``) is the one record per audit an attacker would keep from its own evidence, the smallest
gradient residual (``info["gradient_residual"]``).

An ``ok`` record with ``info["lower_bound"]`` (:data:`LOWER_BOUND`, a sentence saying why) comes from an attack
run where it is measured to read far less than published attacks do: its metrics are lower bounds.

A run with canaries (``LeakageAudit(canaries=m)``) ends with one more ``ok`` record whose ``attack`` is
:data:`CANARY_RECORD`: no ``metrics``, and ``privacy`` holding the accountant's ε and the canaries' empirical ε
over every step of the run (:func:`leak_audit.results.canaries.final_canary_record`). It is not an audit: it
counts in no audit total, and the gate's DP-fault check reads it as the run's last word.
``samples`` is present only when the user opted in with ``log_samples=True``: reference and reconstructed
text for text models; for image models never pixels, only ``[{"file": "samples/<name>.npz", "images": B}]``,
the path (relative to the log's folder) of the file holding the originals and reconstructions. Image
metrics are ``psnr`` (dB), ``ssim`` and ``label_accuracy``.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["CANARY_RECORD", "LOWER_BOUND", "PICK", "SCHEMA_VERSION", "STATUSES", "AuditLogError", "AuditRecord", "iso_now",
           "new_run_id", "read_audit_log", "run_ids", "select_run", "which_runs", "worst_values"]

SCHEMA_VERSION = 1
CANARY_RECORD = "canaries"
"""``attack`` of the record that closes a run with canaries (see the module docstring)."""
STATUSES: tuple[str, ...] = ("ok", "timeout", "failed", "skipped")
"""A record's status (see the module docstring); a gate rule's status is a verdict
(:data:`leak_audit.gate.policy.VERDICTS`)."""
PICK = "attacker_pick"
"""``info`` key (value ``1``) of the record an attacker without the answer would keep in its audit: the
smallest gradient residual (:mod:`leak_audit.attacks.evidence`)."""
LOWER_BOUND = "lower_bound"
"""``info`` key of an ``ok`` record whose attack ran where it is measured to fall far short of published attacks
(e.g. ``span_check`` on LoRA adapters at ``B > 1``); its value says why. Its metrics are lower bounds: the gate
counts them toward a breach, never as evidence of a pass (:mod:`leak_audit.gate.policy`)."""


class AuditLogError(ValueError):
    """The audit log is missing or malformed. ``line`` is the 1-based line number, when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


def iso_now() -> str:
    """Current UTC time as ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """A fresh training-run id: the UTC start time and 6 random hex digits, e.g. ``"20261207T104500Z-a1b2c3"``
    (sortable by start time, unique across machines and ranks in practice)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@dataclass
class AuditRecord:
    """One line of the audit log: the outcome of one attack in one audit."""

    step: int
    attack: str
    status: str
    epoch: int = 0
    modules: list[str] = field(default_factory=list)
    batch_size: int = 0
    audit: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] | None = None
    privacy: dict[str, Any] | None = None
    time: str = field(default_factory=iso_now)
    run: str = ""
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> str:
        """One line of JSON (no trailing newline). ``samples`` is omitted when ``None``."""
        data = asdict(self)
        for optional in ("samples", "privacy"):
            if data[optional] is None:
                del data[optional]
        return json.dumps(data, separators=(",", ":"), default=_jsonable)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditRecord:
        """A record from a parsed log line; keys that are not fields are ignored (no validation: see :func:`read_audit_log`)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def run_ids(records: Iterable[AuditRecord]) -> list[str]:
    """The runs of ``records`` (their ``run`` fields), each once, in the order of their first record."""
    return list(dict.fromkeys(r.run for r in records))


def select_run(records: Sequence[AuditRecord], run: str = "last") -> list[AuditRecord]:
    """The records of one training run of a log (``read_audit_log``'s order: the file's).

    Args:
        records: an audit log's records, in file order.
        run: ``"last"`` (the run of the last record: the latest to write), ``"all"`` (every record), or a run
            id (:func:`run_ids`; ``""`` is the run of records written before runs were named).

    Raises:
        AuditLogError: ``run`` names no run of ``records`` (the message lists those it holds).
    """
    if run == "all" or not records:
        return list(records)
    wanted = records[-1].run if run == "last" else run
    chosen = [r for r in records if r.run == wanted]
    if not chosen:
        raise AuditLogError(f"run {run!r} is not in this audit log; its runs: {run_ids(records)} (or 'last', 'all')")
    return chosen


def which_runs(records: Sequence[AuditRecord], run: str) -> str:
    """Which runs :func:`select_run` ``(records, run)`` reads, in words, for a log of several runs
    (``"all 3 runs"``, ``"run <id> (2 of 3 runs)"``); ``""`` when the log holds one run or none."""
    runs = run_ids(records)
    if len(runs) < 2:
        return ""
    if run == "all":
        return f"all {len(runs)} runs"
    chosen = records[-1].run if run == "last" else run
    return f"run {chosen or 'unnamed'} ({runs.index(chosen) + 1} of {len(runs)} runs)" if chosen in runs else ""


def worst_values(
    records: Iterable[AuditRecord], worst: dict[str, tuple[float, str]] | None = None
) -> dict[str, tuple[float, str]]:
    """Per metric, the largest value over the ``ok`` records (every metric grows with leakage) and
    ``"<attack>@step <n>"`` where it was first reached: the oracle over attacks (see the module docstring).

    Args:
        records: audit records (other statuses are ignored).
        worst: a previous result to update in place (incremental use); ``None``: a new dict.
    """
    worst = {} if worst is None else worst
    for r in records:
        if r.status != "ok":
            continue
        for name, value in r.metrics.items():
            if name not in worst or float(value) > worst[name][0]:
                worst[name] = (float(value), f"{r.attack}@step {r.step}")
    return worst


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


_REQUIRED = {"schema": int, "step": int, "attack": str, "status": str, "metrics": dict}
_OPTIONAL = {"epoch": int, "audit": int, "batch_size": int, "seconds": int | float, "modules": list,
             "error": str | None, "info": dict, "samples": list | None, "privacy": dict | None, "time": str, "run": str}


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield number, line


def read_audit_log(path: str | Path) -> list[AuditRecord]:
    """Read and validate every record of an ``audit.jsonl``.

    Raises:
        AuditLogError: the file is missing or unreadable, or a line is not a valid record (the message
            and ``.line`` give its number).
    """
    path = Path(path)
    if not path.is_file():
        raise AuditLogError(f"audit log not found: {path}")
    records = []
    try:
        lines = list(_iter_lines(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditLogError(f"cannot read {path}: {exc}") from exc
    for number, line in lines:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditLogError(f"{path}:{number}: not valid JSON ({exc.msg})", number) from exc
        if not isinstance(data, dict):
            raise AuditLogError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}", number)
        for key, typ in _REQUIRED.items():
            if not isinstance(data.get(key), typ):
                raise AuditLogError(f"{path}:{number}: field {key!r} missing or not {typ.__name__}", number)
        for key, typ in _OPTIONAL.items():  # readers (gate, report) rely on these types
            if key in data and (not isinstance(data[key], typ) or isinstance(data[key], bool)):
                raise AuditLogError(f"{path}:{number}: field {key!r} has the wrong type "
                                    f"({type(data[key]).__name__})", number)
        if not all(isinstance(m, str) for m in data.get("modules", [])):
            raise AuditLogError(f"{path}:{number}: field 'modules' must be a list of strings", number)
        if data["schema"] > SCHEMA_VERSION:
            raise AuditLogError(
                f"{path}:{number}: schema {data['schema']} is newer than this leak_audit ({SCHEMA_VERSION})", number
            )
        bad = [k for k, v in data["metrics"].items() if not isinstance(v, int | float) or isinstance(v, bool)]
        if bad:
            raise AuditLogError(f"{path}:{number}: non-numeric metric values for {bad}", number)
        if any(isinstance(v, float) and math.isnan(v) for v in data["metrics"].values()):
            raise AuditLogError(f"{path}:{number}: NaN metric value", number)
        try:
            records.append(AuditRecord.from_dict(data))
        except (TypeError, ValueError) as exc:
            raise AuditLogError(f"{path}:{number}: {exc}", number) from exc
    return records
