"""``LeakageAudit``: a Lightning callback that measures gradient leakage while you train.

It only wires pieces together: the :class:`~leak_audit.capture.tap.GradientTap` chooses parameters, the
callback copies what one audit needs into an :class:`~leak_audit.capture.snapshot.AuditSnapshot` on the
training thread, an :class:`~leak_audit.runtime.worker.AuditWorker` runs the :class:`~leak_audit.runtime.auditor.Auditor`
in the background, and finished audits are drained on the Trainer's thread into the audit log, every
logger and the progress bar.

What is captured, and when (automatic optimization):

* ``on_train_batch_start``: the micro-batch (every micro-batch of an audited accumulation window);
* ``on_before_optimizer_step``: parameter values the attacks need, *before* the update;
* ``on_train_batch_end`` of the micro-batch that stepped: the gradients, which at that point are
  exactly what the optimizer applied (accumulated, after Lightning's gradient clipping).

With an Opacus ``DPOptimizer`` (detected at ``on_train_start``) the gradients are instead copied by a
step pre-hook on its ``original_optimizer`` (:class:`~leak_audit.capture.privacy.ReleasedGradientCapture`): after
per-sample clipping, noise and scaling, before the update: the gradient DP-SGD releases, not the
non-private one Lightning's hooks see. The DP state (σ, C, the accountant's history) is copied with it,
and the worker computes ε at δ next to the leakage.

Text or images (``modality``, decided at ``setup``): a text model is a Hugging Face BERT-family model
(:class:`~leak_audit.models.TextModelSpec`, :class:`~leak_audit.models.replica.ModelReplica`, text attacks and
:class:`~leak_audit.metrics.scoring.TextScorer`); an image model is any classifier from ``[B, C, H, W]`` images to
logits (:class:`~leak_audit.models.ImageModelSpec`, :class:`~leak_audit.models.image_replica.ImageReplica`,
image attacks and :class:`~leak_audit.metrics.scoring.ImageScorer`). Everything else is shared.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from leak_audit.attacks import Attack, check_attack_name, get_attack
from leak_audit.runtime.auditor import Auditor, failed_records
from leak_audit.capture.distributed import gather_to_all
from leak_audit.capture.batch import (
    BatchAdapter,
    BatchAdapterError,
    ImageBatch,
    TextBatch,
    default_batch_adapter,
    default_image_batch_adapter,
)
from leak_audit.models.image_replica import ImageReplica
from leak_audit.models import (
    MODALITIES,
    TextModelSpec,
    find_hf_model,
    image_model_spec,
    model_modality,
    text_model_spec,
)
from leak_audit.capture.privacy import (
    DEFAULT_DELTA,
    ReleasedGradientCapture,
    dp_state,
    find_accountant,
    find_dp_optimizer,
)
from leak_audit.runtime.recompute import EvalRecompute
from leak_audit.models.replica import ModelReplica
from leak_audit.results.records import AuditLogError, AuditRecord, read_audit_log
from leak_audit.metrics.scoring import ImageScorer
from leak_audit.gate.breach import BREACH_ACTIONS, Breach, LeakageThresholdExceeded, find_breaches
from leak_audit.gate.policy import STATUSES, GateError, GatePolicy, GateReport
from leak_audit.results.sinks import AuditLog, flatten_metrics, log_to_loggers, wandb_loggers
from leak_audit.results.wandb_dashboard import WandbDashboard
from leak_audit.capture.snapshot import AuditSnapshot
from leak_audit.capture.tap import GradientTap, LocalGradientCapture
from leak_audit.runtime.worker import WORKER_KINDS, AuditWorker, PeakMemory, ProcessAuditWorker

__all__ = ["LeakageAudit", "DEFAULT_ATTACKS", "DEFAULT_IMAGE_ATTACKS"]

DEFAULT_ATTACKS: tuple[str, ...] = ("token_bag", "span_check", "span_attention", "labels")
"""Text attacks run when ``attacks`` is not given."""
DEFAULT_IMAGE_ATTACKS: tuple[str, ...] = ("dlg",)
"""Image attacks run when ``attacks`` is not given: DLG, bounded to 1000 evaluations and 30 s per audit."""
_DEFAULTS = {"text": DEFAULT_ATTACKS, "image": DEFAULT_IMAGE_ATTACKS}
SMALL_NOISE_MULTIPLIER = 0.01
"""Below this DP noise multiplier gradient_matching measurably beats the default attacks
(benchmarks/README.md, DP-SGD section); the callback warns when it is not among the attacks."""
PROGRESS_BAR_KEY = "leak/max/rouge1"
PROGRESS_BAR_KEYS = {"text": PROGRESS_BAR_KEY, "image": "leak/max/psnr"}
MODALITY_CHOICES: tuple[str, ...] = ("auto", *MODALITIES)
SCOPES: tuple[str, ...] = ("global", "local")


@dataclass
class _Window:
    """The micro-batches of one audited optimizer step, collected until the step happens."""

    step: int
    batches: list[TextBatch | ImageBatch] = field(default_factory=list)
    params: dict[str, torch.Tensor] | None = None
    copied_bytes: int = 0
    capture_seconds: float = 0.0
    error: BaseException | None = None


class LeakageAudit(Callback):
    r"""Run gradient-inversion attacks on the training gradients every ``every_n_steps`` optimizer steps.

    Args:
        modules: submodules whose parameter gradients the attacker observes: names relative to the
            LightningModule or to the model inside it (``"bert.encoder.layer.0.attention.self.query"``,
            ``"fc"``), globs (``"*.attention.self.query"``), or ``None`` for the whole model.
        every_n_steps: audit the optimizer steps ``0, N, 2N, ...`` (counted like ``trainer.global_step``).
        attacks: attack names registered for the model's modality, or :class:`~leak_audit.attacks.Attack`
            objects; ``None``: :data:`DEFAULT_ATTACKS` for text, :data:`DEFAULT_IMAGE_ATTACKS` for images.
            Names are checked at construction against the registry (both modalities under ``"auto"``),
            and resolved for the model's modality at ``setup`` (``"dlg"`` is the text or the image DLG).
        log_dir: directory of ``audit.jsonl`` (and, for images with ``log_samples``, of ``samples/``).
        log_samples: store and send original and reconstructed text; for images, write each audit's
            originals and reconstructions to ``log_dir/samples/*.npz`` (the record holds the file name,
            never pixels). Off by default: reconstructions *are* the private data.
        recompute: ``"observed"`` (default) attacks exactly the gradient the optimizer applied, dropout
            included: what actually leaves a client or goes into DP accounting. ``"eval"`` re-runs the
            step with dropout off on a private model copy: the worst-case attacker who controls the model.
        batch_adapter: ``fn(batch) -> TextBatch`` (text) or ``fn(batch) -> ImageBatch`` (images) for other
            batch layouts than the defaults (:func:`~leak_audit.capture.batch.default_batch_adapter`,
            :func:`~leak_audit.capture.batch.default_image_batch_adapter`).
        tokenizer: decodes reconstructions for ROUGE; defaults to ``pl_module.tokenizer`` if present.
        max_pending: audits in flight at once; a due audit is skipped (and counted) while the worker is
            busy, never queued without bound.
        max_seconds: time budget of *each* attack of an audit (seconds, from the attack's start; ``None``:
            unbounded), so a slow attack cannot starve another; an audit takes at most about
            ``len(attacks) * max_seconds``. An attack stopped by it is recorded as ``timeout``: missing
            evidence for the gate, never a low value.
        worker_threads: intra-op threads of the background worker on CPU.
        worker_niceness: Linux ``nice`` value (0..19) of the worker, so busy cores serve training first;
            ``None`` leaves it alone.
        worker: ``"thread"`` (default): attacks run on a background thread (and a side CUDA stream on a
            GPU). ``"process"``: on a child process forked at ``on_train_start`` (CPU attacks only), with
            its own interpreter lock; snapshots reach it through shared memory
            (:class:`~leak_audit.runtime.worker.ProcessAuditWorker`).
        policy: the leakage policy to check while training: a :class:`~leak_audit.gate.policy.GatePolicy`, the
            path of a policy TOML file (the release gate's, ``leak-audit gate --policy``), or its parsed
            mapping (``{"rule": [{"metric": "rouge1", "max": 0.5}, ...]}``, e.g. from a LightningCLI YAML).
            Evaluated on rank zero after every finished audit over the run's successful audits; the
            verdict goes to the loggers (``gate/verdict``: 0 pass, 1 warn, 2 fail; rules with no measured
            value yet do not count) and the W&B summary.
        on_breach: what a breached rule (a measured value beyond its limit) does
            (:mod:`leak_audit.gate.breach`): ``"warn"`` (default), ``"stop"`` (``trainer.should_stop``, the
            decision reduced across ranks) or ``"raise"`` (:class:`~leak_audit.gate.breach.LeakageThresholdExceeded`).
        wandb_alert: with a ``WandbLogger`` and a policy, send a W&B alert (``run.alert``) per breached rule.
        end_timeout: seconds to wait at the end of training for audits still running.
        seed: seed of the attacks' private random generator.
        delta: δ at which ε is reported under DP-SGD, in ``(0, 1)``; ``None``: ``1/N`` when the train
            dataloader's dataset has a length ``N``, else :data:`~leak_audit.capture.privacy.DEFAULT_DELTA` (1e-5).
        privacy_engine: the Opacus ``PrivacyEngine`` (or its accountant) whose ε to report; ``None``: found
            on the LightningModule (attribute ``privacy_engine``) or, read-only, inside the
            ``DPOptimizer``'s accountant hook.
        modality: ``"text"``, ``"image"`` or ``"auto"`` (default), decided at ``setup`` from the model alone
            (:func:`~leak_audit.models.model_modality`), never from a batch, so a wrong guess fails before
            training starts: a Hugging Face model inside decides by its ``main_input_name``
            (``input_ids``: text, ``pixel_values``: images); without one the model is audited as an image
            classifier (the text attacks need a Hugging Face BERT-family model).
        network: images only: the module name, inside the LightningModule, of the classifier that maps the
            training images to logits (``""``: the LightningModule's own ``forward``); ``None`` finds it
            (:func:`~leak_audit.models.find_image_network`: a Hugging Face image model, else the one child
            holding every trainable parameter, else the LightningModule's ``forward``). Image attacks run a
            private copy of it in eval mode with batch-mean cross-entropy.
        scope: what the attacker observes under multi-process training (``strategy="ddp"``).
            ``"global"`` (default): the gradient the optimizer applies, averaged over every rank's batch,
            attacked on rank 0 against the global batch (each audited step gathers the ranks' inputs to
            rank 0). ``"local"``: every rank attacks its own gradient before DDP's all-reduce (and before
            gradient clipping, which acts on the reduced gradient): what one federated client would send.
            Records then carry ``info["process_rank"]``. With one process both scopes audit the same batch;
            ``"local"`` reads the gradient from backward hooks, before clipping.
        attack_device: where the attacks run (``"cpu"``, ``"cuda:1"``, ...); ``None``: the training device.
            Snapshots are copied there by the worker, and frozen weights once.

    Under DDP, logging and the audit log are rank-zero: with ``scope="local"`` the other ranks' finished
    audits reach rank 0 at the next audited step (or at the end of training); after an exception only
    rank 0's own audits are written.

    Raises:
        ValueError: an argument is out of range or names an unknown attack (eagerly, at construction);
            at ``setup``, a module pattern matches nothing or only frozen modules
            (:class:`~leak_audit.capture.tap.ModuleSelectionError`), no attack can use the tapped view, an attack
            does not exist for the model's modality, ``recompute="eval"`` on an image model, or ``network``
            on a text model.
        UnsupportedModelError: at ``setup``, no network can be found (images) or the model is no
            BERT-family model (text).

    Example::

        audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", every_n_steps=50)
        Trainer(callbacks=[audit]).fit(model, datamodule)
        audit = LeakageAudit(every_n_steps=50)                  # a CNN: DLG on the whole model's gradient
        Trainer(callbacks=[audit]).fit(cnn_module, image_loader)
    """

    def __init__(
        self,
        modules: str | Sequence[str] | None = None,
        every_n_steps: int = 50,
        attacks: Iterable[str | Attack] | None = None,
        log_dir: str | Path = "leak_audit_logs",
        log_samples: bool = False,
        recompute: str = "observed",
        batch_adapter: BatchAdapter | None = None,
        tokenizer: Any = None,
        max_pending: int = 1,
        max_seconds: float | None = 60.0,
        worker_threads: int | None = 1,
        worker_niceness: int | None = 19,
        end_timeout: float | None = 600.0,
        seed: int = 0,
        delta: float | None = None,
        privacy_engine: Any = None,
        modality: str = "auto",
        network: str | None = None,
        scope: str = "global",
        attack_device: str | torch.device | None = None,
        worker: str = "thread",
        policy: GatePolicy | str | Path | dict[str, Any] | None = None,
        on_breach: str = "warn",
        wandb_alert: bool = False,
    ) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        if recompute not in ("observed", "eval"):
            raise ValueError(f"recompute must be 'observed' or 'eval', got {recompute!r}")
        if not isinstance(log_samples, bool):
            raise ValueError(f"log_samples must be a bool, got {log_samples!r}")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive or None, got {max_seconds!r}")
        if worker_threads is not None and worker_threads < 1:
            raise ValueError(f"worker_threads must be >= 1 or None, got {worker_threads!r}")
        if worker_niceness is not None and not 0 <= worker_niceness <= 19:
            raise ValueError(f"worker_niceness must be in 0..19 or None, got {worker_niceness!r}")
        if delta is not None and not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1) or None, got {delta!r}")
        if batch_adapter is not None and not callable(batch_adapter):
            raise ValueError(f"batch_adapter must be callable, got {batch_adapter!r}")
        if modality not in MODALITY_CHOICES:
            raise ValueError(f"modality must be one of {', '.join(map(repr, MODALITY_CHOICES))}, got {modality!r}")
        if network is not None and not isinstance(network, str):
            raise ValueError(f"network must be a module name (str) or None, got {network!r}")
        if worker not in WORKER_KINDS:
            raise ValueError(f"worker must be one of {', '.join(map(repr, WORKER_KINDS))}, got {worker!r}")
        if on_breach not in BREACH_ACTIONS:
            raise ValueError(f"on_breach must be one of {', '.join(map(repr, BREACH_ACTIONS))}, got {on_breach!r}")
        if not isinstance(wandb_alert, bool):
            raise ValueError(f"wandb_alert must be a bool, got {wandb_alert!r}")
        self.policy = GatePolicy.coerce(policy)  # a malformed policy fails here (PolicyError, a ValueError)
        if self.policy is None and (on_breach != "warn" or wandb_alert):
            raise ValueError(f"on_breach={on_breach!r} / wandb_alert={wandb_alert} act on a policy: pass policy= "
                             "(a GatePolicy, a policy TOML path, or a mapping with 'rule' entries)")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
        if attack_device is not None:
            try:
                attack_device = torch.device(attack_device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"attack_device must name a torch device ('cpu', 'cuda', 'cuda:1', ...) or be None, "
                                 f"got {attack_device!r}") from exc
        if isinstance(modules, str):
            modules = [modules]
        self.modules = list(modules) if modules is not None else None
        self.every_n_steps = every_n_steps
        self.modality = modality
        self.network = network
        self._requested = list(attacks) if attacks is not None else None
        if self._requested is not None:
            if not self._requested:
                raise ValueError("attacks is empty; name at least one (e.g. 'span_check', or 'dlg' for images), "
                                 "or pass None for the defaults")
            allowed = MODALITIES if modality == "auto" else (modality,)
            for a in self._requested:
                if isinstance(a, str):
                    check_attack_name(a, allowed)
                elif isinstance(a, Attack):
                    if a.modality not in allowed:
                        raise ValueError(f"attack {a!r} reads {a.modality} models, but modality={modality!r}")
                else:
                    raise TypeError(f"attacks are names or Attack objects, got {type(a).__name__}: {a!r}")
            names = [a if isinstance(a, str) else a.name for a in self._requested]
            if len(set(names)) != len(names):
                raise ValueError(f"attacks must have distinct names, got {names}")
        # resolved for the model's modality at `setup`; right away when the modality is given
        self.attacks: list[Attack] = [] if modality == "auto" else self._resolve_attacks(modality)
        self.log_dir = Path(log_dir)
        self.log_samples = log_samples
        self.recompute = recompute
        self.batch_adapter = batch_adapter
        self.tokenizer = tokenizer
        self.max_pending = max_pending
        self.max_seconds = max_seconds
        self.worker_threads = worker_threads
        self.worker_niceness = worker_niceness
        self.end_timeout = end_timeout
        self.seed = seed
        self.delta = delta
        self.privacy_engine = privacy_engine
        self.scope = scope
        self.attack_device = attack_device
        self.worker = worker
        self.on_breach = on_breach
        self.wandb_alert = wandb_alert
        # run state (also in state_dict)
        self.audits = 0
        self.skipped = 0
        self.failed = 0
        self.timeouts = 0
        self.last_audited_step = -1
        self.worst: dict[str, float] = {}
        self.breach: Breach | None = None  # the first breached policy rule, if any
        self.verdict: str | None = None  # the policy's latest verdict: "pass", "warn" or "fail"
        # set up in `setup`
        self._active = False
        self._tap: GradientTap | None = None
        self._auditor: Auditor | None = None
        self._modality: str | None = None  # "text" or "image", set at `setup`
        self._adapter: BatchAdapter = batch_adapter or default_batch_adapter
        self._spec: TextModelSpec | None = None
        self._worker: AuditWorker[AuditSnapshot, list[AuditRecord]] | ProcessAuditWorker[AuditSnapshot, list[AuditRecord]] | None = None
        self._attacks_here = False  # whether this rank runs attacks (set at `setup`)
        self._log: AuditLog | None = None
        self._window: _Window | None = None
        self._all_params: dict[str, torch.nn.Parameter] = {}
        self._warned: set[str] = set()
        # DP-SGD (set up in `on_train_start`, once the optimizers exist)
        self._accountant: Any = None
        self._sample_rate: float | None = None
        self._capture: ReleasedGradientCapture | None = None
        self._delta: float = DEFAULT_DELTA
        # placement and multi-process state (set at `setup` / `on_train_start`)
        self._rank = 0
        self._world = 1
        self._local: LocalGradientCapture | None = None
        self._device: torch.device | None = None  # where the attacks run
        self._built_on: torch.device | None = None  # the model's device when the auditor was built
        self._frozen: dict[str, torch.Tensor] = {}  # frozen weights copied to another attack device
        self._fork_versions: dict[str, int] = {}  # worker="process": frozen parameters' versions at the fork
        self._buffer: list[list[AuditRecord]] = []  # scope="local" under DDP: results waiting for an exchange
        self._skipped_elsewhere: dict[int, int] = {}  # other ranks' skip counts (scope="local")
        # policy and dashboards (rank 0)
        self._history: list[AuditRecord] = []  # successful records so far, without samples, for the policy
        self._resumed = False
        self._dashboards: list[WandbDashboard] | None = None

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules, every_n_steps=self.every_n_steps)

    @property
    def log_path(self) -> Path:
        """The audit log, ``log_dir / "audit.jsonl"``."""
        return self.log_dir / "audit.jsonl"

    @property
    def next_audit_step(self) -> int:
        """The first optimizer step the schedule audits from now on."""
        n = self.every_n_steps
        return 0 if self.last_audited_step < 0 else (self.last_audited_step // n + 1) * n

    def state_dict(self) -> dict[str, Any]:
        """Audits done, skipped and failed, the schedule's position, worst values so far, and the log path.

        Saved in the checkpoint, so a run resumed from it continues the schedule (no step is audited
        twice) and appends to the same audit log.
        """
        return {
            "audits": self.audits,
            "skipped": self.skipped,
            "failed": self.failed,
            "timeouts": self.timeouts,
            "last_audited_step": self.last_audited_step,
            "next_audit_step": self.next_audit_step,
            "worst": dict(self.worst),
            "log_path": str(self.log_path),
            "verdict": self.verdict,
            "breach": self.breach.to_dict() if self.breach else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.audits = int(state_dict.get("audits", 0))
        self.skipped = int(state_dict.get("skipped", 0))
        self.failed = int(state_dict.get("failed", 0))
        self.timeouts = int(state_dict.get("timeouts", 0))
        self.last_audited_step = int(state_dict.get("last_audited_step", -1))
        self.worst = dict(state_dict.get("worst", {}))
        self.verdict = state_dict.get("verdict")
        saved_breach = state_dict.get("breach")
        self.breach = Breach(**saved_breach) if isinstance(saved_breach, dict) else None
        self._resumed = True  # the policy's history is read back from the audit log at `on_train_start`
        saved = state_dict.get("log_path")
        if saved and Path(saved).resolve() != self.log_path.resolve():
            rank_zero_warn(f"LeakageAudit: the checkpoint's audit log was {saved}; this run appends to {self.log_path} "
                           "(pass log_dir= to continue the old one)")

    # ------------------------------------------------------------------ setup / teardown
    def _resolve_attacks(self, modality: str) -> list[Attack]:
        return [get_attack(a, modality) for a in (self._requested or _DEFAULTS[modality])]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._active:
            return
        self._modality = self.modality if self.modality != "auto" else model_modality(pl_module)
        self.attacks = self._resolve_attacks(self._modality)
        self._tap = GradientTap(pl_module, self.modules)
        self._auditor = self._build_auditor(pl_module)
        self._built_on = pl_module.device
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
        if self._modality == "text" and tokenizer is None:
            rank_zero_warn(
                "LeakageAudit: no tokenizer (pass tokenizer= or set pl_module.tokenizer); "
                "ROUGE is computed on token ids instead of words."
            )
        if not self._auditor.applicable:
            reasons = "; ".join(f"{n}: {p}" for n, p in self._auditor.plan.items())
            raise ValueError(f"no attack can use the tapped modules {list(self._tap.modules)}: {reasons}")
        for name, plan in self._auditor.plan.items():
            if isinstance(plan, str):
                rank_zero_warn(f"LeakageAudit: attack {name!r} is skipped for this view: {plan}")
        self._all_params = dict(pl_module.named_parameters())
        self._rank, self._world = trainer.global_rank, trainer.world_size
        if trainer.is_global_zero:
            self._log = AuditLog(self.log_path)
        if self.worker == "process":  # checked on every rank, so no rank fails alone and leaves the others waiting
            where = {trainer.strategy.root_device.type, *( [self.attack_device.type] if self.attack_device else [])}
            if where != {"cpu"}:
                raise ValueError(f"LeakageAudit(worker='process') forks a CPU process, for CPU training only (training "
                                 f"on {trainer.strategy.root_device}, attacks on {self.attack_device or 'the same'}): "
                                 "use worker='thread'")
        self._attacks_here = self.scope == "local" or trainer.is_global_zero  # global scope: only rank 0 attacks
        if self._attacks_here and self.worker == "thread":
            self._worker = AuditWorker(
                self._run_audit, self._audit_crashed, max_pending=self.max_pending, num_threads=self.worker_threads,
                niceness=self.worker_niceness,
            )
        if self.scope == "local" and self.recompute == "observed":
            self._local = LocalGradientCapture(self._tap.parameters)
        self._active = True
        where = f"; scope {self.scope} over {self._world} processes" if self._world > 1 else ""
        rank_zero_info(
            f"LeakageAudit: {self._modality} model; tapping {len(self._tap.parameters)} tensors "
            f"({self._tap.numel:,} parameters) in {len(self._tap.modules)} module(s); attacks "
            f"{self._auditor.applicable}; every {self.every_n_steps} steps{where}; log {self.log_path}"
        )

    def _build_auditor(self, pl_module: LightningModule, device: torch.device | None = None) -> Auditor:
        if self._modality == "text":
            return self._text_auditor(pl_module, device)
        return self._image_auditor(pl_module, device)

    def _text_auditor(self, pl_module: LightningModule, device: torch.device | None = None) -> Auditor:
        """Hugging Face BERT-family model: text spec, storage-sharing replica, optional eval recompute."""
        assert self._tap is not None
        if self.network is not None:
            raise ValueError(f"network={self.network!r} applies to image models; the text audit finds the Hugging "
                             "Face model itself (pass modality='image' if this is an image model)")
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
        self._spec = text_model_spec(pl_module).with_tokenizer(tokenizer)
        hf_name, hf_model = find_hf_model(pl_module)
        replica = ModelReplica(hf_model, hf_name, device)  # shares the live parameters' storage on their device
        return Auditor(
            self._spec,
            self.attacks,
            self._tap.parameters.keys(),
            _decoder(tokenizer),
            log_samples=self.log_samples,
            recompute=self.recompute,
            recomputer=EvalRecompute(replica) if self.recompute == "eval" else None,
            max_seconds=self.max_seconds,
            seed=self.seed,
            replica=replica,
        )

    def _image_auditor(self, pl_module: LightningModule, device: torch.device | None = None) -> Auditor:
        """Image classifier: image spec, storage-sharing replica of its network, image scorer."""
        assert self._tap is not None
        if self.recompute == "eval":
            raise ValueError("recompute='eval' is implemented for text models only; image audits attack the observed "
                             "gradient (recompute='observed')")
        if self.batch_adapter is None:
            self._adapter = default_image_batch_adapter
        spec = image_model_spec(pl_module, self.network)
        replica = ImageReplica(pl_module.get_submodule(spec.network), prefix=spec.network, device=device)
        scorer = ImageScorer(samples_dir=self.log_dir / "samples" if self.log_samples else None)
        return Auditor(
            spec,
            self.attacks,
            self._tap.parameters.keys(),
            scorer=scorer,
            max_seconds=self.max_seconds,
            seed=self.seed,
            replica=replica,
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        if self._device is None:
            # The strategy has placed the model by now (it may not have at `setup`): if it moved, or the attacks
            # run elsewhere, the replica is rebuilt to share the placed weights, on the attack device.
            self._device = self.attack_device if self.attack_device is not None else pl_module.device
            if self._attacks_here and (pl_module.device != self._built_on or self._device != self._built_on):
                self._auditor = self._build_auditor(pl_module, self._device)
            self._all_params = dict(pl_module.named_parameters())
        if self._capture is None:
            self._setup_dp(trainer, pl_module)
        if self._resumed and self.policy is not None and trainer.is_global_zero and not self._history:
            self._history = self._read_history()
        if self._attacks_here and self._worker is None and self.worker == "process":
            # forked now, once the replica, the DP setup and the log are final: the child holds a copy of them;
            # frozen weights are not sent while they stay as they were at the fork (same tensor version)
            self._fork_versions = {n: p._version for n, p in self._all_params.items() if not p.requires_grad}
            self._worker = ProcessAuditWorker(
                self._run_audit, self._audit_crashed, max_pending=self.max_pending, num_threads=self.worker_threads,
                niceness=self.worker_niceness,
            )

    def _read_history(self) -> list[AuditRecord]:
        """A resumed run's earlier successful audits, from its audit log, so the policy sees the whole run."""
        if not self.log_path.is_file():
            return []
        try:
            records = read_audit_log(self.log_path)
        except AuditLogError as exc:
            rank_zero_warn(f"LeakageAudit: the policy starts without the earlier audits: {exc}")
            return []
        return [_light(r) for r in records if r.status in _JUDGED and r.step <= self.last_audited_step]

    def _setup_dp(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dp = find_dp_optimizer(trainer.optimizers)
        if dp is None:
            return
        if self.recompute == "eval":
            raise ValueError(
                "LeakageAudit(recompute='eval') re-computes a gradient without DP noise, but this run trains with "
                "an Opacus DPOptimizer, which releases the clipped and noised gradient: use recompute='observed'"
            )
        if self.scope == "local":
            raise ValueError("LeakageAudit(scope='local') reads gradients before DP-SGD clips and noises them; with an "
                             "Opacus DPOptimizer use scope='global', which audits the released gradient")
        assert self._tap is not None and self._auditor is not None
        self._accountant, self._sample_rate = find_accountant(dp, self.privacy_engine, pl_module)
        self._delta = self.delta if self.delta is not None else _default_delta(trainer)
        self._capture = ReleasedGradientCapture(dp, self._tap.parameters)
        mechanism = self._accountant.mechanism() if self._accountant is not None else None
        if mechanism is None:
            rank_zero_warn(
                "LeakageAudit: DP-SGD detected but no Opacus accountant found (pass privacy_engine=); "
                "epsilon is not reported"
            )
        for logger in trainer.loggers:
            logger.log_hyperparams({"privacy/accountant": mechanism or "none", "privacy/delta": self._delta})
        if (self._modality == "text" and 0 < dp.noise_multiplier < SMALL_NOISE_MULTIPLIER
                and "gradient_matching" not in self._auditor.applicable):
            rank_zero_warn(
                f"LeakageAudit: noise multiplier {dp.noise_multiplier} < {SMALL_NOISE_MULTIPLIER}: at such noise the "
                "span attacks read nothing while gradient_matching still recovers text (CoLA, B=1: ROUGE-1 0.58 at "
                "sigma 1e-4); add attacks=(..., 'gradient_matching') for an honest worst case"
            )
        rank_zero_info(
            f"LeakageAudit: DP-SGD (noise multiplier {dp.noise_multiplier}, max grad norm {dp.max_grad_norm}, "
            f"accountant {mechanism}): auditing the released (clipped, noised) gradient; epsilon at delta={self._delta:g}"
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, self.end_timeout, log=True, collective=True)
        if self.on_breach == "raise":  # audits that finished after the last step can still breach
            self._decide(trainer, collective=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._finish(trainer, timeout=5.0, log=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish(trainer, self.end_timeout, log=False)

    def _finish(self, trainer: Trainer, timeout: float | None, *, log: bool, collective: bool = False) -> None:
        """Join the worker and write what it finished. ``collective``: every rank is here (end of training),
        so the other ranks' results can still be sent to rank 0."""
        if self._worker is not None:
            done = self._worker.close(timeout)
            if not done:
                self._warn_once("abandoned", f"LeakageAudit: an audit still running after {timeout}s was abandoned")
            self._collect(trainer, log=log)
            self._worker = None
        if self._exchanging and (collective or trainer.is_global_zero):
            self._exchange(trainer, log=log, collective=collective)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._local is not None:
            self._local.take()
        self._active = False

    # ------------------------------------------------------------------ capture
    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0 and step > self.last_audited_step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._active:
            return
        step = trainer.global_step
        if not self._due(step):
            return
        t0 = time.perf_counter()
        if self._window is None or self._window.step != step:
            self._window = _Window(step)
            assert self._auditor is not None
            if self._capture is not None:
                self._capture.arm(self._auditor.gradient_names)
            if self._local is not None:
                self._local.arm(self._auditor.gradient_names)
        try:
            read = self._adapter(batch)
            expected = ImageBatch if self._modality == "image" else TextBatch
            if not isinstance(read, expected):
                raise BatchAdapterError(f"batch_adapter returned {type(read).__name__}; a {self._modality} model "
                                        f"needs a leak_audit.{expected.__name__}")
            self._window.batches.append(read.detached_copy())
        except Exception as exc:  # noqa: BLE001 - a bad batch fails the audit, not training
            self._window.error = exc
        self._window.capture_seconds += time.perf_counter() - t0

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        w = self._window
        if not self._active or self._worker is None or w is None or w.step != trainer.global_step or w.params is not None:
            return
        assert self._auditor is not None
        t0 = time.perf_counter()
        w.params = {}
        for name in self._auditor.param_names:
            p = self._all_params[name]
            if p.requires_grad:  # trainable: the update is in place, so copy
                w.params[name] = p.detach().clone()
                w.copied_bytes += p.numel() * p.element_size()
            elif self._fork_versions.get(name) == p._version:  # frozen since the fork: the child has this copy
                continue  # (writes through ``p.data`` do not bump ``_version``: such a change goes unseen)
            elif isinstance(self._worker, ProcessAuditWorker):  # frozen, changed since the fork: copy it, since
                # the queue moves what it sends into shared memory (it would swap the live weight's storage)
                w.params[name] = p.detach().clone()
                w.copied_bytes += p.numel() * p.element_size()
            elif self._device is not None and p.device != self._device:  # frozen, attacked elsewhere: copy once
                if name not in self._frozen:
                    self._frozen[name] = p.detach().to(self._device)
                w.params[name] = self._frozen[name]
            else:  # frozen: shared, it never changes
                w.params[name] = p.detach()
        w.capture_seconds += time.perf_counter() - t0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        w = self._window
        audited = w is not None and trainer.global_step > w.step
        if audited:  # the audited optimizer step just happened
            assert w is not None
            self._window = None
            self.last_audited_step = w.step
            self._dispatch(trainer, w)
            if self._exchanging:  # every rank reaches this step: send finished audits to rank 0
                self._collect(trainer, log=True)
                self._exchange(trainer, log=True, collective=True)
        self._collect(trainer, log=True)
        if self.on_breach != "warn" and (audited or self._world == 1):  # a point every rank reaches
            self._decide(trainer, collective=self._world > 1)
        key = PROGRESS_BAR_KEYS.get(self._modality or "text", PROGRESS_BAR_KEY)
        if key in self.worst:
            pl_module.log(key, self.worst[key], prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)

    @property
    def _exchanging(self) -> bool:
        """Whether finished audits travel between ranks: ``scope="local"`` with several processes."""
        return self.scope == "local" and self._world > 1

    def _join(self, w: _Window) -> TextBatch | ImageBatch | None:
        """The window's micro-batches as one batch; ``None`` (with ``w.error`` set) when capture failed."""
        if w.error is None and w.batches:
            try:
                return self._concat(w.batches)
            except Exception as exc:  # noqa: BLE001 - micro-batches that do not join fail the audit
                w.error = exc
        return None

    def _gather_batch(self, batch: TextBatch | ImageBatch | None, w: _Window) -> TextBatch | ImageBatch | None:
        """``scope="global"`` under DDP: every rank's batch, joined in rank order on rank 0 (a collective)."""
        mine: TextBatch | ImageBatch | str = (
            batch.detached_copy("cpu") if batch is not None else f"rank {self._rank}: {w.error or 'no batch seen'}"
        )
        parts = gather_to_all(mine)
        bad = [p for p in parts if isinstance(p, str)]
        if bad:
            w.error = RuntimeError("; ".join(bad))  # type: ignore[arg-type]
            return None
        try:
            return self._concat(parts)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001
            w.error = exc
            return None

    def _dispatch(self, trainer: Trainer, w: _Window) -> None:
        assert self._tap is not None and self._auditor is not None
        self.audits += 1
        audit_id = self.audits
        attack_names = [a.name for a in self._auditor.attacks]
        released = self._capture.take() if self._capture is not None else None  # never kept past its step
        local = self._local.take() if self._local is not None else None
        batch = self._join(w)
        if self.scope == "global" and self._world > 1:
            batch = self._gather_batch(batch, w)  # every rank takes part; only rank 0 attacks
        if self._worker is None:
            return
        if batch is not None and w.params is None:
            w.error = RuntimeError("the optimizer step was not observed (on_before_optimizer_step did not run)")
            batch = None
        if batch is None:
            exc = w.error or RuntimeError("no batch was captured for this step")
            self._warn_once("capture", f"LeakageAudit: audit at step {w.step} failed: {exc}")
            self._emit(trainer, failed_records(self._empty_snapshot(trainer, w), attack_names, exc, audit_id))
            return
        assert w.params is not None
        if self._worker.busy:
            self.skipped += 1
            busy = RuntimeError("the worker was still busy with an earlier audit (max_pending reached)")
            self._emit(trainer, failed_records(self._empty_snapshot(trainer, w), attack_names, busy, audit_id,
                                               status="skipped"))
            return
        t0 = time.perf_counter()
        dp = None
        if self._capture is not None:
            if released is None:
                exc = RuntimeError("the DP optimizer skipped this step (a virtual step): nothing was released")
                self._emit(trainer, failed_records(self._empty_snapshot(trainer, w), attack_names, exc, audit_id))
                return
            grads = released
            dp = dp_state(self._capture.dp_optimizer, self._accountant, self._sample_rate)
        elif self.recompute == "eval":
            grads = {}
        elif local is not None:
            grads = local
        else:
            grads = self._tap.capture(self._auditor.gradient_names)
        copied = w.copied_bytes + sum(g.numel() * g.element_size() for g in grads.values())
        snap = AuditSnapshot(
            step=w.step,
            epoch=trainer.current_epoch,
            time=time.time(),
            gradients=grads,
            params=w.params,
            batch=batch,
            modules=self._tap.modules,
            copied_bytes=copied + batch.nbytes(),
            dp=dp,
            extra={"audit": audit_id},
        )
        ready = None
        cuda = [t for t in grads.values() if t.is_cuda]
        if cuda:  # after the copies, on the training stream of the gradients' GPU
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(cuda[0].device))
        snap.extra["capture_seconds"] = w.capture_seconds + time.perf_counter() - t0
        try:
            self._worker.submit(snap, ready)
        except Exception as exc:  # noqa: BLE001 - e.g. no fresh worker process could be forked: a failed audit
            self._warn_once("submit", f"LeakageAudit: audit at step {w.step} could not start: {exc}")
            self._emit(trainer, failed_records(snap, attack_names, exc, audit_id))

    def _concat(self, batches: Sequence[TextBatch | ImageBatch]) -> TextBatch | ImageBatch:
        """The micro-batches of one accumulation window (or of every rank) as one batch."""
        if all(isinstance(b, ImageBatch) for b in batches):
            return ImageBatch.concat(batches)  # type: ignore[arg-type]
        pad = self._spec.pad_token_id if self._spec and self._spec.pad_token_id is not None else 0
        return TextBatch.concat(batches, pad)  # type: ignore[arg-type]

    def _empty_snapshot(self, trainer: Trainer, w: _Window) -> AuditSnapshot:
        batch: TextBatch | ImageBatch
        if w.batches:
            batch = w.batches[0]
        elif self._modality == "image":
            batch = ImageBatch(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long))
        else:
            empty = torch.zeros(0, 0, dtype=torch.long)
            batch = TextBatch(empty, empty)
        return AuditSnapshot(
            step=w.step, epoch=trainer.current_epoch, time=time.time(), gradients={}, params={}, batch=batch,
            modules=self._tap.modules if self._tap else (),
        )

    # ------------------------------------------------------------------ worker side
    def _run_audit(self, snap: AuditSnapshot) -> list[AuditRecord]:
        assert self._auditor is not None
        missing = [n for n in self._auditor.param_names if n not in snap.params]
        if missing:  # frozen weights left out of a process worker's snapshot: the child's fork-time copy
            snap.params.update({n: self._all_params[n].detach() for n in missing})
        if self._device is not None:
            snap = snap.to(self._device)
        with PeakMemory(self._device) as peak:
            records = self._auditor(snap, audit=int(snap.extra.get("audit", 0)))  # type: ignore[arg-type]
        if snap.dp is not None:
            privacy = snap.dp.report(self._delta).to_dict()
            for r in records:
                r.privacy = privacy
        for r in records:
            r.info.setdefault("snapshot_bytes", snap.copied_bytes)
            if peak.bytes is not None:
                r.info.setdefault("peak_bytes", peak.bytes)
            r.info.setdefault("capture_seconds", round(float(snap.extra.get("capture_seconds", 0.0)), 6))  # type: ignore[arg-type]
        return self._persist(records)

    def _audit_crashed(self, snap: AuditSnapshot, exc: BaseException) -> list[AuditRecord]:
        names = [a.name for a in self._auditor.attacks] if self._auditor else ["?"]
        return self._persist(failed_records(snap, names, exc, int(snap.extra.get("audit", 0))))  # type: ignore[arg-type]

    def _persist(self, records: list[AuditRecord]) -> list[AuditRecord]:
        """Stamp the rank and, on rank 0, append to the audit log right away (from the worker thread), so a
        finished audit is durable before training even hears of it."""
        self._stamp(records)
        if self._log is not None:
            self._log.write(records)
        return records

    def _stamp(self, records: Sequence[AuditRecord]) -> None:
        if self._world > 1:
            for r in records:
                r.info.setdefault("process_rank", self._rank)
                r.info.setdefault("scope", self.scope)

    # ------------------------------------------------------------------ results
    def _emit(self, trainer: Trainer, records: list[AuditRecord]) -> None:
        """Records made on the Trainer's thread (skipped or failed audits): into the log now on rank 0, into
        the next exchange elsewhere."""
        self._stamp(records)
        if self._log is not None:
            self._log.write(records)
        if self._exchanging:
            self._buffer.append(records)
        else:
            self._report(trainer, [records], log=True)

    def _collect(self, trainer: Trainer, *, log: bool) -> None:
        """Results the worker finished (already in the log on rank 0): reported now, or buffered for the next
        exchange between ranks."""
        results = self._worker.drain() if self._worker is not None else []
        if self._exchanging:
            self._buffer.extend(results)
        else:
            self._report(trainer, results, log=log)

    def _exchange(self, trainer: Trainer, *, log: bool, collective: bool) -> None:
        """``scope="local"`` under DDP: every rank's buffered results to rank 0, which writes the other ranks'
        records to the log and reports every audited step once, over all ranks. Without ``collective``
        (after an exception) rank 0 reports only its own."""
        mine, self._buffer = self._buffer, []
        parts = gather_to_all((self.skipped, mine)) if collective else [(self.skipped, mine)]
        if not trainer.is_global_zero:
            return
        by_step: dict[int, list[AuditRecord]] = {}
        for rank, (skipped, results) in enumerate(parts):
            if rank != self._rank:
                self._skipped_elsewhere[rank] = int(skipped)
            for records in results:
                if rank != self._rank and self._log is not None:
                    self._log.write(records)
                if records:
                    by_step.setdefault(records[0].step, []).extend(records)
        self._report(trainer, [by_step[s] for s in sorted(by_step)], log=log)

    def _report(self, trainer: Trainer, results: Sequence[list[AuditRecord]], *, log: bool) -> None:
        """Counters, worst values, loggers and W&B samples for finished audits (already in the log)."""
        for records in results:
            if not records:
                continue
            failed = [r for r in records if r.status == "failed"]
            if failed:
                self._warn_once(
                    "failed", f"LeakageAudit: attack {failed[0].attack!r} failed at step {failed[0].step}: {failed[0].error}"
                )
            self.failed += any(r.status == "failed" for r in records)
            timeout = [r for r in records if r.status == "timeout"]
            if timeout:
                self._warn_once(
                    "timeout", f"LeakageAudit: attack {timeout[0].attack!r} ran out of time at step {timeout[0].step} "
                    f"({timeout[0].error}); a timed-out attack is missing evidence, not a low value: raise "
                    "max_seconds or audit less often"
                )
            self.timeouts += len(timeout)
            metrics = flatten_metrics(records)
            for key, value in metrics.items():
                if key.startswith("leak/"):
                    self.worst[key] = max(self.worst.get(key, float("-inf")), value)
            metrics["audit/skipped"] = float(self.skipped + sum(self._skipped_elsewhere.values()))
            step = records[0].step
            checked = self._check_policy(records, step)
            if checked is not None:
                metrics["gate/verdict"] = float(STATUSES.index(self.verdict or "pass"))
            if log:
                log_to_loggers(trainer.loggers, metrics, step=step)
                try:
                    for dashboard in self._wandb(trainer):
                        dashboard.update(records, step)
                        if checked is not None:
                            report, breaches = checked
                            dashboard.verdict(
                                self.verdict or "pass",
                                {r.rule.name: r.status if r.value is not None else "no data" for r in report.results},
                                {b.rule: b.message for b in breaches}, step,
                            )
                except Exception as exc:  # noqa: BLE001 - a dashboard error must not stop training
                    self._warn_once("wandb", f"LeakageAudit: the W&B dashboard failed at step {step}: {exc!r}")

    def _wandb(self, trainer: Trainer) -> list[WandbDashboard]:
        """One dashboard per ``WandbLogger`` (made at the first finished audit, on rank zero)."""
        if self._dashboards is None:
            self._dashboards = [
                WandbDashboard(lg.experiment, self._modality or "text", log_samples=self.log_samples,
                               log_dir=self.log_dir, alert=self.wandb_alert)
                for lg in wandb_loggers(trainer.loggers)
            ]
        return self._dashboards

    def _check_policy(self, records: Sequence[AuditRecord], step: int) -> tuple[GateReport, list[Breach]] | None:
        """Evaluate the policy over the run so far (rank zero); note the first breach and warn about each rule.
        Returns the report and its breaches, or ``None`` when there is nothing to judge."""
        if self.policy is None:
            return None
        self._history.extend(_light(r) for r in records if r.status in _JUDGED)
        try:
            report = self.policy.evaluate(self._history)
        except GateError:  # no successful audit yet: nothing to judge
            return None
        except Exception as exc:  # noqa: BLE001 - a policy that cannot be evaluated must not stop training
            self._warn_once("policy", f"LeakageAudit: the policy could not be evaluated at step {step}: {exc!r}")
            return None
        self.verdict = report.measured().verdict  # no evidence yet is not a verdict yet
        for result in report.results:
            if result.status == "warn":
                self._warn_once(f"policy-warn:{result.rule.name}", f"LeakageAudit: leakage warning at step {step}: "
                                f"{result.message}")
        breaches = find_breaches(report, step)
        for breach in breaches:
            if self.breach is None:
                self.breach = breach
            self._warn_once(f"policy-fail:{breach.rule}", f"LeakageAudit: leakage policy breached at step {step}: "
                            f"{breach.message}" + ("" if self.on_breach == "warn" else f" (on_breach={self.on_breach!r})"))
        return report, breaches

    def _decide(self, trainer: Trainer, *, collective: bool) -> None:
        """Act on a breach (``on_breach`` "stop" or "raise"), the decision reduced across ranks."""
        found = self.breach is not None
        if collective:
            found = bool(trainer.strategy.reduce_boolean_decision(found, all=False))
        if not found:
            return
        message = self.breach.message if self.breach is not None else ""
        if collective:  # the other ranks learn rank zero's message
            message = trainer.strategy.broadcast(message, src=0)
        if self.on_breach == "stop":
            if not trainer.should_stop:
                rank_zero_info(f"LeakageAudit: stopping training at step {trainer.global_step}: {message}")
            trainer.should_stop = True
        elif self.on_breach == "raise":
            step = self.breach.step if self.breach is not None else trainer.global_step
            raise LeakageThresholdExceeded(f"leakage policy breached (audit of step {step}): {message}", self.breach)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


_JUDGED = ("ok", "timeout")
"""Statuses the policy reads: measured values, and timed-out attacks (missing evidence, or a partial value
that already proves a breach)."""


def _light(record: AuditRecord) -> AuditRecord:
    """What the policy reads of a record (no samples; of ``info`` only partial values), so the run's
    history stays small."""
    return dataclasses.replace(record, samples=None, info={k: v for k, v in record.info.items() if k.startswith("partial_")})


def _default_delta(trainer: Trainer) -> float:
    """``1/N`` for a train set of ``N`` examples when its size is known, else ``DEFAULT_DELTA``."""
    try:
        n = len(trainer.train_dataloader.dataset)  # type: ignore[union-attr,arg-type]
    except Exception:  # noqa: BLE001 - an iterable dataset, or no dataloader yet
        return DEFAULT_DELTA
    return 1.0 / n if n > 1 else DEFAULT_DELTA


def _decoder(tokenizer: Any) -> Callable[[Sequence[int]], str] | None:
    """Token ids -> words with ``tokenizer``; ``None`` without one (the auditor then joins the ids)."""
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
