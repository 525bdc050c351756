"""Differential privacy next to leakage: the gradient DP-SGD releases, and the (ε, δ) spent so far.

Opacus 1.6's :class:`~opacus.optimizers.DPOptimizer` privatizes a gradient in ``pre_step``: per-sample
clipping to ``max_grad_norm`` ``C`` summed into ``p.summed_grad``,
``p.grad = summed_grad + N(0, (σ·C)²)``, division by the expected batch size ``B``, then the accountant's
``step_hook``. Only then does the wrapped optimizer update the parameters. Lightning's
``on_after_backward`` and ``on_before_optimizer_step`` therefore see the *non-private* gradient;
auditing it overstates what DP releases. :class:`ReleasedGradientCapture` registers a step pre-hook on
``dp_optimizer.original_optimizer`` instead: it runs after clip + noise + scale and before the update,
and reads the parameters' ``.grad`` exactly as the update consumes them. It never touches the
accountant's ``step_hook`` (replacing it, as ``attach_step_hook`` does, silently freezes ε).

:func:`find_accountant` locates the accountant (given explicitly, on a ``PrivacyEngine``, or inside the
optimizer's ``step_hook``, read-only), and :func:`privacy_report` reads ε at δ from it.
:func:`attach_dp_release` sets all of this up for a training run (:class:`DPRelease`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from leak_audit.capture.canaries import CanaryError, CanaryScores, DiracCanaries

__all__ = [
    "DEFAULT_DELTA",
    "PRV_MIN_NOISE_MULTIPLIER",
    "DPRelease",
    "DPState",
    "PrivacyReport",
    "LOWER_BOUND_NOISE_MULTIPLIER",
    "SMALL_NOISE_MULTIPLIER",
    "ReleasedGradientCapture",
    "announce_dp_release",
    "attach_dp_release",
    "default_delta",
    "dp_state",
    "epsilon_for",
    "find_accountant",
    "find_dp_optimizer",
    "place_canaries",
    "privacy_report",
]

DEFAULT_DELTA = 1e-5
"""δ when neither the user nor the dataset size gives one (``1/N`` is used when ``N`` is known)."""

SMALL_NOISE_MULTIPLIER = 0.01
"""Below this noise multiplier gradient_matching measurably beats the default text attacks
(benchmarks/README.md, DP-SGD section): :func:`announce_dp_release` warns when it is not among the attacks."""

LOWER_BOUND_NOISE_MULTIPLIER = 0.1
"""Below this noise multiplier the release still ranks a private sentence above the single-token replacements
and swaps of it that were tried (B = 1, C = 1: 4 of 4 CoLA sentences at σ = 0.01, none at 0.1;
``benchmarks/dp_likelihood_probe.py``), so a low
text reading is the attacks' search failing, not the noise: :func:`announce_dp_release` says the text metrics
are lower bounds there, and the auditor marks them so (:func:`leak_audit.attacks.gaps.dp_search_gap`): the gate
never counts them toward a pass."""


def _dp_optimizer_class() -> type | None:
    try:
        from opacus.optimizers import DPOptimizer
    except ImportError:  # opacus is a dependency, but DP is optional at run time
        return None
    return DPOptimizer


def find_dp_optimizer(optimizers: Iterable[Any]) -> Any | None:
    """The first Opacus ``DPOptimizer`` among ``optimizers`` (Lightning may wrap it in a
    ``LightningOptimizer``; its ``.optimizer`` is unwrapped), or ``None`` when training is not DP."""
    cls = _dp_optimizer_class()
    if cls is None:
        return None
    for opt in optimizers:
        opt = getattr(opt, "_optimizer", opt)
        if isinstance(opt, cls):
            return opt
    return None


def _is_accountant(obj: Any) -> bool:
    try:
        from opacus.accountants import IAccountant
    except ImportError:
        return False
    return isinstance(obj, IAccountant)


def find_accountant(dp_optimizer: Any, *candidates: Any) -> tuple[Any | None, float | None]:
    """The accountant that tracks ``dp_optimizer``, and the sample rate its hook charges per step.

    Args:
        dp_optimizer: an Opacus ``DPOptimizer``.
        candidates: where to look first, in order: an ``IAccountant``, a ``PrivacyEngine`` (its
            ``.accountant``), or any object with a ``privacy_engine`` or ``accountant`` attribute
            (e.g. the LightningModule). ``None`` entries are ignored.

    Returns:
        ``(accountant, sample_rate)``. Without a candidate, the accountant is read from the closure of
        ``dp_optimizer.step_hook`` (``IAccountant.get_optimizer_hook_fn``), without modifying it. The
        sample rate comes from that closure (the hook charges it times ``accumulated_iterations``, 1
        without virtual steps), or from the accountant's last history entry; ``None`` when neither exists yet. ``(None, None)`` when
        no accountant is found (DP noise without accounting).
    """
    accountant = None
    for c in candidates:
        if c is None:
            continue
        for obj in (c, getattr(c, "accountant", None), getattr(getattr(c, "privacy_engine", None), "accountant", None)):
            if _is_accountant(obj):
                accountant = obj
                break
        if accountant is not None:
            break
    hook = getattr(dp_optimizer, "step_hook", None)
    hook_rate = None
    cells = getattr(hook, "__closure__", None) or ()
    names = getattr(getattr(hook, "__code__", None), "co_freevars", ())
    for name, cell in zip(names, cells, strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if accountant is None and _is_accountant(value):
            accountant = value
        if name == "sample_rate" and isinstance(value, (int, float)):
            hook_rate = float(value)
    if accountant is None:
        return None, None
    if hook_rate is None and getattr(accountant, "history", None):
        hook_rate = float(accountant.history[-1][1])
    return accountant, hook_rate


def epsilon_for(accountant: Any, delta: float) -> tuple[float, str | None]:
    """``(ε, error)`` spent so far at ``delta``.

    ε is ``0.0`` with an empty history (no private step yet: nothing released), ``inf`` when a step ran
    with noise multiplier 0 (no privacy), and ``nan`` with ``error`` set when the accountant cannot
    compute it (e.g. GDP's or PRV's numerical limits), instead of raising.

    Raises:
        ValueError: ``delta`` not in ``(0, 1)``.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    history = getattr(accountant, "history", None)
    if not history:
        return 0.0, None
    if any(float(h[0]) == 0.0 for h in history):
        return math.inf, None
    try:
        return float(accountant.get_epsilon(delta)), None
    except Exception as exc:  # noqa: BLE001 - an accounting failure must not stop training or the audit
        return math.nan, f"{type(exc).__name__}: {exc}"


