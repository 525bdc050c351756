"""``LeakageAudit``: a Lightning callback that measures gradient leakage while you train.

It only wires the rooms of the package together, hook by hook:

* ``setup``: the model's modality, the tapped modules (:class:`~leak_audit.capture.tap.GradientTap`) and the
  :class:`~leak_audit.runtime.auditor.Auditor` (:func:`~leak_audit.runtime.factory.build_auditor`);
* ``on_train_start``: the DP-SGD release hook (:func:`~leak_audit.capture.privacy.attach_dp_release`), the
  :class:`~leak_audit.capture.snapshotter.Snapshotter` and the background worker
  (:func:`~leak_audit.runtime.worker.make_worker`, running an :class:`~leak_audit.runtime.job.AuditJob`);
* the batch hooks: the snapshotter copies what one audit needs (:mod:`leak_audit.capture.snapshotter` says
  what is read at which hook) and hands it to the worker; finished audits go, on the Trainer's thread, to
  the :class:`~leak_audit.results.reporter.AuditReporter` (audit log, loggers, W&B) and the policy
  (:class:`~leak_audit.gate.breach.BreachMonitor`), and the worst value to the progress bar;
* ``state_dict`` / ``load_state_dict``: the schedule, counters, worst values and the policy's verdict.

The constructor's argument reference (LightningCLI builds its help from it) is about a fifth of the module;
its checks live in :mod:`leak_audit.options`, the choice of attacks in :mod:`leak_audit.attacks.defaults`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from leak_audit.attacks import (
    DEFAULT_ATTACKS, DEFAULT_DECODER_ATTACKS, DEFAULT_IMAGE_ATTACKS, Attack, check_requested, resolve_attacks,
)
from leak_audit.capture.batch import BatchAdapter, default_batch_adapter, default_image_batch_adapter
from leak_audit.capture.privacy import DEFAULT_DELTA, DPRelease, announce_dp_release, attach_dp_release, place_canaries
from leak_audit.capture.snapshot import AuditSnapshot
from leak_audit.capture.snapshotter import BatchWindow, Snapshotter
from leak_audit.capture.tap import GradientTap, LocalGradientCapture, trainable_modules
from leak_audit.gate.breach import Breach, BreachMonitor
from leak_audit.gate.policy import GatePolicy
from leak_audit.models import MODALITIES, TextModelSpec, model_modality, text_model_spec
from leak_audit.results.records import AuditRecord, new_run_id
from leak_audit.results.reporter import AuditReporter
from leak_audit.results.canaries import announce_canaries, final_canary_record
from leak_audit.results.sinks import AuditLog
from leak_audit.runtime.auditor import Auditor, failed_records
from leak_audit.runtime.factory import build_auditor, find_tokenizer
from leak_audit.runtime.job import AuditJob
from leak_audit.options import check_options
from leak_audit.runtime.worker import AuditWorker, check_worker_devices, make_worker

__all__ = ["DEFAULT_ATTACKS", "DEFAULT_DECODER_ATTACKS", "DEFAULT_IMAGE_ATTACKS", "LeakageAudit"]

PROGRESS_BAR_KEY = "leak/max/rouge1"
PROGRESS_BAR_KEYS = {"text": PROGRESS_BAR_KEY, "image": "leak/max/psnr"}

class LeakageAudit(Callback):
    r"""Run gradient-inversion attacks on the training gradients every ``every_n_steps`` optimizer steps.

    The full reference, with the defaults and links per argument, is ``docs/configuration.md``; LightningCLI
    builds its help from the lines below.

    Args:
        modules: submodules whose parameter gradients the attacker observes: names relative to the
            LightningModule or the model inside it, globs (``"*.attention.self.query"``), ``"peft"``, or ``None``:
            the whole model; for a causal decoder :meth:`~leak_audit.models.TextModelSpec.decoder_view` (what
            ``span_decoder`` reads: layer 0, layer 1's attention inputs and the LM head).
        every_n_steps: audit the optimizer steps ``0, N, 2N, ...`` (counted like ``trainer.global_step``).
        attacks: registered attack names or :class:`~leak_audit.attacks.Attack` objects; ``None``:
            :data:`~leak_audit.attacks.DEFAULT_ATTACKS` (encoders), ``DEFAULT_DECODER_ATTACKS`` (causal decoders),
            ``DEFAULT_GENERIC_ATTACKS`` (a model no architecture family knows), ``DEFAULT_IMAGE_ATTACKS``. Names are checked now and resolved for the model's modality at ``setup``.
        log_dir: directory of ``audit.jsonl`` (and, for images with ``log_samples``, of ``samples/``).
        log_samples: store and send the original and reconstructed text (images: ``samples/*.npz``). Off by
            default: reconstructions *are* the private data.
        recompute: ``"observed"``: the gradient the optimizer applied, dropout included; ``"eval"``: the step
            re-run with dropout off on a private copy (the attacker who controls the model; text only).
        batch_adapter: ``fn(batch) -> TextBatch`` or ``fn(batch) -> ImageBatch`` for other batch layouts.
        tokenizer: decodes reconstructions for ROUGE; default ``pl_module.tokenizer`` if present.
        max_pending: audits in flight at once; a due audit is skipped (and counted) while the worker is busy.
        max_seconds: time budget of *each* attack in seconds (``None``: unbounded); an attack stopped by it is
            recorded as ``timeout``: missing evidence for the gate, never a low value.
        worker_threads: intra-op threads of the background worker on CPU.
        worker_niceness: Linux ``nice`` value (0..19) of the worker; ``None`` leaves it alone.
        end_timeout: seconds to wait at the end of training for audits still running.
        seed: seed of the attacks' private random generators.
        delta: δ at which ε is reported under DP-SGD, in ``(0, 1)``; ``None``: ``1/N`` for a train set of ``N``
            examples, else 1e-5.
        privacy_engine: the Opacus ``PrivacyEngine`` (or accountant) whose ε to report; ``None``: found on the
            LightningModule (``privacy_engine``) or inside the ``DPOptimizer``'s accountant hook.
        modality: ``"text"``, ``"image"`` or ``"auto"``: decided at ``setup`` from the model alone
            (:func:`~leak_audit.models.model_modality`), never from a batch.
        network: images only: the module name of the classifier (``""``: the LightningModule's ``forward``);
            ``None`` finds it (:func:`~leak_audit.models.find_image_network`).
        scope: under DDP, ``"global"``: the all-reduced gradient, attacked on rank 0 against the gathered batch;
            ``"local"``: each rank's own gradient before the all-reduce (one federated client's view).
        attack_device: where the attacks run (``"cpu"``, ``"cuda:1"``, ...); ``None``: the training device.
        worker: ``"thread"``: a background thread (and a side CUDA stream on a GPU); ``"process"``: a child
            forked at ``on_train_start`` (CPU attacks only).
        policy: the leakage policy checked on rank 0 after every finished audit: a
            :class:`~leak_audit.gate.policy.GatePolicy`, a policy TOML path, or its mapping (``{"rule": [...]}``);
            the verdict is logged as ``gate/verdict`` (0 pass, 1 warn, 2 fail).
        on_breach: ``"warn"``, ``"stop"`` (``trainer.should_stop``, agreed across ranks) or ``"raise"``
            (:class:`~leak_audit.gate.breach.LeakageThresholdExceeded`) on a breached rule.
        wandb_alert: with a ``WandbLogger`` and a policy, one W&B alert (``run.alert``) per breached rule.
        canaries: under Opacus DP-SGD, ``m`` Dirac canaries in the optimizer's clipped sum
            (:class:`~leak_audit.capture.canaries.DiracCanaries`) for an empirical lower bound on ε from this
            run (Steinke, Nasr, Jagielski 2023; :mod:`leak_audit.metrics.epsilon`), logged at every audit and
            at the end as ``privacy/epsilon_empirical`` (with ``_ceiling``, ``_gdp`` and ``privacy/canaries``)
            next to the accountant's ``privacy/epsilon``. Each canary adds at most ``C / B`` to one trained
            coordinate's gradient per step (what the optimizer makes of it is measured in docs/privacy.md). ``0``: none.

    Under DDP, logging and the audit log are rank-zero; with ``scope="local"`` the other ranks' audits reach
    rank 0 at the next audited step (after an exception only rank 0's own audits are written).

    Raises:
        ValueError: at construction, an argument out of range (:func:`~leak_audit.options.check_options`) or
            an unknown attack; at ``setup``, a module pattern that matches nothing or only frozen modules
            (:class:`~leak_audit.capture.tap.ModuleSelectionError`), no attack that can use the tapped view, an
            attack of the other modality, ``recompute="eval"`` on an image model, or ``network`` on a text model.
        ~leak_audit.capture.canaries.CanaryError: at ``on_train_start``, ``canaries > 0`` without an Opacus ``DPOptimizer`` or an accountant's
            sample rate, with noise multiplier 0, under DDP, or more canaries than trained coordinates.
        UnsupportedModelError: at ``setup``, no image network can be found, or a text model has no input
            embedding table. A text model no family knows gets the model-agnostic attacks (a warning says so);
            when none of them applies either, ``setup`` raises the ``ValueError`` above.

    Example::

        audit = LeakageAudit(modules="bert.encoder.layer.0.attention.self.query", every_n_steps=50)
        Trainer(callbacks=[audit]).fit(model, datamodule)
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
        canaries: int = 0,
    ) -> None:
        attack_device = check_options(
            every_n_steps=every_n_steps, recompute=recompute, log_samples=log_samples, max_pending=max_pending,
            max_seconds=max_seconds, worker_threads=worker_threads, worker_niceness=worker_niceness, delta=delta,
            batch_adapter=batch_adapter, modality=modality, network=network, worker=worker, on_breach=on_breach,
            wandb_alert=wandb_alert, scope=scope, attack_device=attack_device, canaries=canaries,
        )
        self.policy = GatePolicy.coerce(policy)  # a malformed policy fails here (PolicyError, a ValueError)
        if self.policy is None and (on_breach != "warn" or wandb_alert):
            raise ValueError(f"on_breach={on_breach!r} / wandb_alert={wandb_alert} act on a policy: pass policy= "
                             "(a GatePolicy, a policy TOML path, or a mapping with 'rule' entries)")
        if isinstance(modules, str):
            modules = [modules]
        self.modules = list(modules) if modules is not None else None
        self.every_n_steps = every_n_steps
        self.modality = modality
        self.network = network
        self._requested = check_requested(attacks, MODALITIES if modality == "auto" else (modality,))
        # resolved for the model's modality at `setup`; right away when the modality is given
        self.attacks: list[Attack] = [] if modality == "auto" else resolve_attacks(self._requested, modality)
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
        self.canaries = canaries
        self._canary_state: dict[str, Any] | None = None  # from a checkpoint, applied when the canaries are placed
        # run state (also in state_dict); failed, timeouts, worst in the reporter, verdict and breach in the monitor
        self.audits = 0
        self.skipped = 0
        self.last_audited_step = -1
        self.run_id = ""  # this fit's id in the audit log's records: new at `setup`, a resumed run keeps its own
        self._reporter = AuditReporter(log_samples=log_samples, log_dir=self.log_dir, wandb_alert=wandb_alert)
        self._monitor = BreachMonitor(self.policy, on_breach, self._reporter.warn_once) if self.policy else None
        self._reporter.judge = self._monitor
        # set up in `setup` (once per fit)
        self._active = False
        self._modality: str | None = None  # "text" or "image"
        self._tap: GradientTap | None = None
        self._tokenizer: Any = None
        self._auditor: Auditor | None = None
        self._adapter: BatchAdapter = batch_adapter or default_batch_adapter
        self._attacks_here = False  # whether this rank runs attacks
        self._rank, self._world = 0, 1
        self._built_on: torch.device | None = None  # the model's device when the auditor was built
        # set up in `on_train_start`, once the strategy has placed the model and the optimizers exist
        self._device: torch.device | None = None  # where the attacks run
        self._dp: DPRelease | None = None
        self._snapshots: Snapshotter | None = None
        self._worker: AuditWorker[AuditSnapshot, list[AuditRecord]] | None = None
        self._resumed = False

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

    @property
    def failed(self) -> int:
        """Audits with at least one failed attack."""
        return self._reporter.failed

    @property
    def timeouts(self) -> int:
        """Attacks stopped by their time budget (``max_seconds``)."""
        return self._reporter.timeouts

    @property
    def worst(self) -> dict[str, float]:
        """The largest value so far of every logged ``leak/*`` key (e.g. ``leak/max/rouge1``)."""
        return self._reporter.worst

    @property
    def verdict(self) -> str | None:
        """The policy's latest verdict (``"pass"``, ``"warn"``, ``"fail"``); ``None`` without one. ``"fail"`` with no
        :attr:`breach`: a rule whose only evidence is lower bounds (the release gate fails it; ``on_breach`` does not act)."""
        return self._monitor.verdict if self._monitor else None

    @property
    def breach(self) -> Breach | None:
        """The first breached policy rule of the run, if any."""
        return self._monitor.breach if self._monitor else None

    def state_dict(self) -> dict[str, Any]:
        """Audits done, skipped and failed, the schedule's position, worst values so far, the log path and run id.

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
            "run": self.run_id,
            "verdict": self.verdict,
            "breach": self.breach.to_dict() if self.breach else None,
            "canaries": self._dp.canary_state() if self._dp is not None else self._canary_state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.audits = int(state_dict.get("audits", 0))
        self.skipped = int(state_dict.get("skipped", 0))
        self._reporter.failed = int(state_dict.get("failed", 0))
        self._reporter.timeouts = int(state_dict.get("timeouts", 0))
        self.last_audited_step = int(state_dict.get("last_audited_step", -1))
        self._reporter.worst = dict(state_dict.get("worst", {}))
        if self._monitor is not None:
            self._monitor.verdict = state_dict.get("verdict")
            saved_breach = state_dict.get("breach")
            self._monitor.breach = Breach(**saved_breach) if isinstance(saved_breach, dict) else None
        self._canary_state = state_dict.get("canaries")
        self._resumed = True  # the policy's history is read back from the audit log at `on_train_start`
        self.run_id = str(state_dict.get("run", ""))  # "": a checkpoint from before runs were named, as its records
        saved = state_dict.get("log_path")
        if saved and Path(saved).resolve() != self.log_path.resolve():
            rank_zero_warn(f"LeakageAudit: the checkpoint's audit log was {saved}; this run appends to {self.log_path} "
                           "(pass log_dir= to continue the old one)")

    # ------------------------------------------------------------------ setup / teardown
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._active:
            return
        self._modality = self.modality if self.modality != "auto" else model_modality(pl_module)
        modules, causal, generic = self.modules, False, False
        if self._modality == "text":
            spec = text_model_spec(pl_module, generic=True)
            causal, generic = spec.causal, spec.family == "generic"
            if causal and modules is None and spec.layers:  # a decoder's whole gradient is hundreds of MB per audit
                modules = trainable_modules(pl_module, spec.decoder_view())
            if generic:
                rank_zero_warn(f"LeakageAudit: no architecture family knows this {spec.model_type!r} model; only the "
                               "model-agnostic attacks can read it (leak_audit.models.register_family adds one)")
        self.attacks = resolve_attacks(self._requested, self._modality, causal=causal, generic=generic)
        self._tap = GradientTap(pl_module, modules)
        self._tokenizer = find_tokenizer(self.tokenizer, pl_module)
        self._auditor = self._build_auditor(pl_module)
        if self.batch_adapter is None and self._modality == "image":
            self._adapter = default_image_batch_adapter
        self._built_on = pl_module.device
        if self._modality == "text" and self._tokenizer is None:
            rank_zero_warn(
                "LeakageAudit: no tokenizer (pass tokenizer= or set pl_module.tokenizer); "
                "ROUGE is computed on token ids instead of words."
            )
        if not self._auditor.applicable:
            reasons = "; ".join(f"{n}: {p}" for n, p in self._auditor.plan.items())
            if generic:
                reasons += ("; no architecture family knows this model: register one (leak_audit.models."
                            "register_family) so the span attacks can read its layers")
            raise ValueError(f"no attack can use the tapped modules {list(self._tap.modules)}: {reasons}")
        for name, plan in self._auditor.plan.items():
            if isinstance(plan, str):
                rank_zero_warn(f"LeakageAudit: attack {name!r} is skipped for this view: {plan}")
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self.run_id = self.run_id if self._resumed else new_run_id()  # `fit(ckpt_path=)` restores its own later
        self._reporter.open(AuditLog(self.log_path) if trainer.is_global_zero else None, modality=self._modality,
                            rank=self._rank, world=self._world, scope=self.scope)
        # checked on every rank, so no rank fails alone and leaves the others waiting
        check_worker_devices(self.worker, trainer.strategy.root_device, self.attack_device)
        self._attacks_here = self.scope == "local" or trainer.is_global_zero  # global scope: only rank 0 attacks
        self._active = True
        where = f"; scope {self.scope} over {self._world} processes" if self._world > 1 else ""
        rank_zero_info(
            f"LeakageAudit: {self._modality} model; tapping {len(self._tap.parameters)} tensors "
            f"({self._tap.numel:,} parameters) in {len(self._tap.modules)} module(s); attacks "
            f"{self._auditor.applicable}; every {self.every_n_steps} steps{where}; log {self.log_path}"
        )

    def _build_auditor(self, pl_module: LightningModule, device: torch.device | None = None) -> Auditor:
        assert self._tap is not None and self._modality is not None
        return build_auditor(
            self._modality, pl_module, self._tap.parameters.keys(), self.attacks, tokenizer=self._tokenizer,
            network=self.network, recompute=self.recompute, log_samples=self.log_samples, log_dir=self.log_dir,
            max_seconds=self.max_seconds, seed=self.seed, device=device,
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        assert self._tap is not None and self._auditor is not None
        if self._device is None:
            # the model is placed now (maybe not at `setup`): if it moved, or attacks run elsewhere, rebuild the replica
            self._device = self.attack_device if self.attack_device is not None else pl_module.device
            if self._attacks_here and (pl_module.device != self._built_on or self._device != self._built_on):
                self._auditor = self._build_auditor(pl_module, self._device)
        if self._dp is None:
            self._dp = attach_dp_release(trainer.optimizers, self._tap.parameters, privacy_engine=self.privacy_engine,
                                         module=pl_module, delta=self.delta, dataloader=trainer.train_dataloader,
                                         recompute=self.recompute, scope=self.scope)
            if self._dp is not None:
                text_attacks = self._auditor.applicable if self._modality == "text" else None
                announce_dp_release(self._dp, trainer.loggers, text_attacks=text_attacks)
            if self.canaries:
                self._dp = place_canaries(self._dp, self.canaries, dict(pl_module.named_parameters()), seed=self.seed,
                                          world_size=self._world, state=self._canary_state)
                announce_canaries(self.canaries, self._dp.delta)
        if trainer.is_global_zero:
            self._reporter.start_run(self.run_id)  # names the records; warns when the log holds earlier runs
            if self._resumed and self._monitor is not None:
                self._monitor.resume(self.log_path, self.last_audited_step, self.run_id)
        params = dict(pl_module.named_parameters())
        spec = self._auditor.spec
        local = self.scope == "local" and self.recompute == "observed"  # this rank's gradient, before all-reduce
        self._snapshots = Snapshotter(
            self._tap, self._auditor.gradient_names, self._auditor.param_names, params, adapter=self._adapter,
            modality=self._modality or "text", device=self._device, release=self._dp, rank=self._rank,
            pad_token_id=spec.pad_token_id if isinstance(spec, TextModelSpec) else None,
            local=LocalGradientCapture(self._tap.parameters) if local else None,
            gather=self.scope == "global" and self._world > 1, recompute=self.recompute,
        )
        if self._attacks_here and self._worker is None:
            # started once the replica, DP setup and log are final: a forked child keeps copies (frozen weights too)
            job = AuditJob(self._auditor, device=self._device, delta=self._dp.delta if self._dp else DEFAULT_DELTA,
                           resident=params, finish=self._reporter.persist)
            self._worker = make_worker(
                self.worker, job.run, job.crashed, max_pending=self.max_pending, num_threads=self.worker_threads,
                niceness=self.worker_niceness, frozen={n: p for n, p in params.items() if not p.requires_grad},
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dp, zero = self._dp, trainer.is_global_zero
        closing = (final_canary_record(dp, step=trainer.global_step, epoch=trainer.current_epoch, audit=self.audits)
                   if dp is not None and dp.canaries is not None and zero else None)
        self._finish(trainer, self.end_timeout, log=True, collective=True, closing=closing)
        if self._monitor is not None and self.on_breach == "raise":  # audits finished after the last step can breach
            self._monitor.decide(trainer, collective=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._finish(trainer, timeout=5.0, log=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish(trainer, self.end_timeout, log=False)

    def _finish(self, trainer: Trainer, timeout: float | None, *, log: bool, collective: bool = False,
                closing: AuditRecord | None = None) -> None:
        """Join the worker and write what it finished. ``collective``: every rank is here (end of training),
        so the other ranks' results can still be sent to rank 0. ``closing``: the canaries' record over the
        whole run, written and reported after every audit."""
        if self._worker is not None:
            done = self._worker.close(timeout)
            if not done:
                self._reporter.warn_once("abandoned", f"LeakageAudit: an audit still running after {timeout}s was abandoned")
            self._collect(trainer, log=log)
            self._worker = None
        if self._reporter.exchanging and (collective or trainer.is_global_zero):
            self._reporter.exchange(trainer, log=log, collective=collective, skipped=self.skipped)
        if closing is not None:
            self._reporter.emit(trainer, [closing], skipped=self.skipped)
        self._reporter.close()
        if self._snapshots is not None:
            self._snapshots.close()
            self._snapshots = None
        if self._dp is not None and self._dp.canaries is not None:
            self._canary_state = self._dp.remove_canaries()
        self._dp = None
        self._active = False

    # ------------------------------------------------------------------ capture
    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0 and step > self.last_audited_step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._active and self._snapshots is not None and self._due(trainer.global_step):
            self._snapshots.add_batch(trainer.global_step, batch)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._active and self._worker is not None and self._snapshots is not None:
            self._snapshots.copy_params(trainer.global_step, self._worker)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or self._snapshots is None:
            return
        w = self._snapshots.window
        audited = w is not None and trainer.global_step > w.step
        if audited:  # the audited optimizer step just happened
            window = self._snapshots.finish()  # every rank: a collective under global-scope DDP
            self.last_audited_step = window.step
            self._dispatch(trainer, window)
            if self._reporter.exchanging:  # every rank reaches this step: send finished audits to rank 0
                self._collect(trainer, log=True)
                self._reporter.exchange(trainer, log=True, collective=True, skipped=self.skipped)
        self._collect(trainer, log=True)
        if self._monitor is not None and self.on_breach != "warn" and (audited or self._world == 1):
            self._monitor.decide(trainer, collective=self._world > 1)  # at a point every rank reaches
        key = PROGRESS_BAR_KEYS.get(self._modality or "text", PROGRESS_BAR_KEY)
        if key in self.worst:
            pl_module.log(key, self.worst[key], prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)

    def _dispatch(self, trainer: Trainer, w: BatchWindow) -> None:
        """Hand the audited step's snapshot to the worker, or record why it cannot be audited."""
        assert self._auditor is not None and self._snapshots is not None
        self.audits += 1
        if self._worker is None:  # this rank does not attack (global scope: it only took part in the gather)
            return
        audit, epoch, names = self.audits, trainer.current_epoch, [a.name for a in self._auditor.attacks]
        problem = w.problem()
        if problem is not None:
            self._reporter.warn_once("capture", f"LeakageAudit: audit at step {w.step} failed: {problem}")
        elif self._worker.busy:
            self.skipped += 1
            problem = RuntimeError("the worker was still busy with an earlier audit (max_pending reached)")
            self._reporter.emit(trainer, failed_records(self._snapshots.empty_snapshot(w, epoch, audit), names, problem,
                                                        audit, status="skipped"), skipped=self.skipped)
            return
        problem = problem or w.unreleased  # under DP-SGD, a step that released nothing fails without a warning
        if problem is not None:
            self._reporter.emit(trainer, failed_records(self._snapshots.empty_snapshot(w, epoch, audit), names, problem,
                                                        audit), skipped=self.skipped)
            return
        snap, ready = self._snapshots.snapshot(w, epoch, audit)
        try:
            self._worker.submit(snap, ready)
        except Exception as exc:  # noqa: BLE001 - e.g. no fresh worker process could be forked: a failed audit
            self._reporter.warn_once("submit", f"LeakageAudit: audit at step {w.step} could not start: {exc}")
            self._reporter.emit(trainer, failed_records(snap, names, exc, audit), skipped=self.skipped)

    def _collect(self, trainer: Trainer, *, log: bool) -> None:
        results = self._worker.drain() if self._worker is not None else []
        self._reporter.collect(trainer, results, log=log, skipped=self.skipped)
