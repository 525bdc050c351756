"""Span clustering: group a batch's tokens into sentences from one attention query gradient (B > 1).

With only layer 0's ``attention.self.query`` weight gradient tapped (0.65% of MiniLM's parameters),
DAGER's span check (:mod:`leak_audit.attacks.text.span_check`) finds the batch's tokens and positions, but at
``B > 1`` nearly every token of the batch passes at every occupied position: the inputs
``x = LN(E[v] + P[i] + T)`` are affine in ``(E[v], P[i])`` after LayerNorm's centring, so the span of the
batch's inputs is the span of its *tokens and positions*, not of its (token, position) pairs. Which
tokens form one sentence is still in the gradient, through three facts:

1. **Per-token query gradients.** ``∂L/∂W_q = Σ_t δq_t x_tᵀ`` and ``x_t = A a_t`` with
   ``A = [γ⊙C(E[v]) for v in the bag, γ⊙C(P[i] + T[s]) for each position, β]`` (``C`` centres,
   ``a_t = (e_v + e_i)/σ_t + e_β``). ``A`` has full column rank, so ``H = ∂L/∂W_q · A (AᵀA)⁻¹`` is exact
   and its column for token ``v`` is ``s_v = Σ_{t: token v} δq_t / σ_t`` (measured relative error ≤ 3e-6
   on MiniLM at B=16). For a token that occurs once, ``s_v`` is its own query gradient up to scale.
2. **A query gradient lies in its sentence's key span.** Per head ``h``, ``δq_t^h = Σ_j g_tj k_j^h / √d_h``
   over the positions ``j`` of ``t``'s own sentence with ``Σ_j g_tj = 0`` (softmax), so ``s_v^h`` lies in
   ``W_k^h · span{A-columns of the sentence's tokens and positions}``: a subspace of ``R^{d_h}`` of
   dimension ``≤ |tokens| + n + 1``, the same support in all heads. Measured on MiniLM (B=4 CoLA): the
   true sentence leaves a relative squared residual ≤ 5e-14, any other sentence ≥ 1.7e-2.
3. **Group sparsity finds the sentence.** A reweighted group lasso (Candès, Wakin & Boyd 2008; one group
   per token atom across the heads) over the batch's token atoms recovers, for each token, tokens of its
   own sentence with no false member in our measurements; the resulting token-to-token affinity is
   clustered into ``B`` sentences by spectral clustering (Ng, Jordan & Weiss 2001).

Tokens that occur in several sentences (``the``, ``.``) have a mixed ``s_v``; they are detected by the
exact residual test (fact 2) and added to every sentence whose members put weight on them. Word order
within a sentence comes from the span check's per-position candidates (a linear assignment); counts of a
token repeated inside one sentence are not recovered. The exact test needs
``|tokens| + n + 1 < d_h`` (32 on MiniLM: sentences up to ~15 tokens); longer sentences keep their
clustering membership untested.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements, require_encoder
from leak_audit.attacks.text.assignment_descent import complete
from leak_audit.attacks.text.key_span_search import search_sentences
from leak_audit.attacks.text.pair_pursuit import pair_pursuit
from leak_audit.attacks.text.peeling import Proposal, batched_logit_factors, logit_gradients, peel
from leak_audit.attacks.text.query_columns import additive_atoms, token_query_gradients
from leak_audit.attacks.lasso import group_lasso
from leak_audit.attacks.spans import span_basis
from leak_audit.attacks.text.span_check import span_check
from leak_audit.attacks.text.word_order import RESTARTS, order_sentence
from leak_audit.models import EmbeddingTables, TextModelSpec

__all__ = [
    "SpanCluster",
    "SpanClusterResult",
    "span_cluster",
    "spectral_clusters",
    "token_query_gradients",
]

QUICK_RESTARTS = 12
"""Random starts of the key-span search tried before the assignment descent, after peeling's proposal."""

QUICK_SHARE = 0.15
"""The share of the time left that those starts may take."""


