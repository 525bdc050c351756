"""Gradient matching: optimise inputs until their gradient matches the observed one (TAG / LAMP).

Follows Deng et al., "TAG: Gradient Attack on Transformer-based Language Models" (EMNLP Findings 2021)
and Balunović, Dimitrov, Jovanović, Vechev, "LAMP: Extracting Text from Gradients with Language Model
Priors" (NeurIPS 2022). The attacker holds the model (a :class:`~leak_audit.models.replica.ModelReplica` at the
audited step's parameters) and the observed gradient ``g*`` of the tapped parameters. It searches for
word embeddings ``x`` (``[B, L, d]``, fed as ``inputs_embeds``: the model adds position and token-type
embeddings and its LayerNorm) and labels ``y`` minimising a gradient distance ``D(∇θ L(x, y), g*)``
(default: LAMP's per-tensor cosine, see :class:`~leak_audit.attacks.optim.GradientDistance`):

1. **Continuous phase** (Adam, double backpropagation through the model, cosine-decayed step size):
   ``D`` plus LAMP's embedding-norm regulariser ``λ (mean_i ‖x_i‖ / ē − 1)²`` (``ē`` the mean norm of a
   candidate token's embedding). By default each position is a softmax mixture of the candidate tokens'
   embeddings (``parametrization="simplex"``) rather than LAMP's free vector: on the tests' small BERT
   this projected 94% of the tokens right against 27% (the free optimum drifts off the token manifold).
   Every ``project_every`` steps the current point is projected to tokens (heaviest mixture token and
   nearest token by cosine) and scored on the real token ids; the best projection is kept, and an
   exact one (scale-invariant relative gradient distance below ``exact_tol``) ends the attack.
2. **Discrete phase** (LAMP's transformations) from the best projection: at ``B > 1`` exchanges of the
   tokens two sequences hold at the same position (which assigns position-wise tokens, e.g. those
   ``span_check`` finds past its rank on LoRA gradients, to their sentences), sweeps of single-token
   replacements (candidates per position: the continuous solution's nearest tokens, the sequence's
   own tokens, and a HotFlip/GCG first-order estimate), then random swaps / token moves / span moves.
   Candidates are scored by ``D`` on the real token ids (plus ``lm_weight`` × the mean token negative
   log-likelihood of a causal LM when ``lm_path`` is given); an improvement is kept.

``[CLS]`` first and ``[SEP]`` last are fixed structure, never optimised. Every tapped parameter of the
model is matched except the word-embedding table (its gradient is defined for token ids only; the
``token_bag`` attack reads it), so the attack works on any view: the whole model, one layer, or one
linear module deep inside. Labels without a prior are optimised as soft labels, started from iDLG's rule
(``argmin`` of the classifier-bias gradient at ``B = 1``) or, when the bias is not tapped, from the label
assignment whose gradient fits the random start best (a wrong label flips the gradient's sign, a
stationary point of the cosine).

Priors from earlier attacks, when present (``uses``): ``labels`` fixes the labels (at ``B > 1`` a
multiset, assigned to the sequences in the order that fits best), ``token_bag`` restricts the candidate
vocabulary (the seed's tokens stay in it), ``position_match`` (else ``span_check``) gives the sequence lengths
and a seed: the continuous phase starts from the seed and the discrete phase from the best of seed and
projection, and a seed whose gradient already matches (below ``exact_tol``) is returned at once
(``info["exact_seed"] = 1``, no step run). Under DP noise, seeded by ``position_match``: benchmarks/README.md.

Measured on this project's 2-core CPU (shared with other jobs, one intra-op thread), B = 1, dropout off,
real CoLA dev sentences, no priors, default options (``max_seconds=20``):

* pretrained all-MiniLM-L6-v2, first 8 sentences: full gradient ROUGE-1 0.57 / ROUGE-2 0.15; only layer 3's
  query (weight and bias) 0.20 / 0.04; 20 s per attack (the budget binds: ~105 / ~280 Adam steps). On it the
  :class:`~leak_audit.attacks.text.dlg.DLG` baseline (free embeddings, l2, L-BFGS) did as well or better on
  the first 4 sentences (ROUGE-1 0.73 against 0.62 here); ``optimizer="lbfgs", parametrization="free"``
  gave 0.61 (cos) and 0.64 (l2), free embeddings with Adam 0.36, l2 with the simplex 0.26.
* the tests' random 2-layer d = 64 BERT over 8000 tokens, full gradient, 300 steps: ROUGE-1 0.94,
  ROUGE-2 0.90, 6/8 sentences exact, 0.3 to 7 s each (``tests/attacks/text/test_gradient_matching.py``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor

from leak_audit.attacks.optim import (
    LOSSES,
    GradientDistance,
    Layout,
    Objective,
    infer_length,
    matched_gradient_names,
    nearest_tokens,
)
from leak_audit.attacks.budget import OutOfBudget, late
from leak_audit.attacks.base import (
    Attack,
    AttackInput,
    Budget,
    NotApplicable,
    Reconstruction,
    Requirements,
    require_classifier,
)
from leak_audit.attacks.text.matching_search import (
    PARAMETRIZATIONS,
    BestCandidate,
    DiscreteSearch,
    LanguagePrior,
    SearchSpace,
    distinct_permutations,
    random_moves,
)
from leak_audit.attacks.gaps import lora_sentence_gap
from leak_audit.models import TextModelSpec
from leak_audit.results.records import LOWER_BOUND

__all__ = ["OPTIMIZERS", "GradientMatching"]

OPTIMIZERS: tuple[str, ...] = ("adam", "lbfgs")
"""Continuous-phase optimisers: Adam (TAG, LAMP) or L-BFGS with a strong-Wolfe line search (DLG)."""

def _check(name: str, value: float, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    bad = value <= low if low_open else value < low
    if bad or value > high:
        lo = "(" if low_open else "["
        hi = "]" if high != math.inf else ")"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


class GradientMatching(Attack):
    """Registered attack ``"gradient_matching"``: TAG/LAMP gradient matching with a discrete search.

    Args:
        loss: gradient distance, one of ``"cos"`` (LAMP, default), ``"l2"`` (DLG), ``"l2+l1"`` (TAG); see
            :class:`~leak_audit.attacks.optim.GradientDistance`.
        alpha: weight of the l1 term of ``"l2+l1"`` (both terms are normalised by the observed gradient).
        reg_weight: weight ``λ`` of the embedding-norm regulariser (LAMP), dimensionless.
        parametrization: the continuous search space, one of :data:`PARAMETRIZATIONS`. ``"simplex"``
            (default): each position is ``softmax(w) E``, a mixture of the candidate tokens' embeddings
            (logits ``w`` ``[B, L, K]``), projected to ``argmax w``. ``"free"``: LAMP's unconstrained
            embeddings ``[B, L, d]``, projected to the nearest token (cosine). On the tests' small BERT
            (600 steps, 4 CoLA sentences) the simplex projected 94% of the tokens right, the free
            embeddings 27%: the free optimum drifts off the token manifold, where many embeddings give
            nearly the same gradient, and the nearest token is then mostly wrong.
        optimizer: continuous-phase optimiser, one of :data:`OPTIMIZERS`: ``"adam"`` (default) or
            ``"lbfgs"`` (strong-Wolfe line search; each line-search evaluation counts as a step; ``lr``
            and the schedule do not apply). L-BFGS suits ``parametrization="free"`` only (with the
            simplex it scored ROUGE-1 0.05 on MiniLM and 0.31 on the small BERT).
        lr: Adam step size, cosine-decayed to a tenth over the continuous budget. ``None``: 0.5 for
            ``"simplex"`` (on the logits), 0.1 for ``"free"`` (in units of the word-embedding table's
            per-coordinate standard deviation).
        label_lr: Adam step size of the soft-label logits (when labels are optimised).
        max_steps: continuous-phase steps (gradient evaluations) per restart.
        max_seconds: the attack's own wall-clock budget of one run (seconds), capped by the audit's
            deadline (:meth:`~leak_audit.attacks.base.AttackInput.budget`). The phases split the budget
            (``discrete_share``, equal continuous slices per restart); the deadline is checked before each
            seed scoring, label-start evaluation, Adam step or L-BFGS evaluation and discrete candidate,
            so a run ends within one gradient evaluation of it. When the audit's deadline is the earlier
            limit and time ended a phase (not ``exact_tol``, ``max_steps``, ``discrete_steps`` or
            ``patience``), the result is ``timed_out`` with ``info["progress"]``.
        restarts: independent random initialisations (the first starts from the span-check seed when
            there is one); each gets an equal share of the continuous time budget, and the best
            projection seen over all of them goes on to the discrete phase.
        max_length: sequence length ``L`` when neither a seed, the position-embedding gradient nor a
            gradient's rank gives it.
        discrete_share: share of ``max_seconds`` kept for the discrete phase, in ``[0, 1)``.
        discrete_steps: discrete rounds at most (a round: one exchange pass at ``B > 1``, one replacement
            sweep, then ``candidates`` random reorderings).
        candidates: random reorderings (swap, move a token, move a span) scored per round.
        top_k: replacement candidates per position and source (heaviest mixture tokens, nearest tokens,
            HotFlip estimate).
        patience: the discrete phase stops after this many rounds without improvement.
        project_every: continuous steps between projections; every projection is scored on the real
            tokens and the best one seen (over all steps and restarts) starts the discrete phase.
        lm_path: local directory of a Hugging Face causal LM whose perplexity is added to the discrete
            score (LAMP's language-model prior); ``None`` (default) for none.
        lm_weight: weight of the LM's mean token NLL (nats) in the discrete score.
        lm_tokenizer: the classifier's tokenizer (object or local path) for an LM with its own vocabulary.
        exact_tol: scale-invariant relative l2 gradient distance (see
            :meth:`~leak_audit.attacks.optim.GradientDistance.relative`) below which a candidate counts
            as exact: a seed is returned at once, an optimisation stops.
        use_token_bag: restrict the vocabulary to ``token_bag``'s bag when that attack ran.

    Raises:
        ValueError: an option out of range (the message names the value and the valid range or names).
    """

    name = "gradient_matching"
    cost = "optimisation"
    uses = ("labels", "token_bag", "position_match", "span_check")

    def __init__(
        self,
        loss: str = "cos",
        *,
        alpha: float = 0.01,
        reg_weight: float = 0.01,
        parametrization: str = "simplex",
        optimizer: str = "adam",
        lr: float | None = None,
        label_lr: float = 0.1,
        max_steps: int = 2000,
        max_seconds: float = 20.0,
        restarts: int = 1,
        max_length: int = 32,
        discrete_share: float = 0.2,
        discrete_steps: int = 200,
        candidates: int = 16,
        top_k: int = 8,
        patience: int = 20,
        project_every: int = 25,
        lm_path: str | None = None,
        lm_weight: float = 0.1,
        lm_tokenizer: Any = None,
        exact_tol: float = 1e-5,
        use_token_bag: bool = True,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        positive = (("max_steps", max_steps), ("restarts", restarts), ("candidates", candidates), ("top_k", top_k),
                    ("project_every", project_every))
        for n, v in positive:
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be an integer >= 1, got {v!r}")
        for n, v in (("discrete_steps", discrete_steps), ("patience", patience)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{n} must be an integer >= 0, got {v!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 ([CLS] and [SEP]), got {max_length!r}")
        _check("max_seconds", max_seconds, 0.0, low_open=True)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {parametrization!r}; valid: {', '.join(PARAMETRIZATIONS)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if lr is not None:
            _check("lr", lr, 0.0, low_open=True)
        _check("label_lr", label_lr, 0.0, low_open=True)
        _check("alpha", alpha, 0.0)
        _check("reg_weight", reg_weight, 0.0)
        _check("lm_weight", lm_weight, 0.0)
        _check("exact_tol", exact_tol, 0.0, 1.0)
        if not 0 <= discrete_share < 1:
            raise ValueError(f"discrete_share must be in [0, 1), got {discrete_share!r}")
        self.loss = loss
        self.alpha = alpha
        self.reg_weight = reg_weight
        self.parametrization = parametrization
        self.optimizer = optimizer
        self.lr = lr
        self.project_every = project_every
        self.label_lr = label_lr
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.restarts = restarts
        self.max_length = max_length
        self.discrete_share = discrete_share
        self.discrete_steps = discrete_steps
        self.candidates = candidates
        self.top_k = top_k
        self.patience = patience
        self.lm_path = lm_path
        self.lm_weight = lm_weight
        self.lm_tokenizer = lm_tokenizer
        self.exact_tol = exact_tol
        self.use_token_bag = use_token_bag
        self._lm: LanguagePrior | None = None

    def __repr__(self) -> str:
        return f"GradientMatching(loss={self.loss!r}, max_steps={self.max_steps}, max_seconds={self.max_seconds})"

    # ------------------------------------------------------------------ contract
    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        require_classifier(spec)
        names = matched_gradient_names(spec, tapped)
        return Requirements(gradients=frozenset(names), params=frozenset({spec.word_embeddings}), replica=True)

    def run(self, inp: AttackInput) -> Reconstruction:
        budget = inp.budget(self.max_seconds)
        with torch.enable_grad():
            return self._run(inp, budget)

    # ------------------------------------------------------------------ pieces
    def _language_prior(self) -> LanguagePrior | None:
        if self.lm_path is None:
            return None
        if self._lm is None:
            self._lm = LanguagePrior(self.lm_path, self.lm_tokenizer)
        return self._lm

    def _run(self, inp: AttackInput, budget: Budget) -> Reconstruction:
        start = budget.start
        spec, replica = inp.spec, inp.replica
        if replica is None:
            raise NotApplicable("gradient matching runs the model, but no model replica was given")
        names = sorted(
            n for n in matched_gradient_names(spec, inp.gradients) if n in replica.parameter_names
        )
        if not names:
            raise NotApplicable("none of the tapped gradients belongs to the replicated model")
        deadline = budget.deadline
        timed = False  # time (a phase's share of the budget, or the deadline) ended a phase
        gen = inp.generator if inp.generator is not None else torch.Generator().manual_seed(0)
        b = max(1, inp.batch_size)
        info: dict[str, Any] = {"matched_tensors": len(names), "loss": self.loss}
        info.update({LOWER_BOUND: gap} if (gap := lora_sentence_gap(spec, inp.gradients, inp.batch_size)) else {})

        # ---- layout: from position_match's or span_check's seeds, else the length rule
        found = [(k, [list(q) for q in r.sequences[:b]]) for k in ("position_match", "span_check")
                 if (r := inp.priors.get(k)) is not None and r.sequences and min(len(q) for q in r.sequences[:b]) >= 2]
        seeds = found[0][1] if found else []
        if seeds:
            lengths = [len(q) for q in seeds] + [max(len(q) for q in seeds)] * (b - len(seeds))
            info["length_source"] = found[0][0]
        else:
            length, source = infer_length({n: inp.gradients[n] for n in names}, spec, b, self.max_length,
                                          noise_std=inp.noise_std)
            length = max(2, min(length, spec.max_positions - spec.position_offset))
            lengths = [length] * b
            info["length_source"] = source
        dev = replica.input_embeddings(inp.params).device  # the attack's tensors live with the snapshot's
        layout = Layout.build(lengths, spec, fix_special=True, device=dev)
        info["length"] = max(lengths)
        info["seeded"] = int(bool(seeds))

        # ---- vocabulary
        special = set(spec.special_token_ids)
        bag = inp.priors.get("token_bag")
        if self.use_token_bag and bag is not None and bag.token_bag:
            kept = {int(t) for t in bag.token_bag} | {int(t) for q in seeds for t in q}  # the seeds' tokens stay reachable
            vocab = sorted(kept - special) or sorted(kept)
            info["vocabulary"] = "token_bag"
        else:
            vocab = [t for t in range(spec.vocab_size) if t not in special]
            info["vocabulary"] = "all"
        vocabulary = torch.tensor(vocab, dtype=torch.long, device=dev)

        distance = GradientDistance([inp.gradients[n] for n in names], self.loss, self.alpha,
                                    noise_std=inp.noise_std)
        obj = Objective(replica, inp.params, names, distance, layout)
        lm = self._language_prior()

        def score(ids: Tensor, labels: Tensor) -> tuple[float, float, float]:
            d, rel = obj.score_ids(ids, labels)
            s = d + (self.lm_weight * lm.nll(layout.sequences(ids), special) if lm is not None else 0.0)
            return s, d, rel

        # ---- labels
        lp = inp.priors.get("labels")
        prior_labels = list(lp.labels) if lp is not None and lp.labels and len(lp.labels) == b else None
        num_labels = max(2, spec.num_labels)
        if prior_labels is not None:
            label_options = [torch.tensor(p, device=dev) for p in distinct_permutations(prior_labels, limit=24)]
            info["labels_source"] = "labels"
        else:
            combos = num_labels**b
            label_options = (
                [torch.tensor(c, device=dev) for c in itertools.product(range(num_labels), repeat=b)]
                if combos <= 32 else []
            )
            info["labels_source"] = "optimised"
        fixed_labels: Tensor | None = label_options[0] if prior_labels is not None else None
        label_guess: Tensor | None = None

        # ---- the seed: exact already?
        seed_ids: Tensor | None = None
        best: tuple[float, float, float, Tensor, Tensor] | None = None  # (score, distance, rel, ids, labels)
        if seeds:
            seed_ids = layout.from_sequences(seeds + [seeds[0][: lengths[-1]]] * (b - len(seeds)))
            for lab in label_options or ([fixed_labels] if fixed_labels is not None else []):
                if best is not None and late(deadline):
                    timed = True
                    break
                s, d, rel = score(seed_ids, lab)
                if best is None or s < best[0]:
                    best = (s, d, rel, seed_ids, lab)
            if best is not None:
                label_guess = best[4]
                if prior_labels is not None:
                    fixed_labels = best[4]
                if best[2] < self.exact_tol:
                    info.update(exact_seed=1, steps=0, restarts=0, distance=best[1], relative_distance=best[2])
                    info["seconds"] = round(time.monotonic() - start, 3)
                    return self._result(layout, best[3], best[4], info)
        info["exact_seed"] = 0

        # ---- continuous phase: keep the best projection seen (periodic projections, every restart)
        cont_deadline = start + (deadline - start) * (1 - self.discrete_share)
        space = SearchSpace(self.parametrization, obj.table, vocabulary)
        keep = BestCandidate()
        if best is not None:
            keep.offer(*best, neighbours=nearest_tokens(obj.table[best[3]], obj.table, vocabulary, self.top_k + 1))
        steps_total, firsts, lasts = 0, [], []
        for r in range(self.restarts):
            now = time.monotonic()
            if keep.relative < self.exact_tol:
                break
            if now >= cont_deadline:
                timed = True  # restarts left
                break
            slice_end = now + (cont_deadline - now) / (self.restarts - r)
            w0 = space.init_seed(seed_ids, gen) if seed_ids is not None and r == 0 else space.init_random(layout, gen)
            z0 = None
            if fixed_labels is None:
                z0 = 0.01 * torch.randn(b, num_labels, generator=gen).to(dev)
                guess = label_guess if label_guess is not None else _bias_label_guess(inp, b)
                if guess is None and label_options:
                    # a wrong label flips the sign of the gradient (cosine ≈ -1, a stationary point for
                    # the soft labels): start from the label assignment that fits the start point best
                    with torch.no_grad():
                        x0 = obj.embed(space.embeddings(w0))
                        fits: list[tuple[float, Tensor]] = []
                        for lab in label_options:
                            if fits and late(slice_end):
                                timed = True
                                break
                            fits.append((float(obj.distance(obj.grads_embeds(x0, lab, create_graph=False))), lab))
                        guess = min(fits, key=lambda f: f[0])[1]
                if guess is not None:
                    z0 = z0 + 3.0 * torch.nn.functional.one_hot(guess, num_labels).float()
            steps, first, last, cut = self._continuous(
                obj, space, w0, z0, fixed_labels, slice_end, score, keep, deadline
            )
            timed = timed or cut
            steps_total += steps
            firsts.append(first)
            lasts.append(last)
        info["steps"] = steps_total
        info["restarts"] = len(firsts)
        info["init_distance"] = firsts[0] if firsts else float("nan")
        info["continuous_distance"] = min(lasts) if lasts else float("nan")
        if keep.ids is None:  # no time for a single step: project a random start
            w0 = space.init_random(layout, gen)
            labels = fixed_labels if fixed_labels is not None else torch.zeros(b, dtype=torch.long, device=dev)
            ids = layout.ids(space.projections(w0)[0])
            keep.offer(*score(ids, labels), ids, labels, neighbours=space.neighbours(w0, self.top_k))
        info["projected_distance"] = keep.distance

        # ---- discrete phase from the best candidate so far (the seed when it scores better)
        assert keep.ids is not None and keep.labels is not None and keep.neighbours is not None
        def linearized(ids: Tensor, labels: Tensor) -> Tensor:
            """HotFlip/GCG candidates: the ``top_k`` tokens per position whose swap-in lowers the
            first-order estimate ``∇_{x_i} D · (e_v − x_i)`` most (one double backward)."""
            e = obj.table[ids].float().clone().requires_grad_(True)
            dist = obj.distance(obj.grads_embeds(e, labels, create_graph=True))
            (ge,) = torch.autograd.grad(dist, [e])
            gain = ge @ space.cand.T - (ge * e.detach()).sum(-1, keepdim=True)
            return space.vocabulary[gain.topk(min(self.top_k, gain.shape[-1]), dim=-1, largest=False).indices]

        search = DiscreteSearch(layout, score, keep, deadline, self.exact_tol, linearized)
        rounds = stale = 0
        while rounds < self.discrete_steps and stale < self.patience and not search.done():
            # exchanges across sequences (B > 1), a sweep of single-token replacements, then a round of
            # random reorderings (LAMP's moves)
            improved = search.exchange() if b > 1 else False
            improved = search.sweep() or improved
            cands = random_moves(search.ids, layout, keep.neighbours, self.candidates, gen, reorder_only=True)
            improved = search.try_candidates(cands) or improved
            rounds += 1
            stale = 0 if improved else stale + 1
        timed = timed or search.cut
        current = (search.score, search.distance, search.relative, search.ids, search.labels)
        accepted = search.accepted
        timed_out = timed and budget.audit_bound and current[2] >= self.exact_tol
        if timed_out:
            info["progress"] = (
                f"{steps_total} continuous steps over {len(firsts)} of {self.restarts} restarts, {rounds} of "
                f"{self.discrete_steps} discrete rounds; relative distance {current[2]:.3g}"
            )
        info.update(
            discrete_rounds=rounds,
            discrete_accepted=accepted,
            distance=current[1],
            relative_distance=current[2],
            evaluations=obj.evaluations,
        )
        if lm is not None:
            info["score"] = current[0]
        info["seconds"] = round(time.monotonic() - start, 3)
        return self._result(layout, current[3], current[4], info, timed_out=timed_out)

    def _continuous(
        self,
        obj: Objective,
        space: SearchSpace,
        w0: Tensor,
        z0: Tensor | None,
        fixed_labels: Tensor | None,
        slice_end: float,
        score: Any,
        keep: BestCandidate,
        deadline: float,
    ) -> tuple[int, float, float, bool]:
        """Adam on ``D + λ·reg`` until ``slice_end`` or :attr:`max_steps`, projecting every
        :attr:`project_every` steps (and at the end) and offering each projection to ``keep``. Past the
        run's ``deadline`` a projection is scored only while ``keep`` holds none.

        Returns:
            ``(steps, distance at the first step, lowest distance, whether time ended it)``: time ended it
            when ``slice_end`` came before :attr:`max_steps`, an exact projection or a diverged step.
        """
        w = w0.clone().requires_grad_(True)
        lr = self.lr if self.lr is not None else space.default_lr
        base = lr * space.lr_unit
        groups: list[dict[str, Any]] = [{"params": [w], "lr": base, "base": base}]
        z = None
        if z0 is not None:
            z = z0.clone().requires_grad_(True)
            groups.append({"params": [z], "lr": self.label_lr, "base": self.label_lr})
        t0 = time.monotonic()
        budget = max(slice_end - t0, 1e-6)
        layout = obj.layout
        free = layout.free
        first, lowest, steps = math.nan, math.inf, 0
        cut = False
        seen: set[tuple[int, ...]] = set()

        def project() -> None:
            with torch.no_grad():
                labels = fixed_labels if z is None else z.argmax(-1)
                for proj in space.projections(w):
                    if keep.ids is not None and late(deadline):
                        return  # out of time: keep what was scored
                    ids = layout.ids(proj)
                    key = tuple(ids.flatten().tolist()) + tuple(labels.tolist())
                    if key in seen:
                        continue
                    seen.add(key)
                    s, d, rel = score(ids, labels)
                    if s < keep.score:
                        keep.offer(s, d, rel, ids, labels, neighbours=space.neighbours(w, self.top_k))

        if not bool(free.any()):
            project()
            return 0, math.nan, math.nan, False
        leaves = [w] if z is None else [w, z]
        last = math.nan

        def evaluate() -> Tensor:
            """Loss at the current point; sets the leaves' ``.grad``; tracks the first/lowest distance."""
            nonlocal first, lowest, last
            x = space.embeddings(w)
            labels = fixed_labels if z is None else z.softmax(-1)
            dist = obj.distance(obj.grads_embeds(obj.embed(x), labels, create_graph=True))
            loss = dist
            if self.reg_weight > 0:
                norms = x.norm(dim=-1)[free]
                loss = loss + self.reg_weight * (norms.mean() / space.mean_norm - 1) ** 2
            for leaf, g in zip(leaves, torch.autograd.grad(loss, leaves), strict=True):
                leaf.grad = g
            last = float(dist.detach())
            if math.isnan(first):
                first = last
            if math.isfinite(last):
                lowest = min(lowest, last)
            return loss.detach()

        if self.optimizer == "lbfgs":
            lbfgs = torch.optim.LBFGS(leaves, lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                nonlocal steps, cut
                if steps >= self.max_steps or keep.relative < self.exact_tol:
                    raise OutOfBudget
                if late(slice_end):
                    cut = True
                    raise OutOfBudget
                loss = evaluate()
                steps += 1
                if steps % self.project_every == 0:
                    project()
                return loss

            try:
                while math.isfinite(last) or steps == 0:
                    lbfgs.step(closure)
            except OutOfBudget:
                pass
            project()
            return steps, first, lowest, cut
        opt = torch.optim.Adam(groups)
        while steps < self.max_steps:
            progress = max(steps / self.max_steps, (time.monotonic() - t0) / budget)
            if progress >= 1:
                cut = True  # steps < max_steps: the slice's time ran out
                break
            decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
            for g in opt.param_groups:
                g["lr"] = g["base"] * decay
            evaluate()
            if not math.isfinite(last):
                break
            opt.step()
            steps += 1
            if steps % self.project_every == 0:
                project()
                if keep.relative < self.exact_tol:  # the projection reproduces the gradient: done
                    return steps, first, lowest, False
        project()
        return steps, first, lowest, cut

    def _result(
        self, layout: Layout, ids: Tensor, labels: Tensor | None, info: dict[str, Any], timed_out: bool = False
    ) -> Reconstruction:
        return Reconstruction(
            attack=self.name,
            sequences=layout.sequences(ids),
            labels=None if labels is None else [int(v) for v in labels.tolist()],
            labels_aligned=labels is not None,
            info={k: (round(v, 8) if isinstance(v, float) else v) for k, v in info.items()},
            timed_out=timed_out,
        )


def _bias_label_guess(inp: AttackInput, batch_size: int) -> Tensor | None:
    """iDLG's start for the soft labels at ``B = 1``: the class whose bias gradient is negative."""
    name = inp.spec.classifier_bias
    if batch_size != 1 or name is None or name not in inp.gradients:
        return None
    return inp.gradients[name].detach().reshape(-1).argmin().reshape(1)
