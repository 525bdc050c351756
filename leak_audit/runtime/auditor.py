"""One audit, start to finish: attacks on a snapshot, scores, audit records.

This is what the worker runs. It is independent of Lightning, so it can be tested, benchmarked and
reused on a snapshot built by hand. It is the same for text and images: the spec, the replica, the
attacks and the scorer (:mod:`leak_audit.metrics.scoring`) carry what differs.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

import torch

from leak_audit.attacks import Attack, AttackInput, NotApplicable, Reconstruction, Requirements, order_attacks
from leak_audit.attacks.base import ModelSpec
from leak_audit.attacks.evidence import gradient_residual, pick
from leak_audit.attacks.gaps import dp_search_gap, query_sentence_gap, span_attention_gap
from leak_audit.capture.snapshot import AuditSnapshot
from leak_audit.metrics.names import SENTENCE_METRICS
from leak_audit.metrics.scoring import ImageScorer, Scorer, TextScorer
from leak_audit.models import TextModelSpec
from leak_audit.models.image_replica import ImageReplica
from leak_audit.models.replica import ModelReplica
from leak_audit.results.records import LOWER_BOUND, AuditRecord
from leak_audit.runtime.recompute import EvalRecompute

__all__ = ["Auditor", "attack_seed", "failed_records"]

Decode = Callable[[Sequence[int]], str]


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _scalars(info: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in info.items() if isinstance(v, int | float | str)}


def failed_records(
    snapshot: AuditSnapshot, attacks: Sequence[str], exc: BaseException, audit: int = 0, status: str = "failed"
) -> list[AuditRecord]:
    """One record per attack saying the whole audit failed (or was skipped) with ``exc``."""
    return [
        AuditRecord(
            step=snapshot.step,
            epoch=snapshot.epoch,
            attack=name,
            status=status,
            modules=list(snapshot.modules),
            batch_size=snapshot.batch_size,
            audit=audit,
            error=_error_text(exc),
        )
        for name in attacks
    ]


class Auditor:
    """Runs a fixed set of attacks against snapshots and scores each reconstruction.

    Args:
        spec: the model's architecture spec: a :class:`~leak_audit.models.TextModelSpec` (with the
            tokenizer's special tokens) or an :class:`~leak_audit.models.ImageModelSpec`.
        attacks: attack objects of the spec's modality; run in dependency order.
        tapped: names of the tapped parameters (the view the attacker observes).
        decode: token ids -> text, for ROUGE and samples (text; default: ids joined by spaces).
        scorer: turns reconstructions into metrics (:mod:`leak_audit.metrics.scoring`); default
            :class:`~leak_audit.metrics.scoring.TextScorer` for a text spec, an
            :class:`~leak_audit.metrics.scoring.ImageScorer` that writes no samples for an image spec.
        log_samples: with the default text scorer, put original and reconstructed text into the records
            (opt-in: it is private data). Image samples are the ``ImageScorer``'s ``samples_dir``.
        recompute: ``"observed"`` attacks the gradient the optimizer applied; ``"eval"`` recomputes it
            with dropout off via ``recomputer``.
        recomputer: required for ``recompute="eval"``.
        max_seconds: time budget of *each* attack in an audit, in seconds, counted from the attack's start
            (``None``: unbounded). An audit takes at most about ``len(attacks) * max_seconds``. An attack
            it stops is recorded as ``timeout``.
        seed: seed of the attacks' private generator.
        replica: the model's architecture for attacks that run the model (``Requirements.replica``);
            without one those attacks are skipped.

    Raises:
        ValueError: a bad ``recompute``, or ``recompute="eval"`` without a recomputer.
    """

    def __init__(
        self,
        spec: ModelSpec,
        attacks: Sequence[Attack],
        tapped: Collection[str],
        decode: Decode | None = None,
        *,
        scorer: Scorer | None = None,
        log_samples: bool = False,
        recompute: str = "observed",
        recomputer: EvalRecompute | None = None,
        max_seconds: float | None = None,
        seed: int = 0,
        replica: ModelReplica | ImageReplica | None = None,
    ) -> None:
        if recompute not in ("observed", "eval"):
            raise ValueError(f"recompute must be 'observed' or 'eval', got {recompute!r}")
        if recompute == "eval" and recomputer is None:
            raise ValueError("recompute='eval' needs a recomputer")
        self.spec = spec
        self.attacks = order_attacks(attacks)
        self.tapped = frozenset(tapped)
        if scorer is None:
            if isinstance(spec, TextModelSpec):
                scorer = TextScorer(spec, decode or _join_ids, log_samples=log_samples)
            else:
                scorer = ImageScorer()
        self.scorer = scorer
        self.log_samples = log_samples
        self.recompute = recompute
        self.recomputer = recomputer
        self.max_seconds = max_seconds
        self.seed = seed
        self.replica = replica
        self.plan: dict[str, Requirements | str] = {}
        for attack in self.attacks:
            try:
                req = attack.requirements(spec, self.tapped)
            except NotApplicable as exc:
                self.plan[attack.name] = str(exc)
                continue
            if req.replica:
                if replica is None:
                    self.plan[attack.name] = "runs the model, but the auditor was given no model replica"
                    continue
                read = replica.trainable if req.replica_scope is None else frozenset(
                    n for n in replica.trainable if any(n.startswith(m + ".") for m in req.replica_scope))
                req = Requirements(req.gradients, req.params | read, replica=True, replica_scope=req.replica_scope)
            self.plan[attack.name] = req

    @property
    def applicable(self) -> list[str]:
        """Names of attacks the tapped view gives something to work with."""
        return [n for n, p in self.plan.items() if isinstance(p, Requirements)]

    @property
    def gradient_names(self) -> frozenset[str]:
        """Tapped parameters whose gradients the applicable attacks read."""
        return frozenset().union(*(p.gradients for p in self.plan.values() if isinstance(p, Requirements)))

    @property
    def param_names(self) -> frozenset[str]:
        """Parameters whose values the applicable attacks (and recomputation) read."""
        names = frozenset().union(*(p.params for p in self.plan.values() if isinstance(p, Requirements)))
        if self.recompute == "eval" and self.recomputer is not None:
            names = names | self.recomputer.trainable
        return names

    def __call__(self, snapshot: AuditSnapshot, audit: int = 0) -> list[AuditRecord]:
        """Run every attack on ``snapshot`` and return one record per attack (never raises for an attack).

        Each attack runs with its own budget of :attr:`max_seconds` from its start and its own random
        generator (seeded by ``seed``, the step and the attack's name), so no attack's result depends on
        which attacks ran before it or how long they took. An attack stopped by its budget is recorded as
        ``timeout`` (its partial metrics under ``info["partial_<metric>"]``), never as ``ok``. Every ``ok``
        record with sequences or images gets the attacker-side ``info["gradient_residual"]``
        (:mod:`leak_audit.attacks.evidence`); the one with the smallest carries ``info["attacker_pick"] = 1``, unless
        an attack certified the whole batch (``info["certified"] == B``): then that one.
        Under DP-SGD noise too small for the attacks' search to be the limit, a text record's token and sentence
        metrics are marked as lower bounds (``info["lower_bound"]``, :func:`~leak_audit.attacks.gaps.dp_search_gap`).
        On layer 0's query weight alone at ``B > 1``, every record with sentence metrics is marked unless
        ``span_cluster`` certified the whole batch (:func:`~leak_audit.attacks.gaps.query_sentence_gap`), and on the
        full view unless ``span_attention`` did (:func:`~leak_audit.attacks.gaps.span_attention_gap`). A mark is
        the audit's: once one record carries one (an attack's own, e.g. ``span_decoder``'s unfinished pursuit), every
        ``ok`` record with sentence metrics (:data:`~leak_audit.metrics.names.SENTENCE_METRICS`) carries it too, so no
        weaker attack's lower reading decides a ``last`` or ``mean_last_k`` rule in its place.
        """
        gradients = dict(snapshot.gradients)
        info_common: dict[str, object] = {}
        if self.recompute == "eval":
            t0 = time.perf_counter()
            assert self.recomputer is not None
            gradients = self.recomputer(snapshot.params, snapshot.batch, self.gradient_names)
            info_common["recompute_seconds"] = round(time.perf_counter() - t0, 4)
        priors: dict[str, Reconstruction] = {}
        sigma = snapshot.dp.noise_multiplier if snapshot.dp is not None else None  # DP-SGD's, for dp_search_gap
        records = []
        residuals: dict[str, float | None] = {}
        for attack in self.attacks:
            plan = self.plan[attack.name]
            base = dict(
                step=snapshot.step,
                epoch=snapshot.epoch,
                attack=attack.name,
                modules=list(snapshot.modules),
                batch_size=snapshot.batch_size,
                audit=audit,
            )
            if isinstance(plan, str):
                records.append(AuditRecord(status="skipped", error=plan, **base))
                continue
            t0 = time.perf_counter()
            deadline = time.monotonic() + self.max_seconds if self.max_seconds else None
            try:
                inp = self._input(attack, plan, snapshot, gradients, priors, deadline)
                with torch.no_grad():
                    recon = attack(inp)
                seconds = time.perf_counter() - t0
                score = self.scorer(recon, snapshot)
            except NotApplicable as exc:
                records.append(
                    AuditRecord(status="skipped", error=str(exc), seconds=time.perf_counter() - t0, **base)
                )
                continue
            except Exception as exc:  # noqa: BLE001 - an attack's failure is recorded, never raised
                records.append(
                    AuditRecord(status="failed", error=_error_text(exc), seconds=time.perf_counter() - t0, **base)
                )
                continue
            info = {**info_common, **_scalars({**recon.info, **score.info})}
            if recon.timed_out:
                info.update({f"partial_{k}": v for k, v in score.metrics.items()})
                records.append(AuditRecord(
                    status="timeout", seconds=round(seconds, 4), info=info, **base,
                    error=f"stopped by its {self.max_seconds:g} s budget before it finished "
                          f"({recon.info.get('progress', 'no progress reported')}); partial metrics in info",
                ))
                continue
            priors[attack.name] = recon
            residuals[attack.name] = self._residual(recon, inp, info, gradients, snapshot.params)
            if LOWER_BOUND not in info and (gap := dp_search_gap(self.spec, sigma, score.metrics)):
                info[LOWER_BOUND] = gap
            records.append(AuditRecord(
                status="ok", metrics=score.metrics, seconds=round(seconds, 4), info=info, samples=score.samples, **base
            ))
        names = [a.name for a in self.attacks]
        gap = query_sentence_gap(self.spec, self.tapped, snapshot.batch_size, snapshot.noise_std, priors, names)
        gap = gap or span_attention_gap(self.spec, self.tapped, snapshot.batch_size, snapshot.noise_std, priors, names)
        gap = gap or next((r.info[LOWER_BOUND] for r in records if r.status == "ok" and LOWER_BOUND in r.info), None)
        for r in records:  # one attack's gap is the audit's: no weaker attack's reading decides a rule in its place
            if gap and r.status == "ok" and LOWER_BOUND not in r.info and SENTENCE_METRICS & r.metrics.keys():
                r.info[LOWER_BOUND] = gap
        whole = [n for n, recon in priors.items() if recon.info.get("certified") == snapshot.batch_size]
        chosen = pick(residuals, names, whole)
        for r in records:
            if r.attack == chosen:
                r.info["attacker_pick"] = 1
        return records

    def _input(
        self,
        attack: Attack,
        plan: Requirements,
        snapshot: AuditSnapshot,
        gradients: dict[str, torch.Tensor],
        priors: dict[str, Reconstruction],
        deadline: float | None,
    ) -> AttackInput:
        return AttackInput(
            gradients={k: gradients[k] for k in plan.gradients if k in gradients},
            params={k: snapshot.params[k] for k in plan.params},
            spec=self.spec,
            batch_size=snapshot.batch_size,
            priors=dict(priors),
            generator=torch.Generator().manual_seed(attack_seed(self.seed, snapshot.step, attack.name)),
            deadline=deadline,
            replica=self.replica if plan.replica else None,
            noise_std=snapshot.noise_std,
            input_shape=snapshot.input_shape,
            input_range=snapshot.input_range,
        )

    def _residual(
        self,
        recon: Reconstruction,
        inp: AttackInput,
        info: dict[str, object],
        gradients: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor],
    ) -> float | None:
        """The attacker-side gradient residual of ``recon`` over every snapshot gradient (put in ``info``)."""
        if self.replica is None or (recon.sequences is None and recon.images is None):
            return None
        t0 = time.perf_counter()
        try:
            whole = replace(inp, gradients=gradients, params=params, replica=self.replica)
            value = gradient_residual(recon, whole)
        except Exception as exc:  # noqa: BLE001 - evidence is optional; say why it is missing
            info["gradient_residual_error"] = _error_text(exc)[:200]
            return None
        if value is not None:
            info["gradient_residual"] = round(value, 6)
            info["gradient_residual_seconds"] = round(time.perf_counter() - t0, 4)
        return value


def attack_seed(seed: int, step: int, name: str) -> int:
    """The seed of one attack's private generator: a function of the run's seed, the step and the
    attack's name only (a stable hash, unlike Python's ``hash``), so attacks never share a random stream."""
    return (seed * 1_000_003 + step * 7919 + zlib.crc32(name.encode())) % (2**63 - 1)


def _join_ids(ids: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in ids)