def spectral_clusters(affinity: Tensor, k: int, seed: int = 0, restarts: int = 10) -> list[int]:
    """Spectral clustering (Ng, Jordan & Weiss 2001) of a symmetric non-negative affinity ``[n, n]`` into ``k``.

    k-means (``scipy.cluster.vq.kmeans2``, k-means++ starts, best of ``restarts``) on the row-normalised
    ``k`` leading eigenvectors of ``D^-½ A D^-½``. Returns a label per row.
    """
    from scipy.cluster.vq import kmeans2

    n = affinity.shape[0]
    k = max(1, min(k, n))
    if k == 1:
        return [0] * n
    deg = affinity.sum(1).clamp_min(1e-12)
    norm = affinity / torch.outer(deg.sqrt(), deg.sqrt())
    _, vecs = torch.linalg.eigh(norm)
    u = vecs[:, -k:]
    u = (u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy()
    best: tuple[float, list[int]] | None = None
    for r in range(restarts):
        cent, lab = kmeans2(u, k, minit="++", seed=seed + r)
        inertia = float(((u - cent[lab]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, [int(x) for x in lab])
    assert best is not None
    return best[1]


@dataclass
class SpanClusterResult:
    """Output of :func:`span_cluster`.

    Attributes:
        sequences: one token-id sequence per sentence found (``[CLS]`` … ``[SEP]``).
        token_sets: the sentences' token sets (before ordering).
        tested: per sentence, whether every member passed the exact span test (fact 2).
        shared: tokens found to occur in several sentences.
        bag: the batch's tokens; ``length`` the longest sentence's length.
        cut_short: the deadline cut a stage short (the group lasso, the reassignment rounds or a word-order
            search): the sentences are those reached so far.
        progress: the stages the deadline cut, comma-separated (e.g. ``"group lasso, word order"``; empty
            when none was).
    """

    sequences: list[list[int]]
    token_sets: list[set[int]]
    tested: list[bool]
    shared: list[int]
    bag: list[int]
    length: int
    rank: int
    info: dict[str, float] = field(default_factory=dict)
    cut_short: bool = False
    progress: str = ""


def _relres(target: Tensor, atoms: Tensor) -> float:
    """Relative squared residual of ``target`` ``[H, d_h]`` outside ``span(atoms)`` per head (``[s, H, d_h]``)."""
    d = atoms.permute(1, 2, 0)
    sol = torch.linalg.lstsq(d, target[..., None]).solution
    r = target - (d @ sol)[..., 0]
    return float(r.square().sum() / target.square().sum().clamp_min(1e-300))


def span_cluster(
    grad: Tensor,
    key_weight: Tensor,
    heads: int,
    tables: EmbeddingTables,
    candidates: Sequence[Sequence[int]],
    batch_size: int,
    *,
    segment: int = 0,
    structural: Collection[int] = (),
    cls_token_id: int | None = None,
    sep_token_id: int | None = None,
    support: float = 0.01,
    test_tol: float = 1e-6,
    margin: int = 2,
    refine: int = 3,
    seed: int = 0,
    deadline: float | None = None,
    restarts: int = RESTARTS,
) -> SpanClusterResult:
    """Group the tokens of a batch into sentences from layer 0's query weight gradient.

    Args:
        grad: ``[d, d]`` gradient of layer 0's ``attention.self.query`` weight (exact, dropout off).
        key_weight: ``[d, d]`` layer 0's ``attention.self.key`` weight; ``heads``: attention heads.
        tables: embedding tables and LayerNorm at the audited step.
        candidates: per position, the token ids the span check found there (its union is the bag).
        batch_size: ``B``, the number of sentences.
        segment: token-type id of the batch.
        structural: tokens in every sentence (``[CLS]``, ``[SEP]``): never clustered, added to each.
        support: a token is in an anchor's support when its group-lasso score is above this share of
            the anchor's largest score.
        test_tol: the exact span test passes below this relative squared residual (true sentences
            ≤ 5e-14 on MiniLM, other sentences ≥ 1.7e-2).
        margin: the test is informative when ``|tokens| + n + 1 ≤ d_h − margin``.
        refine: rounds of reassignment by the exact test.
        seed: k-means seed.
        deadline: ``time.monotonic()`` value after which the group lasso, the reassignment rounds and the
            word-order searches stop at their best so far (the result then has ``cut_short`` set; the
            remaining steps are cheap: clustering, and word order by assignment only).
        restarts: perturbed restarts of each cluster's word-order search (:func:`order_sentence`). Peeling
            passes 0: it certifies the clusters that come out exact and clusters the rest again, and at ``B = 16``
            most clusters merge several sentences, whose restarts were half of a round's time (CoLA dev 48-63:
            the sentences' own sets came out exact from the first start, 2 of 2; ordering took 20 of each round's
            23 s; benchmarks/README.md, "One start per cluster").

    Returns:
        A :class:`SpanClusterResult`.

    Raises:
        NotApplicable: no candidates, or a gradient not explained by the bag's tokens and positions
            (training-mode gradient, or a batch past the rank limit).
    """
    length = len(candidates)
    bag = sorted({int(t) for c in candidates for t in c})
    if not bag or length == 0:
        raise NotApplicable("the span check found no tokens")
    d = grad.shape[1]
    dh = d // heads
    atoms = additive_atoms(tables, bag, length, segment)
    if atoms.shape[1] >= d - 8:
        raise NotApplicable(
            f"{len(bag)} tokens and {length} positions span {atoms.shape[1]} of {d} dimensions: past the span "
            "methods' physical limit"
        )
    h = token_query_gradients(grad, atoms)
    fit = float((grad.double() - h @ atoms.T).norm() / grad.double().norm().clamp_min(1e-300))
    if fit > 1e-4:
        raise NotApplicable(
            f"the query gradient is not spanned by the bag's tokens and positions (residual {fit:.1e}): "
            "a training-mode (dropout) gradient or an incomplete bag"
        )
    nb = len(bag)
    keys = (atoms.T @ key_weight.detach().double().T).view(-1, heads, dh)  # [m, H, d_h]
    keys_unit = keys / keys.norm(dim=(1, 2), keepdim=True).clamp_min(1e-300)
    structural = {int(t) for t in structural} & set(bag)
    anchors = [j for j, v in enumerate(bag) if v not in structural]
    col = {v: j for j, v in enumerate(bag)}
    if not anchors:
        raise NotApplicable("the batch has only structural tokens")
    targets = h[:, anchors].T.reshape(len(anchors), heads, dh)
    targets = targets / targets.norm(dim=(1, 2), keepdim=True).clamp_min(1e-300)
    penalty = torch.ones(keys.shape[0], dtype=torch.float64, device=keys.device)
    penalty[-1] = 0.0  # β: every input carries it
    cut: list[str] = []  # the stages the deadline cut
    # reweighted group lasso (fact 3): 3 rounds of 300 FISTA steps, λ = 0.02 of the all-zero value
    scores, lasso_cut = group_lasso(
        targets, keys_unit, penalty=penalty, lam=0.02, iterations=300, rounds=3, eps=1e-3, deadline=deadline
    )
    scores = scores[:, :nb]
    if lasso_cut:
        cut.append("group lasso")
    scores = scores / scores.max(1, keepdim=True).values.clamp_min(1e-300)
    # token-to-token affinity among anchors, symmetrised
    aff = scores[:, anchors].clone()
    aff.fill_diagonal_(0)
    aff = aff + aff.T
    k = min(batch_size, len(anchors))
    labels = spectral_clusters(aff, k, seed=seed)
    supports = [{bag[j] for j in (scores[a] > support).nonzero().flatten().tolist()} for a in range(len(anchors))]

    def sets_of(lab: list[int], shared: set[int]) -> list[set[int]]:
        out: list[set[int]] = [set(structural) for _ in range(k)]
        for a, c in enumerate(lab):
            if a in shared or c < 0:
                continue
            out[c] |= {bag[anchors[a]]} | supports[a]
        return out

    shared: set[int] = set()
    tested = [False] * k
    for _ in range(refine):
        if late(deadline):
            cut.append("reassignment")
            break
        sets = sets_of(labels, shared)
        new_labels, new_shared = list(labels), set()
        testable = [len(s) + min(len(s) + margin, length) + 1 <= dh - margin for s in sets]
        stopped = False
        for a in range(len(anchors)):
            if late(deadline):
                stopped = True
                break
            v = bag[anchors[a]]
            res = []
            for c, s in enumerate(sets):
                if not testable[c]:
                    res.append(float("nan"))
                    continue
                n = min(len(s | {v}) + margin, length)
                idx = [col[w] for w in s | {v}] + [nb + i for i in range(n)] + [keys.shape[0] - 1]
                res.append(_relres(targets[a], keys[idx]))
            ok = [c for c, r in enumerate(res) if r == r and r < test_tol]
            if ok:
                new_labels[a] = min(ok, key=lambda c: res[c])
            elif all(testable):
                new_shared.add(a)
        if stopped:  # this round's reassignment is incomplete: keep the previous one
            cut.append("reassignment")
            break
        tested = [
            testable[c] and all(a not in new_shared for a, lab in enumerate(new_labels) if lab == c) for c in range(k)
        ]
        if new_labels == labels and new_shared == shared:
            break
        labels, shared = new_labels, new_shared
    wk = key_weight.detach().double()

    def key_inputs(tok: Tensor, pos: Tensor) -> Tensor:
        return tables.pair_inputs(tok, pos, segment) @ wk.T

    final = sets_of(labels, shared)
    kept = [c for c, s in enumerate(final) if s - set(structural)]
    sets, sequences = [final[c] for c in kept], []
    for c in kept:
        mem = [a for a, lab in enumerate(labels) if lab == c and a not in shared]
        seq, _, order_cut = order_sentence(
            final[c], targets[mem], key_inputs, heads, cls_token_id=cls_token_id, sep_token_id=sep_token_id,
            restarts=restarts, generator=torch.Generator().manual_seed(seed + c), deadline=deadline,
        )
        if order_cut and "word order" not in cut:
            cut.append("word order")
        sequences.append(seq)
    return SpanClusterResult(
        sequences=sequences,
        token_sets=sets,
        tested=[tested[c] for c in kept],
        shared=sorted(bag[anchors[a]] for a in shared),
        bag=bag,
        length=length,
        rank=int(span_basis([grad])[0].shape[1]),
        info={"fit": fit, "anchors": float(len(anchors))},
        cut_short=bool(cut),
        progress=", ".join(cut),
    )


class SpanCluster(Attack):
    """Registered attack ``"span_cluster"``: sentences from layer 0's query gradient alone (B > 1).

    Needs the weight gradient of layer 0's ``attention.self.query`` (the ``linear:…layer.0…query`` view,
    and any view containing it) plus the embedding tables and layer 0's key weight. Uses the span check's
    per-position candidates when ``span_check`` ran first, otherwise runs it. Exact (dropout-off)
    gradients only. At ``B = 1`` the span check's sentence is the proposal. When ``span_attention`` ran first
    and certified all ``B`` sentences (the full view), there is nothing left to find: it raises
    :class:`~leak_audit.attacks.base.NotApplicable` (a ``skipped`` record) and costs nothing.

    With ``peel=True`` (default) it also needs the model (``Requirements.replica``): every proposed
    sentence is certified by its exact gradient and subtracted, and the rest of the batch is attacked
    again (:func:`~leak_audit.attacks.text.peeling.peel`); certified sentences come first, and when all ``B``
    are certified their labels are returned aligned. Without a replica it returns the first proposal.
    ``info``: ``clusters``, ``length``, ``certified`` and ``rounds``.

    Budget: no time limit of its own. The audit's deadline is passed to every stage (the span check, the
    group lasso, the reassignment rounds, the word-order searches, the peeling rounds, the assignment descent
    and their certificates), each of which stops at it with its best so far. Cut short by it, the attack returns the
    certified sentences and the last proposal with ``timed_out`` set and ``info["progress"]`` (e.g.
    ``"1 of 4 sentences certified in 2 peeling rounds; the deadline cut the word order"``).

    Args:
        support: group-lasso support threshold (share of an anchor's largest score).
        test_tol: tolerance of the exact span test.
        peel: certify and peel sentences with the model (needs the auditor's model replica).
        pairs: while at most this many sentences are left (0: never), propose first the sentences of the pair
            pursuit (:mod:`~leak_audit.attacks.text.pair_pursuit`: whole sentences in order from the position
            columns and per-token key spans, certified through their anchors); the clustering proposes only
            when it finds none; above it the clustering proposes first and peeling brings the batch down to
            it. Measured on CoLA B = 16 (four batches, no time bound): exact sentences 16 of 64 with ``0``,
            23 with ``8``, 38 with ``16``.
        beam: width of the pair pursuit's second try for an anchor its greedy search leaves open (1: none).
        descent: when a peeling round certifies nothing with two or more sentences left, place their tokens by
            the row space of the gradient left and assign them by the certificate
            (:mod:`~leak_audit.attacks.text.assignment_descent`; on SST-2 B = 4, 2 CPU cores, the open pairs fit a
            30 s audit budget, three open sentences need up to 90 s, and it gives up at once on four long ones:
            benchmarks/README.md, "Which audits of this view are lower bounds").
        key_search: with ``descent``, search single sentences whose tokens' query gradients lie in their own key
            span (:mod:`~leak_audit.attacks.text.key_span_search`) for peeling to certify: from the proposal and
            :data:`QUICK_RESTARTS` random starts before the assignment descent, and from 24 more when placement
            gives up. With it SST-2 at B = 4 and a 60 s budget reads all 16 batches whole (ROUGE-1 1.000; 0.914
            without; 2 CPU cores; benchmarks/README.md, "What is left on SST-2 B = 4").

    Raises:
        ValueError: ``support`` or ``test_tol`` outside ``(0, 1)``, ``pairs < 0`` or ``beam < 1``.
    """

    name = "span_cluster"
    uses = ("span_attention", "span_check", "token_bag")
    cost = "search"

    def __init__(
        self,
        support: float = 0.01,
        test_tol: float = 1e-6,
        peel: bool = True,
        pairs: int = 16,
        beam: int = 6,
        descent: bool = True,
        key_search: bool = True,
    ) -> None:
        if not 0 < support < 1:
            raise ValueError(f"support must be in (0, 1), got {support}")
        if not 0 < test_tol < 1:
            raise ValueError(f"test_tol must be in (0, 1), got {test_tol}")
        self.support = support
        self.test_tol = test_tol
        self.peel = bool(peel)
        if pairs < 0:
            raise ValueError(f"pairs must be >= 0 (0: never), got {pairs}")
        self.pairs = int(pairs)
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        self.beam = int(beam)
        self.descent = bool(descent)
        self.key_search = bool(key_search)

    @staticmethod
    def _key(spec: TextModelSpec) -> str:
        return spec.layers[0].key

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        require_encoder(spec)
        if not spec.layers:
            raise NotApplicable("the model has no encoder layers")
        query = spec.layers[0].query
        if query not in tapped:
            raise NotApplicable(f"needs the weight gradient of layer 0's attention query ({query!r}); it is not tapped")
        if spec.num_heads < 1:
            raise NotApplicable("the model's number of attention heads is unknown")
        extra = [spec.token_type_embeddings] if spec.token_type_embeddings in tapped else []
        return Requirements(
            gradients=frozenset([query, *extra]),
            params=frozenset([*spec.embedding_params, self._key(spec)]),
            replica=self.peel,
        )

    def run(self, inp: AttackInput) -> Reconstruction:
        if inp.noise_std > 0:
            raise NotApplicable(
                f"its exact certificates need noise-free gradients; these carry DP noise (std {inp.noise_std:.3g} "
                "per coordinate): span_check, token_bag, labels and gradient_matching rank candidates under noise"
            )
        done = inp.priors.get("span_attention")
        if done is not None and done.sequences is not None and len(done.sequences) == inp.batch_size:
            raise NotApplicable(f"span_attention already certified all {inp.batch_size} sentences of this batch")
        budget = inp.budget()
        deadline = budget.deadline
        cut: list[str] = []  # what the deadline cut, in order
        spec = inp.spec
        grad = inp.gradients[spec.layers[0].query]
        tables = EmbeddingTables.from_params(inp.params, spec)
        prior = inp.priors.get("span_check")
        if prior is not None and prior.position_candidates:
            candidates = prior.position_candidates
            base = prior.sequences
        else:
            bag = inp.priors.get("token_bag")
            vocab = torch.tensor(bag.token_bag, dtype=torch.long) if bag is not None and bag.token_bag else None
            found = span_check(
                [grad], tables, inp.batch_size, sep_token_id=spec.sep_token_id, deadline=deadline, vocabulary=vocab
            )
            candidates = [[t for t, _, _ in c] for c in found.candidates]
            base = found.sequences
            if found.cut_short:  # the tokens are incomplete: no clustering on them
                return Reconstruction(
                    attack=self.name, sequences=base, timed_out=budget.audit_bound,
                    info={"progress": f"span check: {found.progress}", "clusters": 0, "length": found.length},
                )
        segment = 0
        tt = inp.gradients.get(spec.token_type_embeddings) if spec.token_type_embeddings else None
        if tt is not None and bool(tt.any()):
            segment = int(tt.abs().sum(1).nonzero().flatten()[0])
        structural = [t for t in (spec.cls_token_id, spec.sep_token_id) if t is not None]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=inp.generator)) if inp.generator is not None else 0
        key_weight = inp.params[self._key(spec)]

        peeling = self.peel and inp.replica is not None

        def propose(
            g: Tensor, b: int, cands: Sequence[Sequence[int]] | None = None, single: list[list[int]] | None = None
        ) -> Proposal:
            if cands is None:
                found = span_check([g], tables, b, sep_token_id=spec.sep_token_id, deadline=deadline)
                if found.cut_short:
                    cut.append("span check")
                    raise NotApplicable("the deadline cut the span check")  # ends the peeling rounds
                cands, single = [[t for t, _, _ in c] for c in found.candidates], found.sequences
            bag = sorted({int(t) for c in cands for t in c})
            if b == 1:
                seqs = [list(single[0])] if single else []
                return Proposal(seqs, bag, len(cands))
            if b <= self.pairs and spec.cls_token_id is not None and spec.sep_token_id is not None:
                with torch.no_grad():
                    pp = pair_pursuit(
                        g, key_weight, spec.num_heads, tables, bag, len(cands), segment=segment,
                        cls_token_id=spec.cls_token_id, sep_token_id=spec.sep_token_id, beam=self.beam,
                        deadline=deadline,
                    )
                if pp.cut_short and "pair pursuit" not in cut:
                    cut.append("pair pursuit")
                if pp.sequences and (peeling or len(pp.sequences) >= b):  # sentences in order, with their anchors
                    return Proposal(pp.sequences if peeling else pp.sequences[:b], bag, len(cands), members=pp.members)
            else:
                pp = None
            with torch.no_grad():
                res = span_cluster(
                    g, key_weight, spec.num_heads, tables, cands, b, segment=segment, structural=structural,
                    cls_token_id=spec.cls_token_id, sep_token_id=spec.sep_token_id, support=self.support,
                    test_tol=self.test_tol, seed=seed, deadline=deadline, restarts=0 if peeling else RESTARTS,
                )
            if res.cut_short:
                cut.extend(c for c in res.progress.split(", ") if c not in cut)
            if pp is not None and pp.sequences:  # no peeling: the pair pursuit's sentences, then other clusters
                explained = {v for m in pp.members for v in m}
                rest = [q for q in res.sequences if not explained & set(q)]
                return Proposal([*pp.sequences, *rest][:b], res.bag, res.length)
            return Proposal(res.sequences, res.bag, res.length)

        def finish(
            sequences: list[list[int]], certified: int | None = None, labels: list[int] | None = None
        ) -> Reconstruction:
            timed_out = bool(cut) and budget.audit_bound
            if timed_out:
                peeled_so_far = "" if certified is None else (
                    f"{certified} of {inp.batch_size} sentences certified in {info.get('rounds', 0)} peeling rounds; "
                )
                info["progress"] = f"{peeled_so_far}the deadline cut the {', '.join(cut)}"
            return Reconstruction(
                attack=self.name, sequences=sequences, token_bag=first.bag, labels=labels,
                labels_aligned=labels is not None, info=info, timed_out=timed_out,
            )

        first = propose(grad, inp.batch_size, candidates, base)
        info: dict[str, float | int | str] = {"clusters": len(first.sequences), "length": first.length}
        if not self.peel or inp.replica is None:
            return finish(first.sequences)
        replica = inp.replica
        name = spec.layers[0].query

        def split(g: Tensor, bag: Sequence[int], length: int) -> Tensor:
            return token_query_gradients(g, additive_atoms(tables, bag, length, segment))

        def contribution(s: list[int]) -> Tensor:
            return logit_gradients(replica, inp.params, name, s, segment=segment)

        def completion(g: Tensor, b: int, guesses: list[list[int]]) -> Proposal | None:
            if spec.cls_token_id is None or spec.sep_token_id is None:
                return None
            keyed = {"cls_token_id": spec.cls_token_id, "sep_token_id": spec.sep_token_id, "segment": segment}

            def by_key_span(restarts: int, share: float, seed: int, starts: list[list[int]]) -> Proposal | None:
                with torch.no_grad():
                    single = search_sentences(g, key_weight, spec.num_heads, tables, first.bag, first.length,
                                              starts=starts, restarts=restarts, seed=seed, share=share,
                                              deadline=deadline, **keyed)
                return None if not single else Proposal(
                    [s for s, _ in single], first.bag, first.length, members=[m for _, m in single])

            key_search = self.key_search and b > 1
            # a few key-span starts first: cheap where they find a sentence, and the assignment descent below can
            # take a minute on three long reviews that they read in a second
            quick = by_key_span(QUICK_RESTARTS, QUICK_SHARE, seed + 1, guesses) if key_search else None
            if quick is not None:
                return quick
            with torch.no_grad():
                found = complete(
                    g, b, tables, first.bag, first.length,
                    lambda ss: batched_logit_factors(replica, inp.params, name, ss, segment=segment),
                    start=guesses, deadline=deadline, **keyed,
                )
            if found is None and key_search and not late(deadline):
                # placement gave up: single sentences by their key span, for peeling to certify and take out
                single = by_key_span(24, 0.5, seed, [])  # the guesses were descended above
                if single is not None:
                    return single
            if late(deadline) and "assignment descent" not in cut:
                cut.append("assignment descent")
            return None if found is None else Proposal(found, first.bag, first.length)

        peeled = peel(
            grad, inp.batch_size, propose, contribution, split, first=first,
            complete=completion if self.descent else None, structural=structural, deadline=deadline,
        )
        info.update(certified=len(peeled.labels), rounds=peeled.rounds)
        if peeled.cut_short and "peeling" not in cut:
            cut.append("peeling")
        if not peeled.sequences:
            return finish(first.sequences, len(peeled.labels))
        done = len(peeled.labels) == inp.batch_size
        if done:
            cut.clear()  # every sentence certified: whatever was cut on the way, the result is complete
        return finish(peeled.sequences, len(peeled.labels), labels=peeled.labels if done else None)