PRV_MIN_NOISE_MULTIPLIER = 0.2
"""Below this σ the PRV accountant is not run; RDP stands in. Measured with Opacus 1.6 on 2 CPU cores
(q = 0.01, 100 steps): σ = 0.5 took 4 s and 0.36 GB, 0.2 took 8 s and 0.49 GB, 0.1 took 11 s and 1.5 GB,
0.05 took 157 s and 18.5 GB to answer ∞ (σ = 0.01, q = 0.001, 10 steps: 148 s, 18.6 GB, ∞). An auditor
that runs inside training must not take the machine's memory for a number RDP gives in milliseconds."""


@dataclass(frozen=True)
class PrivacyReport:
    """The DP state at one audited step, with ε at δ.

    Attributes:
        noise_multiplier: σ, the noise standard deviation in units of ``max_grad_norm``.
        max_grad_norm: ``C``, the per-sample clipping norm (L2).
        expected_batch_size: the divisor Opacus applies after adding the noise.
        noise_std: per-coordinate standard deviation of the noise in the released gradient,
            ``σ·C / expected_batch_size`` (the attacks' noise floor).
        accountant: ``"prv"``, ``"rdp"``, ``"gdp"`` or ``None`` (no accountant found): the training's own.
        epsilon: ε spent so far at ``delta`` (``None`` without an accountant; see :func:`epsilon_for`).
        epsilon_accountant: the accountant that computed ``epsilon``: ``accountant`` itself, or ``"rdp"``
            when the training's PRV or GDP accountant failed on this history (PRV runs out of memory at
            small σ; GDP is only valid for large step counts) and RDP, an upper bound on ε, stood in;
            ``error`` then says why.
        delta: δ.
        sample_rate: probability that a sample is in a batch, as the accountant charges it.
        steps: private steps the accountant has recorded.
        error: why ε could not be computed, else ``None``.
    """

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int | None
    noise_std: float
    accountant: str | None
    epsilon: float | None
    delta: float
    sample_rate: float | None
    steps: int
    error: str | None = None
    epsilon_accountant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the audit log's ``privacy`` field). JSON has no infinity: ε = ∞ (noise
        multiplier 0) is written as ``null`` with ``error`` saying so."""
        eps, error = self.epsilon, self.error
        if eps is not None and not math.isfinite(eps):
            eps, error = None, error or ("no privacy: noise multiplier 0 (epsilon = inf)" if eps > 0 else "epsilon is NaN")
        return {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "noise_std": self.noise_std,
            "accountant": self.accountant,
            "epsilon": eps,
            "epsilon_accountant": self.epsilon_accountant,
            "delta": self.delta,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "error": error,
        }


@dataclass(frozen=True)
class DPState:
    """What DP-SGD had done at one step, copied cheaply on the training thread.

    ε is computed later (:meth:`report`, in the audit worker) from a copy of the accountant's history,
    so the training thread never pays for the accountant's numerics. Fields as in
    :class:`PrivacyReport`; ``history`` is the accountant's ``[(σ, q, steps), ...]`` at the step; ``canaries``
    the canaries' scores and truth at the step (:class:`~leak_audit.capture.canaries.CanaryScores`), if any.
    """

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int | None
    noise_std: float
    accountant: str | None
    history: tuple[tuple[float, float, int], ...]
    sample_rate: float | None
    canaries: CanaryScores | None = None

    @property
    def steps(self) -> int:
        """Private steps recorded by the accountant."""
        return int(sum(int(h[2]) for h in self.history))

    def report(self, delta: float) -> PrivacyReport:
        """ε at ``delta`` from a fresh accountant of the same mechanism with the copied history.

        When that accountant fails (ε NaN: PRV's memory or GDP's numerical limits), or is PRV with a step
        at σ below :data:`PRV_MIN_NOISE_MULTIPLIER` (where PRV needs gigabytes), ε comes from Opacus's
        RDP accountant on the same history instead, an upper bound on ε (never an underestimate), with
        ``epsilon_accountant="rdp"`` and ``error`` saying why.

        Raises:
            ValueError: ``delta`` not in ``(0, 1)``.
        """
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        eps: float | None = None
        error = None
        if self.accountant is not None:
            from opacus.accountants import create_accountant

            used: str | None = self.accountant
            small = self.accountant == "prv" and any(0 < h[0] < PRV_MIN_NOISE_MULTIPLIER for h in self.history)
            if small:
                eps, error = math.nan, f"sigma below {PRV_MIN_NOISE_MULTIPLIER} (PRV would need gigabytes)"
            else:
                acc = create_accountant(self.accountant)
                acc.history = [tuple(h) for h in self.history]
                eps, error = epsilon_for(acc, delta)
            if error is not None and self.accountant != "rdp":
                rdp = create_accountant("rdp")
                rdp.history = [tuple(h) for h in self.history]
                rdp_eps, rdp_error = epsilon_for(rdp, delta)
                if rdp_error is None:
                    eps, used = rdp_eps, "rdp"
                    what = "skipped" if small else "failed"
                    error = f"{self.accountant} {what} ({error}); epsilon from the rdp accountant (an upper bound)"
        else:
            used = None
        return PrivacyReport(self.noise_multiplier, self.max_grad_norm, self.expected_batch_size, self.noise_std,
                             self.accountant, eps, delta, self.sample_rate, self.steps, error, used)


def dp_state(dp_optimizer: Any, accountant: Any | None, sample_rate: float | None = None) -> DPState:
    """Copy the DP state of ``dp_optimizer`` and ``accountant`` now (cheap: no ε computed).

    Args:
        dp_optimizer: an Opacus ``DPOptimizer``.
        accountant: its accountant (:func:`find_accountant`), or ``None``.
        sample_rate: the sample rate the accountant charges, if known.
    """
    sigma = float(dp_optimizer.noise_multiplier)
    clip = dp_optimizer.max_grad_norm
    clip = float(clip) if isinstance(clip, (int, float)) else float(torch.as_tensor(clip, dtype=torch.float64).norm())
    ebs = getattr(dp_optimizer, "expected_batch_size", None)
    ebs = int(ebs) if ebs else None
    mean = getattr(dp_optimizer, "loss_reduction", "mean") == "mean"
    std = sigma * clip / (ebs if ebs and mean else 1)
    history: tuple[tuple[float, float, int], ...] = ()
    mechanism = None
    if accountant is not None:
        history = tuple((float(h[0]), float(h[1]), int(h[2])) for h in (accountant.history or []))
        mechanism = str(accountant.mechanism())
    return DPState(sigma, clip, ebs, std, mechanism, history, sample_rate)


def privacy_report(
    dp_optimizer: Any, accountant: Any | None, delta: float, sample_rate: float | None = None
) -> PrivacyReport:
    """The DP state of ``dp_optimizer`` and ``accountant`` now, with ε at ``delta``.

    Raises:
        ValueError: ``delta`` not in ``(0, 1)``.
    """
    return dp_state(dp_optimizer, accountant, sample_rate).report(delta)


class ReleasedGradientCapture:
    """Copies the gradient DP-SGD releases: a step pre-hook on ``dp_optimizer.original_optimizer``.

    The hook fires inside ``DPOptimizer.step`` after ``pre_step`` has clipped, noised and scaled
    ``p.grad`` (and after the accountant's hook), right before the wrapped optimizer's update. A step that
    Opacus skips (virtual steps of ``BatchMemoryManager``) never reaches it. Nothing is copied unless
    :meth:`arm` was called for this step.

    Args:
        dp_optimizer: an Opacus ``DPOptimizer``.
        parameters: ``{name: parameter}`` whose ``.grad`` to copy.

    Raises:
        TypeError: ``dp_optimizer`` has no ``original_optimizer``.
    """

    def __init__(
        self,
        dp_optimizer: Any,
        parameters: Mapping[str, torch.nn.Parameter],
    ) -> None:
        original = getattr(dp_optimizer, "original_optimizer", None)
        if original is None:
            raise TypeError(f"expected an Opacus DPOptimizer, got {type(dp_optimizer).__name__}")
        self.dp_optimizer = dp_optimizer
        self.parameters = dict(parameters)
        self._names: list[str] | None = None
        self.gradients: dict[str, Tensor] | None = None
        self._handle = original.register_step_pre_hook(self._hook)

    def arm(self, names: Iterable[str] | None = None) -> None:
        """Copy the gradients of ``names`` (default: all parameters) at the next optimizer step."""
        self._names = list(self.parameters) if names is None else list(names)
        self.gradients = None

    def take(self) -> dict[str, Tensor] | None:
        """The copied gradients (``None`` if the armed step has not happened) and disarm."""
        out, self.gradients, self._names = self.gradients, None, None
        return out

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        self._handle.remove()

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._names is None:
            return
        grads = {}
        for name in self._names:
            g = self.parameters[name].grad
            if g is not None:
                grads[name] = g.detach().clone()
        self.gradients = grads
        self._names = None


def default_delta(dataloader: Any) -> float:
    """``1/N`` for a train set of ``N > 1`` examples (``len(dataloader.dataset)``), else :data:`DEFAULT_DELTA`
    (an iterable dataset, or no dataloader yet)."""
    try:
        n = len(dataloader.dataset)
    except Exception:  # noqa: BLE001 - an iterable dataset, or no dataloader yet
        return DEFAULT_DELTA
    return 1.0 / n if n > 1 else DEFAULT_DELTA


@dataclass(frozen=True)
class DPRelease:
    """A DP-SGD run as the audit sees it: the hook that copies the released gradient, and where ε comes from.

    Attributes:
        capture: the step pre-hook on the ``DPOptimizer``'s wrapped optimizer.
        accountant: the Opacus accountant (``None``: noise without accounting, ε not reported).
        sample_rate: the sample rate the accountant charges per step, if known.
        delta: δ at which ε is reported, in ``(0, 1)``.
        canaries: the Dirac canaries in the optimizer's clipped sum (``LeakageAudit(canaries=m)``), or ``None``.
    """

    capture: ReleasedGradientCapture
    accountant: Any
    sample_rate: float | None
    delta: float
    canaries: DiracCanaries | None = None

    @property
    def mechanism(self) -> str | None:
        """The accountant's name (``"prv"``, ``"rdp"``, ``"gdp"``), ``None`` without an accountant."""
        return self.accountant.mechanism() if self.accountant is not None else None

    def state(self) -> DPState:
        """The DP state now (:func:`dp_state`: σ, C, the accountant's history; no ε computed)."""
        state = dp_state(self.capture.dp_optimizer, self.accountant, self.sample_rate)
        return replace(state, canaries=self.canaries.scores()) if self.canaries is not None else state

    def canary_state(self) -> dict[str, Any] | None:
        """The canaries' :meth:`~leak_audit.capture.canaries.DiracCanaries.state_dict` (``None`` without canaries)."""
        return self.canaries.state_dict() if self.canaries is not None else None

    def remove_canaries(self) -> dict[str, Any] | None:
        """Stop the canaries (the optimizer's ``add_noise`` is restored); their last :meth:`canary_state`."""
        state = self.canary_state()
        if self.canaries is not None:
            self.canaries.remove()
        return state


def attach_dp_release(
    optimizers: Iterable[Any],
    parameters: Mapping[str, torch.nn.Parameter],
    *,
    privacy_engine: Any,
    module: Any,
    delta: float | None,
    dataloader: Any,
    recompute: str,
    scope: str,
) -> DPRelease | None:
    """Hook the released-gradient capture onto the run's Opacus ``DPOptimizer``; ``None`` when not DP.

    Args:
        optimizers: the Trainer's optimizers (``LightningOptimizer`` wrappers are unwrapped).
        parameters: ``{name: parameter}`` whose released gradients may be copied.
        privacy_engine: the ``PrivacyEngine`` or accountant to read ε from first (``None``: found on ``module``
            or, read-only, in the optimizer's accountant hook; :func:`find_accountant`).
        module: the LightningModule, searched for a ``privacy_engine`` or ``accountant`` attribute.
        delta: δ for ε; ``None``: :func:`default_delta` of ``dataloader`` (the train dataloader).
        dataloader: the train dataloader, or ``None``.
        recompute, scope: the audit's settings, checked against DP.

    Raises:
        ValueError: ``recompute="eval"`` (it would attack a gradient DP never releases) or ``scope="local"``
            (it reads gradients before clipping and noise) under DP-SGD.
    """
    dp = find_dp_optimizer(optimizers)
    if dp is None:
        return None
    if recompute == "eval":
        raise ValueError(
            "LeakageAudit(recompute='eval') re-computes a gradient without DP noise, but this run trains with "
            "an Opacus DPOptimizer, which releases the clipped and noised gradient: use recompute='observed'"
        )
    if scope == "local":
        raise ValueError("LeakageAudit(scope='local') reads gradients before DP-SGD clips and noises them; with an "
                         "Opacus DPOptimizer use scope='global', which audits the released gradient")
    accountant, sample_rate = find_accountant(dp, privacy_engine, module)
    delta = delta if delta is not None else default_delta(dataloader)
    return DPRelease(ReleasedGradientCapture(dp, parameters), accountant, sample_rate, delta)


def place_canaries(dp: DPRelease | None, count: int, parameters: Mapping[str, torch.nn.Parameter], *, seed: int,
                   world_size: int = 1, state: Mapping[str, Any] | None = None) -> DPRelease:
    """``dp`` with ``count`` Dirac canaries placed in its optimizer (:class:`~leak_audit.capture.canaries.DiracCanaries`).

    Args:
        dp: the run's DP-SGD release (:func:`attach_dp_release`), ``None`` when the run is not DP.
        count: ``m`` ≥ 1.
        parameters: ``{name: parameter}`` of the LightningModule; only trained ones carry canaries.
        seed: the canaries' placement, inclusion and participation seed.
        world_size: processes training; canaries need one.
        state: :meth:`~leak_audit.capture.canaries.DiracCanaries.state_dict` from a checkpoint, to resume.

    Raises:
        CanaryError: no DP optimizer, no sample rate from an accountant, DDP, or as
            :class:`~leak_audit.capture.canaries.DiracCanaries`.
    """
    if dp is None:
        raise CanaryError(f"LeakageAudit(canaries={count}) audits DP-SGD, but this run has no Opacus DPOptimizer: "
                          "make the optimizer private (PrivacyEngine.make_private) or pass canaries=0")
    if world_size > 1:
        raise CanaryError(f"LeakageAudit(canaries={count}) under DDP ({world_size} processes) is not supported: each "
                          "rank's DPOptimizer adds a share of the noise, so no rank sees the released canary "
                          "coordinates before the all-reduce; audit with canaries on one device")
    if dp.sample_rate is None:
        raise CanaryError(f"LeakageAudit(canaries={count}) needs the sample rate the accountant charges (a canary "
                          "joins each step with it), but no Opacus accountant was found: pass privacy_engine=")
    canaries = DiracCanaries(dp.capture.dp_optimizer, parameters, count, sample_rate=dp.sample_rate, seed=seed)
    if state:
        canaries.load_state_dict(state)
    return replace(dp, canaries=canaries)


def announce_dp_release(dp: DPRelease, loggers: Iterable[Any], *, text_attacks: Iterable[str] | None) -> None:
    """Say on rank zero what an audit under DP-SGD reads, and log the accounting as hyperparameters.

    Logs ``privacy/accountant`` and ``privacy/delta`` to every logger; warns when no accountant was found
    (ε is then not reported) and, for a text model (``text_attacks``: the attacks that run) without
    ``gradient_matching``, when the noise multiplier is below :data:`SMALL_NOISE_MULTIPLIER`, where the span
    attacks read nothing although text is still recoverable; for a text model, also when it is below
    :data:`LOWER_BOUND_NOISE_MULTIPLIER`, that the text metrics are lower bounds there.
    """
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn  # not at import: `leak-audit gate` starts fast

    optimizer, mechanism = dp.capture.dp_optimizer, dp.mechanism
    sigma = optimizer.noise_multiplier
    if mechanism is None:
        rank_zero_warn("LeakageAudit: DP-SGD detected but no Opacus accountant found (pass privacy_engine=); "
                       "epsilon is not reported")
    for logger in loggers:
        logger.log_hyperparams({"privacy/accountant": mechanism or "none", "privacy/delta": dp.delta})
    if text_attacks is not None and 0 < sigma < SMALL_NOISE_MULTIPLIER and "gradient_matching" not in text_attacks:
        rank_zero_warn(
            f"LeakageAudit: noise multiplier {sigma} < {SMALL_NOISE_MULTIPLIER}: at such noise the span attacks "
            "read nothing while gradient_matching still recovers text (CoLA, B=1: ROUGE-1 0.58 at sigma 1e-4); "
            "add attacks=(..., 'gradient_matching') for an honest worst case"
        )
    if text_attacks is not None and 0 < sigma < LOWER_BOUND_NOISE_MULTIPLIER:
        rank_zero_warn(
            f"LeakageAudit: noise multiplier {sigma} < {LOWER_BOUND_NOISE_MULTIPLIER}: the released gradient still "
            "ranks a private sentence above the single-token changes of it that were tried (CoLA, B=1, sigma 0.01), so low text "
            "leakage here is a lower bound set by the attacks' search, not evidence that the noise hides the text: "
            "the audit records are marked so (info.lower_bound) and the release gate never counts them toward a pass"
        )
    rank_zero_info(
        f"LeakageAudit: DP-SGD (noise multiplier {sigma}, max grad norm {optimizer.max_grad_norm}, accountant "
        f"{mechanism}): auditing the released (clipped, noised) gradient; epsilon at delta={dp.delta:g}"
    )
