"""Sentences from a decoder's *saturated* first-layer gradients (LoRA beyond its rank), by joint sparse recovery.

A LoRA adapter's ``A`` gradient ``s·Bᵀ Σ_t δ_t x_tᵀ`` is ``[r, d]``: once a batch has more positions than
``r`` (per adapter), its row space no longer holds any single input, and the span test of
:mod:`~leak_audit.attacks.text.span_decoder` accepts nothing exactly. The rows are still combinations of the
batch's inputs alone, and those inputs come from a known, discrete set. So the batch is the sparsest set of
candidate atoms whose span holds the rows: joint sparse recovery (:mod:`~leak_audit.attacks.pursuit`,
rank-aware ORMP). The idea of reading adapter gradients in their own subspace is that of the 2026 LoRA
attacks (UTR, FedSpy-LLM); the solver and the decoder tree below are ours.

1. **The token bag** (:func:`~leak_audit.attacks.text.sparse_bag.sparse_bag`). Layer 0's attention reads the
   position-free ``Norm(E[v])`` under rotary positions, so the atoms are the vocabulary's rows (GPT-2's learned
   positions add one atom per position); the stacked ``q``/``v`` adapters of layer 0 (``2r`` rows) are the
   targets. On SmolLM2 with ``r = 8`` (16 rows) it recovers 18-110 distinct tokens exactly
   (``docs/decoders.md``).
2. **The sentences** (:func:`pursue_prefixes`). Layer 1's adapters read the hidden state of each position,
   which depends on the prefix only (causal attention). The atoms are the layer-1 inputs of candidate
   prefixes: every bag token alone at the start, and each picked prefix extended by every bag token. A prefix
   becomes an atom only once its own prefix was picked, so the pursuit grows a tree of prefixes left to right,
   and the tree's leaves are the sentences. Picks the final fit does not need are pruned
   (:func:`~leak_audit.attacks.pursuit.prune_support`), with every prefix whose ancestors did not survive.

   Before the picks, the pursuit projects every atom and the targets away from the bag's *context-averaged
   states* (:func:`context_states`: each bag token's input to the block's module at position 1, averaged over
   the bag's tokens before it). A position's state is dominated by its own token, so the atoms of every prefix
   that ends in the same token are near-copies of each other, and the greedy picks confused them (a wrong
   prefix that ends in a token true elsewhere explained the residual as well as the true one). Projecting is
   linear, so the rows stay exact combinations of the projected true atoms, now told apart by what their
   prefixes add: on SmolLM2 SST-2 LoRA r = 8 at B = 4 this took ROUGE-1 from 0.805 to 0.991
   (``docs/decoders.md``). It costs ``K`` of the ``d`` dimensions (``K`` distinct tokens), so it is left out when
   ``K ≥ d/2``.

Each sentence's last position predicts nothing (causal LM), so no gradient below the head holds it: the
sentences come back one token short, and tokens seen only there are not in the bag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.pursuit import SharedPursuit, prune_support
from leak_audit.models.replica import ModelReplica

__all__ = ["context_states", "last_tokens_by_matching", "leaf_coefficients", "pursue_prefixes"]


def context_states(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    modules: Sequence[str],
    tokens: Tensor,
    *,
    contexts: int = 128,
    chunk: int = 4096,
    deadline: float | None = None,
) -> list[Tensor] | None:
    """Each bag token's input to ``modules`` at position 1, averaged over the tokens before it.

    Args:
        replica: the model replica (runs the first layers only).
        params: parameter values by root-relative name.
        modules: root-relative module names.
        tokens: the bag ``[K]``.
        contexts: at most this many of the bag's tokens are put before each token (evenly spread over the bag),
            and the states averaged over them.
        chunk: sequences per forward (``K·min(contexts, K)`` sequences of two tokens in all: 2.4 s for ``K = 60``,
            12.6 s for ``K = 154`` on SmolLM2's layers 0-3, one CPU thread with another job on the other core).
        deadline: ``time.monotonic()`` value after which it gives up (checked between chunks).

    Returns:
        One ``[K, d]`` float64 tensor per module, rows in the order of ``tokens``; ``None`` when the deadline came.
    """
    device = next(iter(params.values())).device
    ids = tokens.to(device=device, dtype=torch.long)
    k = ids.numel()
    before = ids[torch.linspace(0, k - 1, min(contexts, k), device=device).round().long().unique()]
    c = before.numel()
    pairs = torch.stack([ids.repeat_interleave(c), before.repeat(k)], 1).flip(1)  # [K·c, 2]: (context, token)
    parts: list[list[Tensor]] = [[] for _ in modules]
    with torch.no_grad():
        for start in range(0, pairs.shape[0], chunk):
            if late(deadline):
                return None
            seen = replica.module_inputs(params, modules, pairs[start:start + chunk])
            for i, m in enumerate(modules):
                parts[i].append(seen[m][:, 1].to(torch.float64))
    return [torch.cat(p).reshape(k, c, -1).mean(1) for p in parts]


def pursue_prefixes(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    modules: Sequence[str],
    rows: Sequence[Sequence[Tensor]],
    tokens: Tensor,
    *,
    tol: float = 1e-6,
    max_length: int = 512,
    patience: int = 24,
    deadline: float | None = None,
    deflate: bool = True,
) -> tuple[list[list[int]], dict[str, object], bool]:
    """Sentences (less their last token) as the leaves of the prefix tree whose hidden states span ``rows``.

    Args:
        replica: the model replica (runs the first layers only, with a key/value cache:
            :meth:`~leak_audit.models.replica.ModelReplica.module_inputs`).
        params: parameter values by root-relative name.
        modules: root-relative names of the modules whose inputs the ``rows`` span, one per block (the attention
            projections of layers 1, 2, ...: every block must be explained by the same positions).
        rows: per block, its gradient rows ``[k_i, d]`` (e.g. a layer's ``lora_A`` gradients of ``q_proj`` and
            ``v_proj``).
        tokens: the bag ``[K]`` (:func:`~leak_audit.attacks.text.sparse_bag.sparse_bag`).
        tol: relative residual at which the pursuit stops.
        max_length: longest prefix.
        patience: stop when this many picks in a row left the residual above 0.9 of what it was (a token the
            bag misses: the right atoms are out of reach).
        deadline: ``time.monotonic()`` value after which it stops.
        deflate: project the atoms and targets away from the bag's :func:`context_states` (see the module
            docstring); skipped when the bag has at least half as many tokens as a block has dimensions.

    Returns:
        ``(prefixes, info, cut)``: the leaves, longest first; ``info`` with ``pursuit_picks`` (atoms picked),
        ``pursuit_kept`` (after pruning), ``pursuit_residual``, ``pursuit_blocks`` and ``pursuit_deflated`` (the
        dimensions projected away per block); whether the deadline stopped the picks.
    """
    targets = [torch.cat([r.to(torch.float64) for r in block]) for block in rows]
    away: list[Tensor] = []
    states = None
    if deflate and 2 * tokens.numel() < min(t.shape[1] for t in targets):
        states = context_states(replica, params, modules, tokens, deadline=deadline)
    if states is not None:
        # orthonormal bases of the context-averaged states; atoms and targets lose their parts along them
        away = [torch.linalg.qr(z.to(t.device).T)[0] for z, t in zip(states, targets, strict=True)]
        targets = [t - (t @ z) @ z.T for t, z in zip(targets, away, strict=True)]
    deflated = away[0].shape[1] if away else 0
    state = SharedPursuit(targets)
    ids = tokens.tolist()
    device = next(iter(params.values())).device
    column = torch.tensor(ids, dtype=torch.long, device=device)[:, None]
    prefixes: list[tuple[int, ...]] = []

    def add(parent: tuple[int, ...]) -> None:
        # the parent's keys and values once, then one new position per candidate token
        with torch.no_grad():
            if parent:
                cache = replica.new_cache()
                replica.module_inputs(params, modules, torch.tensor([list(parent)], device=device), cache=cache)
                cache.batch_repeat_interleave(len(ids))
                seen = replica.module_inputs(params, modules, column, cache=cache)
            else:
                seen = replica.module_inputs(params, modules, column)
        atoms = [seen[m][:, -1] for m in modules]
        if away:
            atoms = [_project_away(a, z) for a, z in zip(atoms, away, strict=True)]
        state.extend(atoms)
        prefixes.extend(parent + (v,) for v in ids)

    add(())
    residual, mark, since, cut = state.residual(), 1.0, 0, False
    # the sparsest set is unique up to about (d + rank) / 2 atoms, but the greedy picks may pass that on their way
    # (near-copies of true prefixes picked before the true ones): up to d − 1 picks, then the pruning
    limit = min(t.shape[1] for t in targets) - deflated - 1
    while residual > tol and len(state.picked) < limit:
        if late(deadline):
            cut = True
            break
        j = state.step()
        if j is None:
            break
        if len(prefixes[j]) < max_length:
            add(prefixes[j])
        residual = state.residual()
        if residual < 0.9 * mark:
            mark, since = residual, 0
        else:
            since += 1
            if since >= patience:
                break
    picked = state.picked
    index = torch.tensor(picked, dtype=torch.long)
    kept = prune_support(targets, [b.atoms[index] for b in state.blocks], tol=tol) if picked else []
    chosen = {prefixes[picked[i]] for i in kept}
    chosen = {p for p in chosen if all(p[:n] in chosen for n in range(1, len(p)))}
    leaves = [p for p in chosen if not any(len(q) > len(p) and q[: len(p)] == p for q in chosen)]
    leaves.sort(key=lambda p: (-len(p), p))
    info: dict[str, object] = {"pursuit_picks": len(picked), "pursuit_kept": len(chosen),
                               "pursuit_residual": float(f"{residual:.3g}"), "pursuit_blocks": len(targets),
                               "pursuit_deflated": deflated}
    return [list(p) for p in leaves], info, cut


def _project_away(atoms: Tensor, basis: Tensor) -> Tensor:
    """``atoms`` ``[m, d]`` less their parts in the span of ``basis`` ``[d, z]`` (orthonormal), computed in float64
    and returned in float32 (the pursuit's dictionary dtype)."""
    a = atoms.to(basis.device, torch.float64)
    return (a - (a @ basis) @ basis.T).to(torch.float32)


def leaf_coefficients(
    replica: ModelReplica, params: Mapping[str, Tensor], module: str, rows: Sequence[Tensor],
    prefixes: Sequence[Sequence[int]],
) -> Tensor:
    """What each prefix's last position contributes to a weight gradient: ``∂L/∂(W x)`` there.

    A weight gradient's rows are ``Σ_t u_t x_tᵀ`` over the positions ``t`` (``u_t = ∂L/∂(W x_t)``, for a LoRA
    ``A`` the bottleneck ``A x_t``). With every position's input ``x_t`` known (the replica runs the prefixes up
    to ``module``), least squares gives each ``u_t``.

    Args:
        module: root-relative name of the module whose input the ``rows`` span.
        rows: the gradients as input-spanning rows ``[k_i, d]`` (:func:`~leak_audit.attacks.text.span_decoder.input_rows`).
        prefixes: every sentence of the batch, less its last token.

    Returns:
        ``[Σ k_i, len(prefixes)]``: ``u`` at each prefix's last position (shared positions get the shared ``u``).
    """
    targets = torch.cat([r.to(torch.float64) for r in rows])
    device = next(iter(params.values())).device
    states: dict[tuple[int, ...], Tensor] = {}
    for p in prefixes:
        with torch.no_grad():
            seen = replica.module_inputs(params, [module], torch.tensor([list(p)], dtype=torch.long, device=device))
        for i, h in enumerate(seen[module][0]):
            states[tuple(p[: i + 1])] = h.to(torch.float64)
    order = list(states)
    atoms = torch.stack([states[q] for q in order]).to(targets.device)  # [s, d]
    fit = torch.linalg.lstsq(atoms.T, targets.T).solution.T  # targets ≈ fit @ atoms: [k, s]
    return fit[:, [order.index(tuple(p)) for p in prefixes]]


def last_tokens_by_matching(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    weights: Sequence[str],
    prefixes: Sequence[Sequence[int]],
    coefficients: Tensor,
    *,
    candidates: int = 32,
    accept: float = 1e-2,
    margin: float | None = None,
) -> list[int | None]:
    """Each sentence's last token, matched against a weight gradient at the position before it.

    Under causal LM the last position ``m − 1`` of a prefix predicts the sentence's last token ``y``, and nothing
    after it carries a loss, so what reaches the output of a tapped map there is
    ``u(y) = ∂(−log p(y | prefix))/∂(W x) / N`` (``N`` the batch's target count). :func:`leaf_coefficients`
    gives the observed ``u``; the replica computes ``u(y)`` for the model's ``candidates`` likeliest next tokens
    (one forward and backward of the prefix copied once per candidate), and the token whose ``u(y)`` matches
    within ``accept`` (relative) is the last token. It reads the adapters of a LoRA model with a frozen LM head,
    or layer 0's maps when only layer 0 is tapped.

    Args:
        replica: the model replica.
        params: parameter values by root-relative name.
        weights: root-relative weight names of the map (stacked in the order of ``coefficients``' row blocks).
        prefixes: the sentences less their last token (every sentence of the batch: ``N = Σ len``).
        coefficients: ``[Σ k_i, b]`` the observed ``u`` at each prefix's last position.
        candidates: next tokens tried per prefix.
        accept: largest relative misfit accepted.
        margin: also accept the best candidate when its misfit is below 0.5 and every other candidate's is at least
            ``margin`` times it (round-off of massive activations blurs small coefficients: SmolLM2, CoLA dev 44-47,
            the true ``.`` at misfit 0.06-0.18, the next candidate at 0.67-4.6); ``None``: ``accept`` alone.

    Returns:
        The last token of each prefix, or ``None`` where no candidate matches.
    """
    total = sum(len(p) for p in prefixes)
    device = next(iter(params.values())).device
    names = [w.removesuffix(".weight") for w in weights]
    modules = [replica.submodule(n) for n in names]
    seen: dict[int, Tensor] = {}

    def grab(module: torch.nn.Module, _args: tuple[object, ...], output: Tensor) -> Tensor:
        out = output.detach().requires_grad_(True)
        seen[id(module)] = out
        return out

    out: list[int | None] = []
    for b, prefix in enumerate(prefixes):
        m = len(prefix)
        ids = torch.tensor([list(prefix)] * candidates, dtype=torch.long, device=device)
        seen.clear()
        handles = [mod.register_forward_hook(grab) for mod in modules]
        try:
            with torch.enable_grad():
                logits = replica.forward(params, input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, m - 1]
                logp = logits.log_softmax(-1)
                ys = logp[0].detach().topk(min(candidates, logp.shape[-1])).indices
                loss = -logp.gather(1, ys[:, None]).sum()
                grads = torch.autograd.grad(loss, [seen[id(mod)] for mod in modules])
        finally:
            for h in handles:
                h.remove()
        u = torch.cat([g[:, m - 1].to(torch.float64) for g in grads], dim=1) / total  # [candidates, Σ r]
        observed = coefficients[:, b].to(u.device)
        misfit = torch.linalg.vector_norm(u - observed, dim=1) / torch.linalg.vector_norm(observed).clamp_min(1e-300)
        ranked = misfit.argsort()
        best = float(misfit[ranked[0]])
        clear = margin is not None and best < 0.5 and (ranked.numel() < 2 or float(misfit[ranked[1]]) >= margin * best)
        out.append(int(ys[ranked[0]]) if best < accept or clear else None)
    return out
