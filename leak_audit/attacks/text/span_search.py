"""Span search: recover text from the weight gradient of *one linear layer deep inside* the model.

For a linear map ``y = W x`` applied at every position, ``∂L/∂W = Σ_t δ_t x_tᵀ``: its row space is spanned
by the layer's inputs ``x_t`` (Li, Xu, Dras 2024, "Seeing the Forest through the Trees: Data Leakage from
Partial Transformer Gradients"; DAGER, Petrov et al. 2024). Deep inside an encoder the inputs of layer
``k`` are functions of the *whole* sequence, so the per-position token test of
:mod:`~leak_audit.attacks.text.span_check` does not apply. Instead of generic gradient matching (which
differentiates through the gradient), span search looks for token sequences whose layer inputs *fall into that span*, a first-order objective:

    D(X) = Σ_t ‖(I − V Vᵀ) x_t‖² / ‖x_t‖²  +  (r − ‖Q_Xᵀ V‖²_F)

with ``V`` (``[d, r]``) an orthonormal basis of the gradient's row space and ``Q_X`` one of the span of the
candidate's inputs. The first term asks every input to lie in the span; the second (``r`` minus the
squared cosines of the principal angles) asks the inputs to *cover* it, which rules out sequences that
repeat one well-fitting token. ``D = 0`` exactly for the private batch (dropout off), so a zero score
certifies an exact reconstruction.

Three stages:

1. **Continuous relaxation.** Input word embeddings ``[R, L, d]`` (``R`` restarts as one batch) are
   optimised with Adam on ``D``; ``[CLS]``/``[SEP]`` are known structure.
2. **Projection.** Each position's nearest word embeddings (cosine) form a pool of candidate tokens.
3. **Discrete descent** on the exact ``D`` of real token sequences, a variable-neighbourhood descent.
   Each step scores a neighbourhood (:func:`neighbours`) and takes its best sequence. The first level
   only replaces a token by one of those that lower ``D`` most to first order (the gradient of ``D`` with
   respect to the input embeddings, as HotFlip and GCG rank them). When that is stuck, the next level
   also swaps two tokens, moves a token (LAMP's discrete moves, Balunović et al. 2022) and shifts a block
   by one (delete a token, insert a ranked one elsewhere), and follows the best of these moves by a
   replacement where they put a token; the last two levels rank more tokens. An improvement returns to
   the first level. The descent ends when every level is stuck, or when ``D`` is numerically zero; then
   perturb-and-descend while time is left.

The sequence length is the rank of the gradient at ``B = 1`` (one input per position). At ``B > 1`` the
rank is the total number of tokens; without better information the batch is split into equal lengths.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leak_audit.attacks.budget import late
from leak_audit.attacks.gaps import span_search_gap
from leak_audit.attacks.precision import SCREEN_CHOICES, cast_floating, screening_dtype
from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements, require_encoder
from leak_audit.attacks.spans import span_basis, span_distance
from leak_audit.models import TextModelSpec
from leak_audit.models.replica import ModelReplica
from leak_audit.results.records import LOWER_BOUND

__all__ = ["SCORE_CHUNK", "SCORE_TOKENS", "VERIFY", "WIDEN", "SpanSearch", "module_inputs", "neighbours"]

SCORE_CHUNK = 2**21
"""Elements (candidates × inputs × width) of the layer inputs the discrete search scores in one batch.

A move scores every candidate of a pool against the whole batch's inputs, ``[K, N, d]``, after running
the model on the ``K`` candidates: at B = 16 on SST-2 (MiniLM, layer 3, 369 tokens, a pool of ~4600
tokens) one unchunked replacement step held a ``[4600, 369, 384]`` tensor (2.6 GB, 15 GB peak with its
QR) and ran for minutes between two deadline checks (a 10 s budget overran to 206 s). Chunks of at most
this many elements and :data:`SCORE_TOKENS` candidate tokens (a few tenths of a second each on MiniLM,
one thread) let the deadline be checked between chunks."""

SCORE_TOKENS = 1024
"""Candidate tokens (rows × sequence length) the discrete search runs through the model in one batch.

