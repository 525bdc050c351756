"""Peeling: certify a recovered sentence by its exact gradient, subtract it, attack what is left.

A batch gradient is a sum over its sentences: with the loss a function of each sentence's logits (any
per-example loss, batch mean or sum), ``∂L/∂W = Σ_S Σ_c α_{S,c} J_{S,c}`` where
``J_{S,c} = ∂(z_c − z_0)/∂W`` is computed by one forward and ``C − 1`` backward passes of the model on
sentence ``S`` alone (``z`` its logits) and ``α_{S,c} = (p_c − y_c) / B`` is unknown. So a candidate
sentence can be *verified* against the observed gradient, and once verified *removed* from it exactly.

For first-layer weights the verification is local: :func:`~leak_audit.attacks.text.span_cluster.
token_query_gradients` splits a gradient into one column per bag token, and the column of a token that
occurs in ``S`` only (a *member*) is ``Σ_c α_{S,c}`` times the same column of ``J_{S,c}``, whatever the
other sentences are. Least squares gives ``α`` and a relative residual: measured on MiniLM's layer-0
query with real CoLA sentences (four B=4 batches: dev 0–3, 16–27), ≤ 2.1e-6 for the 16 true sentences,
≥ 0.16 for 112 adjacent-word swaps and ≥ 0.30 for 111 one-word replacements (medians 0.45 and 0.74),
so :data:`CERTIFY_TOL` = 1e-4 leaves four orders of magnitude on both sides.

:func:`peel` repeats *propose → certify → subtract*: each round the certified sentences leave the
gradient, the batch shrinks to ``B' = B − found``, tokens shared with peeled sentences become members of
the remaining ones, and at ``B' = 1`` the span check is exact. The signs of ``α`` give each certified
sentence's label (``y = argmin_c α_c`` if some ``α_c < 0``, else class 0).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.base import NotApplicable
from leak_audit.models.replica import ModelReplica

__all__ = [
    "CERTIFY_TOL",
    "PeelResult",
    "Proposal",
    "batched_logit_factors",
    "certify",
    "label_from_coefficients",
    "logit_gradients",
    "peel",
]

CERTIFY_TOL = 1e-4
"""Relative residual below which a sentence is certified (true ≤ 2.1e-6, one swap or wrong word ≥ 0.16 on MiniLM)."""


@dataclass(frozen=True)
class Proposal:
    """Candidate sentences for the gradient that is left, with the bag and length their columns use.

    ``members``, when given, names per sentence the tokens its certificate reads (tokens known to occur in
    that sentence only, e.g. the anchors whose query gradient its key span explained exactly); otherwise a
    sentence's members are its tokens that no other proposed sentence has.
    """

    sequences: list[list[int]]
    bag: list[int]
    length: int
    members: list[list[int]] | None = None


@dataclass
class PeelResult:
    """What :func:`peel` found.

    Attributes:
        sequences: certified sentences first (in the order found), then the uncertified ones of the last
            proposal (when the rounds end without certificates, by the deadline, or by ``NotApplicable``).
        labels: per certified sentence (the first ``len(labels)`` sequences), the label read from the
            signs of its coefficients.
        coefficients: per certified sentence, ``α`` ``[C − 1]``.
        residuals: per certified sentence, the certificate's relative residual.
        rounds: propose → certify rounds run.
        cut_short: the deadline stopped the rounds (or a round's certificates) with sentences left.
    """

    sequences: list[list[int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    coefficients: list[Tensor] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    rounds: int = 0
    cut_short: bool = False


def logit_gradients(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    name: str,
    sequence: Sequence[int],
    *,
    segment: int = 0,
) -> Tensor:
    """``∂(z_c − z_0)/∂W`` for ``c = 1..C−1`` of parameter ``name`` on one sentence: ``[C − 1, *W.shape]``.

    ``sequence`` is the sentence's token ids (special tokens included, no padding), run alone with
    dropout off at the snapshot's ``params``; ``segment`` is its token-type id.

    Raises:
        KeyError: ``name`` is not a parameter of the replicated model.
        ValueError: the model has a single output (no logit difference).
    """
    if name not in replica.parameter_names:
        raise KeyError(f"not a parameter of the replicated model: {name!r}")
    values = dict(params)
    leaf = values[name].detach().requires_grad_(True)
    values[name] = leaf
    ids = torch.as_tensor(list(sequence), dtype=torch.long, device=leaf.device)[None]
    with torch.enable_grad():
        out = replica.forward(
            values, input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.full_like(ids, segment)
        )
        logits = out.logits[0]
        if logits.numel() < 2:
            raise ValueError(f"the model has {logits.numel()} output; peeling needs class logits (C ≥ 2)")
        rows = []
        for c in range(1, logits.numel()):
            (g,) = torch.autograd.grad(logits[c] - logits[0], leaf, retain_graph=c < logits.numel() - 1)
            rows.append(g.detach())
    return torch.stack(rows)


def batched_logit_factors(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    name: str,
    sequences: Sequence[Sequence[int]],
    *,
    segment: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`logit_gradients` of many sentences in factored form, one forward and ``C − 1`` backward passes per length.

    ``name`` must be the weight of a linear module (``….weight``): a sentence's gradient is ``Σ_t δ_t x_tᵀ``
    over the module's inputs ``x_t`` and the gradients ``δ_t`` of its outputs, which sentences of one forward
    never share (dropout off). Returns per sentence, in order, ``(outputs [C − 1, n, d_out], inputs [n, d_in])``
    (``n`` its length), so that ``J_c = outputs[c]ᵀ @ inputs``: a rank-``n`` matrix kept as its factors.

    Raises:
        KeyError: ``name`` is not the weight of a module of the replicated model.
        ValueError: the model has a single output.
    """
    if not name.endswith(".weight") or name not in replica.parameter_names:
        raise KeyError(f"not the weight of a linear module of the replicated model: {name!r}")
    module = replica.submodule(name.removesuffix(".weight"))
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(sequences)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(sequences):
        by_length.setdefault(len(s), []).append(i)
    for rows in by_length.values():
        ids = torch.as_tensor([list(sequences[i]) for i in rows], dtype=torch.long, device=params[name].device)
        seen: dict[str, Tensor] = {}

        def hook(_: torch.nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            seen["x"] = args[0].detach()
            seen["eps"] = torch.zeros_like(output, requires_grad=True)
            return output + seen["eps"]

        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                mask, types = torch.ones_like(ids), torch.full_like(ids, segment)
                logits = replica.forward(params, input_ids=ids, attention_mask=mask, token_type_ids=types).logits
                if logits.shape[-1] < 2:
                    raise ValueError(f"the model has {logits.shape[-1]} output; peeling needs class logits (C ≥ 2)")
                per_class = []
                for c in range(1, logits.shape[-1]):
                    (delta,) = torch.autograd.grad(
                        (logits[:, c] - logits[:, 0]).sum(), seen["eps"], retain_graph=c < logits.shape[-1] - 1
                    )
                    per_class.append(delta.detach())
        finally:
            handle.remove()
        deltas = torch.stack(per_class, 1)  # [n, C − 1, length, d_out]
        for k, i in enumerate(rows):
            out[i] = (deltas[k], seen["x"][k])
    return [f for f in out if f is not None]


def certify(observed: Tensor, basis: Tensor) -> tuple[float, Tensor]:
    """Fit ``observed ≈ Σ_c α_c basis[c]`` and return ``(relative residual, α [C−1])``.

    Args:
        observed: ``[...]`` the observed gradient's member columns.
        basis: ``[C − 1, ...]`` the same columns of each ``J_c``.

    Returns:
        ``‖observed − Σ α_c basis_c‖ / ‖observed‖`` (``inf`` when ``observed`` is zero) and ``α``.
    """
    y = observed.detach().double().flatten()
    a = basis.detach().double().flatten(1).T
    alpha = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
    norm = float(y.norm())
    if norm == 0.0:
        return float("inf"), alpha
    return float((y - a @ alpha).norm()) / norm, alpha


def label_from_coefficients(alpha: Tensor) -> int:
    """The label behind ``α_c = (p_c − y_c)/B`` (basis ``z_c − z_0``): the negative one, else class 0."""
    c = int(alpha.argmin())
    return c + 1 if float(alpha[c]) < 0 else 0


def peel(
    grad: Tensor,
    batch_size: int,
    propose: Callable[[Tensor, int], Proposal],
    contribution: Callable[[list[int]], Tensor],
    split: Callable[[Tensor, Sequence[int], int], Tensor],
    *,
    first: Proposal | None = None,
    complete: Callable[[Tensor, int, list[list[int]]], Proposal | None] | None = None,
    structural: Collection[int] = (),
    tol: float = CERTIFY_TOL,
    deadline: float | None = None,
) -> PeelResult:
    """Recover a batch sentence by sentence: propose, certify by exact gradients, subtract, repeat.

    Args:
        grad: the observed first-layer weight gradient ``[d_out, d]`` of ``batch_size`` sentences.
        propose: ``(gradient left, B') -> Proposal``, an attack on what is left (may raise
            :class:`~leak_audit.attacks.base.NotApplicable`, which ends the rounds).
        contribution: ``sentence -> [C − 1, d_out, d]``, e.g. :func:`logit_gradients`.
        split: ``(gradient, bag, length) -> [d_out, m]`` per-token columns, the first ``|bag|`` in bag order
            (:func:`~leak_audit.attacks.text.span_cluster.token_query_gradients` on the bag's atoms).
        first: the first round's proposal when it is already computed (the attack's priors).
        complete: ``(gradient left, B', the round's uncertified sentences) -> Proposal | None``, a slower
            search asked once per ``B'`` when a round certifies nothing and ``B' ≥ 2`` (e.g.
            :func:`~leak_audit.attacks.text.assignment_descent.complete`); its sentences are certified like
            any proposal's. ``None`` (or no proposal) ends the rounds. Once its sentences certify, the next
            round asks it first (with the sentences still uncertified), and ``propose`` only when it finds
            none: at ``B = 16`` the key-span search then read three sentences in 11.5 s where each proposal round
            took 16-21 s (CoLA dev 48-63; benchmarks/README.md, "One start per cluster").
        structural: tokens in every sentence (``[CLS]``, ``[SEP]``), never members.
        tol: certificate tolerance (relative residual), see :data:`CERTIFY_TOL`.
        deadline: ``time.monotonic()`` value after which no new round and no further certificate starts
            (the result then has ``cut_short`` set).

    Returns:
        A :class:`PeelResult`; its sequences are the proposal's when nothing could be certified.
    """
    structural = set(structural)
    left = grad.detach().double()
    out = PeelResult()
    rest: list[list[int]] = []
    proposal = first
    asked: set[int] = set()  # the B' that ``complete`` was asked for
    completed = False  # the last certified sentences came from ``complete``
    while len(out.sequences) < batch_size:
        b = batch_size - len(out.sequences)
        again = False  # this round's proposal is ``complete``'s, asked first
        if proposal is None:
            if out.rounds and late(deadline):
                out.cut_short = True
                break
            if completed and complete is not None and b >= 2 and b not in asked:
                # the proposals certified nothing and ``complete`` did: ask it first again (not counted as
                # this B''s ask, which stays for the proposal's sentences when it finds none)
                proposal = complete(left, b, rest)
                again = proposal is not None
                completed = again
        if proposal is None:
            try:
                proposal = propose(left.to(grad.dtype), b)
            except NotApplicable:
                break
        rest = [s for s in proposal.sequences if s not in out.sequences]
        out.rounds += 1
        index = {v: j for j, v in enumerate(proposal.bag)}
        columns = None
        accepted: list[tuple[list[int], Tensor, Tensor, float]] = []
        for i, seq in enumerate(proposal.sequences):
            if proposal.members is not None:
                own = set(proposal.members[i]) & set(seq)
            else:
                others = {v for j, s in enumerate(proposal.sequences) if j != i for v in s}
                own = set(seq) - others
            members = sorted(index[v] for v in own if v not in structural and v in index)
            if not members or seq in out.sequences:
                continue
            if late(deadline):
                out.cut_short = True
                break
            if columns is None:
                columns = split(left, proposal.bag, proposal.length)
            basis = contribution(seq)
            pred = torch.stack([split(j, proposal.bag, proposal.length)[:, members] for j in basis.double()])
            res, alpha = certify(columns[:, members], pred)
            if res < tol:
                accepted.append((seq, alpha, basis, res))
        if not accepted and again and not late(deadline):
            completed, proposal = False, None  # back to the proposals
            continue
        if not accepted:
            if complete is None or b < 2 or b in asked or late(deadline):
                break
            asked.add(b)
            proposal = complete(left, b, rest)
            if proposal is None:
                break
            completed = True
            continue
        for seq, alpha, basis, res in accepted[:b]:
            rest.remove(seq)
            left = left - torch.einsum("c,c...->...", alpha, basis.double())
            out.sequences.append(seq)
            out.coefficients.append(alpha)
            out.labels.append(label_from_coefficients(alpha))
            out.residuals.append(res)
        proposal = None
    out.sequences = out.sequences + rest[: batch_size - len(out.sequences)]
    return out