Each call of the replica swaps its ~200 parameters in and out (``functional_call``) and walks the module
tree, a millisecond or two whatever the batch: at 256 tokens that overhead was a fifth of span search's time
on SST-2 (layer 3's query, B = 1, cProfile); 1024 tokens take ~0.1 s on one thread."""

WIDEN = 4
"""Factor by which the descent's last two levels rank more replacement tokens (``replace_k``, then 4×,
then 16×) before it counts a local minimum; shifts then insert 4× more of them."""

VERIFY = 8
"""With screening on, how many of a step's best-screened candidates are rescored in float32 to pick the move."""


class _Captured(Exception):
    """Raised by the capture hook once every wanted module input is recorded (skips the rest)."""


def module_inputs(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    modules: Sequence[str],
    *,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    token_type_ids: Tensor | None = None,
) -> dict[str, Tensor]:
    """Inputs of ``modules`` (root-relative module names) when the replica runs on a batch.

    The forward pass stops as soon as the last wanted input is captured, so asking for layer ``k`` costs
    ``k + 1`` layers. All positions are attended (no padding).

    Args:
        replica: the model replica.
        params: parameter values (root-relative names).
        modules: names of modules inside the replicated model.
        input_ids: ``[K, L]`` token ids, or ``inputs_embeds`` ``[K, L, d]`` word embeddings.
        token_type_ids: ``[K, L]`` segment ids (default zeros).

    Returns:
        ``{module: [K, L, d_in]}``, differentiable when ``inputs_embeds`` requires grad.

    Raises:
        KeyError: a module name is not inside the replicated model.
    """
    prefix = replica.prefix
    captured: dict[str, Tensor] = {}
    handles = []
    for name in modules:
        if not name.startswith(prefix):
            raise KeyError(f"module {name!r} is outside the replicated model (prefix {prefix!r})")
        module = replica.model.get_submodule(name[len(prefix) :])

        def hook(_m: nn.Module, args: tuple, _name: str = name) -> None:
            captured[_name] = args[0]
            if len(captured) == len(modules):
                raise _Captured

        handles.append(module.register_forward_pre_hook(hook))
    ref = input_ids if input_ids is not None else inputs_embeds
    assert ref is not None, "input_ids or inputs_embeds is required"
    mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
    try:
        replica.forward(params, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                        token_type_ids=token_type_ids)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


def neighbours(
    q: Tensor, free: Sequence[int], top: Tensor, shift_k: int, reorder: bool = True
) -> tuple[Tensor, Tensor]:
    """Every sequence one discrete move away from ``q``: the descent's candidates, duplicates removed.

    Moves (only at the ``free`` positions, so ``[CLS]``/``[SEP]`` stay put):

    * **replace** the token at ``i`` by one of ``top[i]``;
    * **swap** two tokens; **move** one token to another position (LAMP's discrete moves, Balunović et
      al. 2022);
    * **shift**: delete the token at ``j`` and insert one of ``top[i, :shift_k]`` at ``i``, which slides
      the block between them by one. A correct block one position off is a local minimum of single
      replaces, swaps and moves (SST-2 dev 2, layer 3's query, B = 1; see the test suite).

    Args:
        q: ``[L]`` token ids.
        free: the positions moves may touch.
        top: ``[L, k]`` ranked replacement tokens per position.
        shift_k: how many of each position's ranked tokens a shift may insert.
        reorder: ``False``: replacements only (the cheap first level of the descent).

    Returns:
        ``([M, L]`` distinct candidate sequences, ``q`` itself excluded; ``[M]`` the position each move
        put a token at: the one a look-ahead replacement then revisits).
    """
    base = q.tolist()
    body = [base[i] for i in free]
    rows: dict[tuple[int, ...], int] = {tuple(base): -1}

    def put(order: list[int], spot: int) -> None:
        row = list(base)
        for pos, tok in zip(free, order, strict=True):
            row[pos] = tok
        rows.setdefault(tuple(row), spot)

    for a, i in enumerate(free):
        for v in top[i].tolist():
            row = list(base)
            row[i] = v
            rows.setdefault(tuple(row), i)
        for c, j in enumerate(free if reorder else ()):
            if a == c:
                continue
            if a < c:
                order = list(body)
                order[a], order[c] = order[c], order[a]
                put(order, i)
            order = list(body)
            order.insert(c, order.pop(a))
            put(order, j)
            for v in top[i, :shift_k].tolist():
                order = list(body)
                order.pop(c)
                order.insert(a, v)
                put(order, i)
    del rows[tuple(base)]
    if not rows:
        return q.new_empty((0, len(base))), q.new_empty(0)
    return (torch.tensor(list(rows), dtype=q.dtype, device=q.device),
            torch.tensor(list(rows.values()), dtype=torch.long, device=q.device))


class SpanSearch(Attack):
    """Registered attack ``"span_search"``: token sequences whose layer inputs fall into a gradient's span.

    Works on the weight gradient of any tapped ``nn.Linear`` inside the encoder (attention
    query/key/value/output, FFN), alone or with others; it uses the shallowest informative one
    (rank below its input size), preferring layers past 0, whose additive embeddings
    :mod:`~leak_audit.attacks.text.span_check` handles exactly. Needs the model replica (it runs the model).

    Args:
        restarts: continuous restarts, optimised as one batch.
        steps: Adam steps of the continuous stage.
        lr: Adam learning rate (embedding units).
        pool_per_position: nearest tokens per position that enter the pool the perturbation rounds draw
            from (the descent ranks replacements over every allowed token).
        max_seconds: the attack's own time budget of one run, capped by the audit's deadline
            (:meth:`~leak_audit.attacks.base.AttackInput.budget`). The continuous stage gets the first half;
            the discrete descent checks the deadline between candidate chunks of at most
            :data:`SCORE_CHUNK` elements, so a run ends within one chunk (a fraction of a second on MiniLM)
            of it. When the audit's deadline is the earlier limit and time (the continuous stage's half,
            or the end) stopped a stage before its own rule (``steps``, no improving move,
            ``max_perturbations``) without an exact result, the run is ``timed_out`` and
            ``info["progress"]`` says how far each stage got.
        max_perturbations: perturb-and-descend rounds at most (a work bound: with a generous
            ``max_seconds`` the result depends only on the seed, not on the machine's speed).
        exact_tol: ``D`` below which the reconstruction is certified exact and the search stops.
        replace_k: replacement tokens ranked per position in a descent step (:data:`WIDEN` × more, twice,
            when no neighbour improves).
        shift_k: of those, how many a shift move may insert (see :func:`neighbours`).
        lookahead: the best ``lookahead`` moves of a step are each followed by every ranked replacement at
            the position they changed (ranked in the moved sequence), so a block shifted into place with the
            wrong token at its end still counts; ``0`` looks one move deep only.
        screen: the precision the descent scores its candidates in (:mod:`~leak_audit.attacks.precision`):
            ``"bfloat16"`` ranks them in bfloat16 and rescores the :data:`VERIFY` best in float32 before it
            accepts a move (``D`` and the exact certificate are always float32); ``"off"`` scores all in
            float32; ``"auto"`` screens when a timed bfloat16 forward is clearly faster on this machine.
            ``info["screen"]`` records the dtype used (``"unused"`` when ``"auto"`` never had to decide: the
            search scored no candidate, e.g. a seed certified at once).

    Measured (pretrained MiniLM, B=1, dropout off, layer 3's query alone, the 30 s default, 2 threads, a
    Xeon with native bfloat16): the first 8 CoLA dev sentences all exact, 4.2 s each; the first 64 SST-2 dev
    reviews (~25 tokens) ROUGE-1 0.923, 38 exact, 18.7 s each; with ``screen="off"`` (float32 throughout, what a
    CPU without bfloat16 units runs) 0.881 and 28 exact. ``benchmarks/README.md`` ("Screening in bfloat16") has
    the commands. A run that ends uncertified (``D`` above ``exact_tol``) on a gradient without noise, from a view
    without layer 0's weights, puts :data:`~leak_audit.attacks.gaps.SPAN_SEARCH_UNFINISHED` in
    ``info["lower_bound"]``: the private batch has ``D = 0`` there, so its metrics are a lower bound
    (:func:`~leak_audit.attacks.gaps.span_search_gap`).

    Raises:
        ValueError: a non-positive option (a negative ``lookahead``), or ``screen`` not one of
            ``"auto"``, ``"bfloat16"``, ``"off"``.
    """

    name = "span_search"
    cost = "search"
    uses = ("span_check", "token_bag")

    def __init__(
        self,
        restarts: int = 3,
        steps: int = 200,
        lr: float = 0.02,
        pool_per_position: int = 16,
        max_seconds: float = 30.0,
        exact_tol: float = 1e-4,
        max_perturbations: int = 64,
        replace_k: int = 8,
        shift_k: int = 1,
        lookahead: int = 16,
        screen: str = "auto",
    ) -> None:
        for key, value in dict(restarts=restarts, steps=steps, lr=lr, pool_per_position=pool_per_position,
                               max_seconds=max_seconds, exact_tol=exact_tol,
                               max_perturbations=max_perturbations, replace_k=replace_k,
                               shift_k=shift_k).items():
            if value <= 0:
                raise ValueError(f"{key} must be > 0, got {value!r}")
        self.restarts = restarts
        self.steps = steps
        self.lr = lr
        self.pool_per_position = pool_per_position
        self.max_seconds = max_seconds
        self.exact_tol = exact_tol
        self.max_perturbations = max_perturbations
        self.replace_k = replace_k
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead!r}")
        if screen not in SCREEN_CHOICES:
            raise ValueError(f"screen must be one of {SCREEN_CHOICES}, got {screen!r}")
        self.screen = screen
        self.shift_k = shift_k
        self.lookahead = lookahead

    @staticmethod
    def _candidates(spec: TextModelSpec, tapped: Collection[str]) -> list[tuple[int, str]]:
        """(layer index, weight name) of tapped linear weights inside the encoder, shallowest first."""
        out = []
        for i, layer in enumerate(spec.layers):
            for name in sorted(tapped):
                if name in layer.linear_weights:
                    out.append((i, name))
        # layer 0's query/key/value see the additive embeddings: span_check is exact there, so last resort
        first = set(spec.layers[0].input_projections) if spec.layers else set()
        return sorted(out, key=lambda t: (t[1] in first, t[0]))

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        require_encoder(spec)
        cands = self._candidates(spec, tapped)
        if not cands:
            raise NotApplicable("needs the weight gradient of a linear module inside an encoder layer; none is tapped")
        return Requirements(gradients=frozenset(n for _, n in cands), params=frozenset(spec.embedding_params),
                            replica=True)

    def run(self, inp: AttackInput) -> Reconstruction:
        if inp.replica is None:
            raise NotApplicable("span_search runs the model, but no model replica was given")
        budget = inp.budget(self.max_seconds)
        deadline = budget.deadline
        spec, replica, params = inp.spec, inp.replica, inp.params
        weight, basis = None, None
        for _, name in self._candidates(spec, inp.gradients.keys()):
            grad = inp.gradients.get(name)
            if grad is None or grad.dim() != 2 or not bool(grad.any()):
                continue
            v, _ = span_basis([grad], noise_std=inp.noise_std)
            if 0 < v.shape[1] < grad.shape[1] - 1:  # informative: rank below the input size
                weight, basis = name, v.to(torch.float32)
                break
        if weight is None or basis is None:
            if inp.noise_std > 0:
                return Reconstruction(attack=self.name, sequences=[], info={"rank": 0, "below_noise_floor": 1})
            raise NotApplicable("no tapped linear weight gradient has rank below its input size")
        module = weight.rsplit(".", 1)[0]
        if module.endswith(".base_layer"):
            module = module[: -len(".base_layer")]
        rank = basis.shape[1]
        bsz = max(1, inp.batch_size)
        table = replica.input_embeddings(params).detach().float()
        dev = table.device  # token ids live with the model's tensors
        special = torch.tensor(sorted(spec.special_token_ids), dtype=torch.long, device=dev)
        cls_id, sep_id = spec.cls_token_id, spec.sep_token_id
        gen = inp.generator if inp.generator is not None else torch.Generator().manual_seed(0)

        def inputs_of(
            ids: Tensor | None = None, embeds: Tensor | None = None, values: Mapping[str, Tensor] = params
        ) -> Tensor:
            with torch.set_grad_enabled(embeds is not None and embeds.requires_grad):
                return module_inputs(replica, values, [module], input_ids=ids, inputs_embeds=embeds)[module]

        # screening: rank a step's candidates in bfloat16 where that is faster here (precision.py)
        cast: dict[torch.dtype, Mapping[str, Tensor]] = {torch.float32: params}

        def probe_run(dtype: torch.dtype) -> Tensor:
            width = max(2, rank // bsz)
            probe = torch.randint(table.shape[0], (max(1, SCORE_TOKENS // width), width),
                                  generator=torch.Generator().manual_seed(0)).to(dev)
            if dtype not in cast:
                cast[dtype] = cast_floating(params, dtype)
            return inputs_of(probe, values=cast[dtype])

        # "auto" is timed at the first screened score, so a seed certified at once costs no timing
        chosen: dict[str, torch.dtype | None] = {} if self.screen == "auto" else {
            "dtype": screening_dtype(self.screen, probe_run)}  # "off"/"bfloat16": probe_run is not called

        def screen_values() -> Mapping[str, Tensor] | None:
            """The parameters in the screening dtype, or ``None`` when candidates are scored in float32."""
            if "dtype" not in chosen:
                chosen["dtype"] = screening_dtype(self.screen, probe_run)
            dtype = chosen["dtype"]
            if dtype is not None and dtype not in cast:
                cast[dtype] = cast_floating(params, dtype)
            return None if dtype is None else cast[dtype]

        # A batch hypothesis is a list of B 1-D token tensors (lengths may differ); states are cached per
        # sequence so a move re-runs only the sequence it changes.
        def states(seqs: list[Tensor]) -> list[Tensor]:
            out: list[Tensor | None] = [None] * len(seqs)
            by_length: dict[int, list[int]] = {}
            for j, q in enumerate(seqs):
                by_length.setdefault(len(q), []).append(j)
            for group in by_length.values():  # sequences of one length in one forward (no padding)
                x = inputs_of(torch.stack([seqs[j] for j in group]))
                for j, xj in zip(group, x, strict=True):
                    out[j] = xj
            return out  # type: ignore[return-value]

        def score_rows(cache: list[Tensor], b: int, rows: Tensor, screened: bool = False) -> Tensor:
            """D of the batch with sequence ``b`` replaced by each row of ``rows`` ``[K, L_b]``: ``[K']``, scored
            in chunks of at most :data:`SCORE_CHUNK` elements (``screened``: in the screening dtype, when there is
            one); past the deadline it stops after the chunk in hand (``K' ≤ K``: the scores of the first ``K'``
            rows)."""
            low = screen_values() if screened else None
            values = low if low is not None else params
            others = [c for j, c in enumerate(cache) if j != b]
            rest = torch.cat(others) if others else None
            inputs = rows.shape[1] + (rest.shape[0] if rest is not None else 0)
            per = max(1, min(SCORE_CHUNK // (inputs * basis.shape[0]), SCORE_TOKENS // rows.shape[1]))
            out = []
            for lo in range(0, rows.shape[0], per):
                if lo and late(deadline):
                    break
                x = inputs_of(rows[lo : lo + per], values=values).float()  # [k, L_b, d]
                if rest is not None:
                    x = torch.cat([x, rest[None].expand(x.shape[0], -1, -1)], dim=1)
                out.append(span_distance(x, basis))
            return torch.cat(out)

        def settle(cache: list[Tensor], b: int, rows: Tensor, s: Tensor) -> tuple[int, Tensor]:
            """The best of ``rows`` by screened scores ``s``: without screening ``s``'s argmin; with it, the
            :data:`VERIFY` lowest rescored in float32. Returns (row index, its float32 ``D``)."""
            if screen_values() is None:
                j = int(s.argmin())
                return j, s[j]
            pick = s.topk(min(VERIFY, len(s)), largest=False).indices
            exact = score_rows(cache, b, rows[pick])
            k = int(exact.argmin())
            return int(pick[k]), exact[k]

        def total(cache: list[Tensor]) -> Tensor:
            return span_distance(torch.cat(cache)[None], basis)[0]

        allowed = torch.ones(table.shape[0], dtype=torch.bool, device=dev)
        allowed[special] = False
        bag = inp.priors.get("token_bag")
        if bag is not None and bag.token_bag:
            allowed = torch.zeros_like(allowed)
            allowed[torch.tensor(bag.token_bag, device=dev)] = True
            allowed[special] = False
        allowed_ids = allowed.nonzero().flatten()

        # a seed from span_check whose total length matches the rank (one input per token)
        seeded, current, best = 0, None, torch.tensor(float("inf"), device=dev)
        prior = inp.priors.get("span_check")
        if prior is not None and prior.sequences and len(prior.sequences) == bsz:
            if sum(len(q) for q in prior.sequences) == rank and min(len(q) for q in prior.sequences) >= 2:
                current = [torch.tensor(q, dtype=torch.long, device=dev) for q in prior.sequences]
                best, seeded = total(states(current)), 1
        steps = 0
        pool = allowed_ids
        timed = False  # time (the continuous stage's half of the budget, or the deadline) ended a stage
        if current is None:
            # 1. continuous relaxation with equal lengths, restarts as one batch
            length = max(3, rank // bsz)
            r = self.restarts
            init = allowed_ids[torch.randint(len(allowed_ids), (r, bsz, length), generator=gen)]
            fixed = torch.zeros(length, dtype=torch.bool, device=dev)
            if cls_id is not None:
                init[..., 0], fixed[0] = cls_id, True
            if sep_id is not None:
                init[..., -1], fixed[-1] = sep_id, True
            emb = table[init].reshape(r * bsz, length, -1).clone().requires_grad_(True)
            opt = torch.optim.Adam([emb], lr=self.lr)
            loss = torch.zeros(r, device=dev)
            for steps in range(1, self.steps + 1):
                with torch.enable_grad():
                    x = inputs_of(embeds=emb).reshape(r, bsz * length, -1)
                    loss = span_distance(x, basis)
                    opt.zero_grad()
                    loss.sum().backward()
                emb.grad[:, fixed] = 0
                opt.step()
                if steps < self.steps and late(budget.fraction(0.5)):
                    timed = True
                    break
            emb = emb.detach().reshape(r, bsz, length, -1)[int(loss.detach().argmin())]
            # 2. projection to tokens and the candidate pool
            sims = F.normalize(emb, dim=-1) @ F.normalize(table[allowed_ids], dim=-1).T  # [B, L, |allowed|]
            top = allowed_ids[sims.topk(min(self.pool_per_position, len(allowed_ids)), dim=-1).indices]
            start = top[..., 0].clone()
            start[:, fixed] = init[0][:, fixed]
            pool = torch.unique(top[:, ~fixed].flatten())
            current = list(start)
            best = total(states(current))
        elif bag is None or not bag.token_bag:
            pool = torch.unique(torch.cat(current))
            pool = pool[~torch.isin(pool, special)]

        # 3. variable-neighbourhood descent (see the module docstring), then perturb-and-descend
        def free_of(q: Tensor) -> list[int]:
            return [i for i in range(len(q)) if not (i == 0 and q[0] == cls_id) and not (i == len(q) - 1 and q[i] == sep_id)]

        sweeps = restarts_done = 0

        def ranked(cache: list[Tensor], b: int, rows: Tensor, k: int) -> Tensor:
            """``[K, L_b, k]`` tokens that most lower ``D`` to first order at each position when sequence ``b`` is
            each of ``rows`` ``[K, L_b]`` (HotFlip's linearisation, Ebrahimi et al. 2018, as GCG ranks
            tokens, Zou et al. 2023), among the allowed ones."""
            emb = table[rows].clone().requires_grad_(True)
            with torch.enable_grad():
                x = inputs_of(embeds=emb)
                rest = [c for j, c in enumerate(cache) if j != b]
                if rest:
                    x = torch.cat([x, torch.cat(rest)[None].expand(x.shape[0], -1, -1)], dim=1)
                span_distance(x, basis).sum().backward()
            g = emb.grad  # [K, L_b, d]
            assert g is not None
            gain = g @ table.T - (g * table[rows]).sum(-1, keepdim=True)  # [K, L_b, V]
            gain[..., ~allowed] = float("inf")
            return gain.topk(min(k, len(allowed_ids)), dim=-1, largest=False).indices

        def descend(seqs: list[Tensor], value: Tensor) -> tuple[list[Tensor], Tensor]:
            nonlocal sweeps, timed
            seqs = [q.clone() for q in seqs]
            if float(value) <= self.exact_tol:
                return seqs, value
            if late(deadline):
                timed = True
                return seqs, value
            cache = states(seqs)
            level = 0  # 0: replacements only; 1: every move; 2, 3: WIDEN×, WIDEN²× more ranked tokens
            while float(value) > self.exact_tol:
                if late(deadline):
                    timed = True
                    break
                sweeps += 1
                improved = False
                for b in range(bsz):
                    free = free_of(seqs[b])
                    if not free:
                        continue
                    k = self.replace_k * WIDEN ** max(0, level - 1)
                    top = ranked(cache, b, seqs[b][None], k)[0]
                    rows, spots = neighbours(seqs[b], free, top, self.shift_k * (1 if level < 2 else WIDEN), level > 0)
                    if not len(rows):
                        continue
                    s = score_rows(cache, b, rows, screened=True)
                    rows = rows[: len(s)]
                    if level and self.lookahead and not late(deadline):
                        # two moves deep: re-rank the spot the m best moves changed, in their new context
                        pick = s.topk(min(self.lookahead, len(s)), largest=False).indices
                        picked, where = rows[pick], spots[pick]
                        tokens = ranked(cache, b, picked, k)[torch.arange(len(pick)), where]  # [m, k]
                        deeper = picked[:, None].repeat(1, tokens.shape[1], 1)
                        m, kk = torch.arange(len(pick))[:, None], torch.arange(tokens.shape[1])[None]
                        deeper[m, kk, where[:, None]] = tokens
                        deeper = deeper.flatten(0, 1)
                        s = torch.cat([s, score_rows(cache, b, deeper, screened=True)])
                        rows = torch.cat([rows, deeper])[: len(s)]
                    j, d = settle(cache, b, rows, s)
                    if d < value - 1e-9:
                        seqs[b], value, improved = rows[j].clone(), d, True
                        cache[b] = inputs_of(seqs[b][None])[0]
                    if float(value) <= self.exact_tol:
                        return seqs, value
                    if late(deadline):
                        timed = True
                        return seqs, value
                if improved:
                    level = 0
                elif level < 3:
                    level += 1  # stuck: every move, then more ranked tokens, before counting a local minimum
                else:
                    break
            return seqs, value

        current, best = descend(current, best)
        while float(best) > self.exact_tol and restarts_done < self.max_perturbations:
            if late(deadline):
                timed = True
                break
            restarts_done += 1
            trial = [q.clone() for q in current]
            for _ in range(2):
                b = int(torch.randint(bsz, (1,), generator=gen))
                free = free_of(trial[b])
                if free:
                    i = free[int(torch.randint(len(free), (1,), generator=gen))]
                    trial[b][i] = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            trial, value = descend(trial, total(states(trial)))
            if value < best:
                current, best = trial, value
        length = max(len(q) for q in current)
        exact = float(best) <= self.exact_tol
        gap = span_search_gap(spec, inp.gradients.keys(), exact, inp.noise_std)
        timed_out = timed and budget.audit_bound and not exact
        progress = (
            (f"continuous stage {steps} of {self.steps} steps" if not seeded else "seeded by span_check")
            + f", {sweeps} descent sweeps, {restarts_done} of {self.max_perturbations} perturbations"
            + f"; D = {float(best):.3g}"
        )
        return Reconstruction(
            attack=self.name,
            sequences=[q.tolist() for q in current],
            timed_out=timed_out,
            info={
                **({"progress": progress} if timed_out else {}),
                "module": module,
                "rank": rank,
                "length": length,
                "distance": round(float(best), 6),
                "exact": int(exact),
                "steps": steps,
                "pool": int(pool.numel()),
                "sweeps": sweeps,
                "perturbations": restarts_done,
                "seeded": seeded,
                "screen": str(chosen["dtype"] or torch.float32).removeprefix("torch.") if chosen else "unused",
                **({LOWER_BOUND: gap} if gap else {}),
            },
        )
