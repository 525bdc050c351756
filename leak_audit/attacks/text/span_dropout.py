"""Span attention under dropout: exact batch recovery from *training-mode* first-layer gradients.

In training mode a BERT encoder drops coordinates at three places of layer 0: the embedding output
``x = m₁ ⊙ LN(e) / (1 − p)``, the attention probabilities, and the attention output
``h1 = LN(x + m₂ ⊙ (W_o c + b_o) / (1 − p))``. The masks are private randomness, so the dropout-off
span attention (:mod:`leak_audit.attacks.text.span_attention`) cannot certify anything: ``LN(e)`` is not in
the span of layer 0's inputs, and the anchor's context does not solve. This module recovers the masks
themselves, because each is *sparse* (a share ``p`` of zeros) while every span is a proper subspace:

1. **Embedding masks (L1 regression).** ``x = m₁ ⊙ y'`` (``y' = LN(e)/(1 − p)``) lies in the row space
   ``S_x`` of the query/key/value gradients. Regressing ``y'`` on a basis of ``S_x`` under an L1 loss
   treats the dropped coordinates as outliers; the fit is exact (residual ~1e-7) for a true (token,
   position) pair and fails (≥ 0.05 on MiniLM) for a false one. A pair that occurs in several sentences has
   one instance per sentence, each with its own mask; the search goes on until the instances found number
   the rank of ``S_x`` (:mod:`leak_audit.attacks.text.dropout_masks`).
2. **FFN input from the FFN spans.** ``h1`` lies in the span of ``intermediate.dense``'s gradient and
   ``act(W_1 h1 + b_1)`` in the span of ``output.dense``'s (no dropout in between). Levenberg-Marquardt
   over ``h1 ∈ S_h1`` from ``LN(x + b_o)`` solves it (``d_ff`` residuals, ``rank`` unknowns).
3. **Attention context (L1 regression).** ``(h1 − β)/γ = (u − μ)/σ`` with
   ``u = x + m₂ ⊙ (W_o c + b_o)/(1 − p)``: linear in ``(σ, μ, c ∈ S_c)`` except on the dropped
   coordinates, which the L1 fit again treats as outliers.
4. **Membership with dropped attention (linear program).** Per head,
   ``Σ_j z_j e_j ((1 − r_j) v_j − (1 − p) c) = 0`` with ``e_j = exp(q·k_j/√d_h)``, ``z`` the sentence
   indicator and ``r_j ≤ z_j`` the attention entries dropout removed. The LP that minimises the number
   of removed entries has the integral, exact solution on MiniLM (HiGHS via ``scipy.optimize.linprog``).

A sentence is accepted when its members take every position ``0 … n−1`` exactly once and the LP fits
the anchor's context to ``certify_tol``. Exactness needs fewer tokens than the hidden size, as for the
dropout-off attack.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.base import NotApplicable
from leak_audit.attacks.least_squares import l1_fit, levenberg_marquardt
from leak_audit.attacks.spans import span_basis
from leak_audit.attacks.text.dropout_masks import masked_instances
from leak_audit.attacks.text.layer0 import (
    DropoutRates,
    FirstLayer,
    SpanAttentionResult,
    candidate_inputs,
    locate_tokens,
    shift_positions,
)
from leak_audit.models import EmbeddingTables

__all__ = [
    "HiddenSolver",
    "context_from_hidden",
    "dropped_membership",
    "span_attention_dropout",
]


class HiddenSolver:
    """Solve layer 0's FFN input ``h1 ∈ S_h1`` with ``act(W_1 h1 + b_1) ∈ S_a`` (no dropout in between).

    Unknown ``α`` (``h1 = B_h1 α``); residual: the activations of ``units`` FFN units outside ``S_a``.
    Levenberg-Marquardt with the analytic Jacobian, batched over starting points.

    Args:
        layer: layer 0's values; ``basis_h1`` ``[d, r1]`` and ``basis_a`` ``[d_ff, r2]`` the row spaces of
            the gradients of ``intermediate.dense`` and ``output.dense``.
        units: FFN units used (must exceed ``r1 + r2`` for a determined test).
        generator: picks the units.
    """

    def __init__(
        self, layer: FirstLayer, basis_h1: Tensor, basis_a: Tensor, units: int = 768, generator: torch.Generator | None = None
    ) -> None:
        self.layer = layer
        m = layer.w1.shape[0]
        sub = torch.randperm(m, generator=generator)[: min(units, m)]
        self.basis_h1 = basis_h1.float()
        self.w1h = layer.w1[sub] @ self.basis_h1
        self.b1 = layer.b1[sub]
        self.basis_a = span_basis([basis_a[sub].T.contiguous()])[0].float()
        self.scale = float(layer.ln1_weight.square().sum())

    def _residual(self, alpha: Tensor) -> tuple[Tensor, Tensor]:
        u = (alpha @ self.w1h.T + self.b1).detach().requires_grad_(True)
        with torch.enable_grad():
            a = self.layer.act(u)
            slope = torch.autograd.grad(a.sum(), u)[0]
        a = a.detach()
        r = a - (a @ self.basis_a) @ self.basis_a.T
        jac = slope[:, :, None] * self.w1h[None]
        jac = jac - self.basis_a @ (self.basis_a.T @ jac)
        return r, jac

    def solve(
        self, h0: Tensor, iters: int = 40, tol: float = 1e-12, deadline: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Levenberg-Marquardt from ``h0`` ``[n, d]`` (projected onto ``S_h1``), stopped early at
        ``deadline`` (a ``time.monotonic()`` value).

        Returns:
            ``(h1 [n, d], loss [n])``; ``loss`` is the squared residual over ``‖γ‖²`` (~1e-11 at a true
            solution on MiniLM).
        """
        alpha, loss = levenberg_marquardt(
            lambda _rows, th: self._residual(th), h0.float() @ self.basis_h1, self.scale, iters, tol, deadline
        )
        return alpha @ self.basis_h1.T, loss


def context_from_hidden(
    h1: Tensor, x: Tensor, layer: FirstLayer, basis_c: Tensor, p: float, tol: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Attention contexts ``c ∈ S_c`` from FFN inputs ``h1 = LN(x + m ⊙ (W_o c + b_o)/(1 − p))``.

    Per coordinate ``σ n_k + μ − (W_o c)_k/(1 − p) = x_k + b_o,k/(1 − p)`` (``n = (h1 − β)/γ``) except
    where the mask dropped it; an L1 fit over ``(σ, μ, θ)`` (``c = B_c θ``) treats those as outliers.

    Args:
        h1: ``[n, d]`` FFN inputs; ``x``: ``[n, d]`` the matching layer-0 inputs (masked).
        layer: layer 0's values; ``basis_c``: ``[d, r]`` row space of ``attention.output.dense``'s gradient.
        p: the hidden dropout probability.
        tol: relative residual under which a coordinate counts as fitted.

    Returns:
        ``(c [n, d], dropped_share [n])``: the contexts (float64) and the share of coordinates the fit
        leaves out. It is about ``p`` when ``h1`` and ``x`` belong together and far above when not.
    """
    nvec = ((h1.double() - layer.ln1_bias.double()) / layer.ln1_weight.double())  # [n, d]
    n, d = nvec.shape
    wos = (layer.wo.double() @ basis_c.double()) / (1.0 - p)  # [d, r]
    design = torch.cat([nvec[:, :, None], torch.ones(n, d, 1, dtype=torch.float64, device=nvec.device), -wos.expand(n, d, -1)], -1)
    target = x.double() + layer.bo.double() / (1.0 - p)
    sol = l1_fit(design, target)
    res = ((design @ sol[..., None])[..., 0] - target).abs()
    out = res > tol * target.abs().amax(-1, keepdim=True)
    return sol[:, 2:] @ basis_c.double().T, out.double().mean(-1)


def dropped_membership(
    query: Tensor,
    context: Tensor,
    keys: Tensor,
    values: Tensor,
    anchor: int,
    p: float,
    penalty: float = 1e4,
) -> tuple[Tensor, float]:
    """Which candidates form the anchor's sentence, when dropout removed some attention entries.

    Linear program over ``z ∈ [0, 1]^n`` (``z_anchor = 1``), ``r ∈ [0, 1]^{n×H}`` with ``r ≤ z`` and slack
    ``s``: per head ``Σ_j e_j (z_j − r_j) v_j − (1 − p) c Σ_j z_j e_j + s = 0``, minimising
    ``Σ r + penalty ‖s‖₁`` (``e_j = exp(q·k_j/√d_h)``). Solved by HiGHS's interior-point method with crossover (``scipy.optimize.linprog``).

    Args:
        query, context: ``[H, d_h]`` the anchor's query and exact context.
        keys, values: ``[n, H, d_h]`` of every candidate instance (exact masked inputs).
        anchor: the anchor's index; ``p``: the attention dropout probability.

    Returns:
        ``(z [n], slack)``: membership (``≈ 1`` members, ``≈ 0`` others) and ``‖s‖₁`` relative to the
        equations' scale.

    Raises:
        RuntimeError: the solver failed.
    """
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, hstack, identity

    n, heads, dh = keys.shape
    s = torch.einsum("hd,nhd->nh", query.double(), keys.double()) * dh**-0.5
    e = (s - s.max(0).values).exp()  # [n, H]
    val = e[:, :, None] * values.double()  # [n, H, dh]
    a_z = (val - (1.0 - p) * e[:, :, None] * context.double()[None]).reshape(n, -1).T  # [H·dh, n]
    scale = float(a_z.abs().max().clamp_min(1e-300))
    rows = (torch.arange(heads)[:, None] * dh + torch.arange(dh)[None]).reshape(-1)  # head-major rows
    # r_{j,h} (column j·H + h) enters rows h·dh … h·dh + dh − 1 with −e_j v_j
    r_rows = rows.view(heads, dh)[None].expand(n, heads, dh).reshape(-1)
    r_cols = (torch.arange(n)[:, None, None] * heads + torch.arange(heads)[None, :, None]).expand(n, heads, dh).reshape(-1)
    r_vals = (-val / scale).reshape(-1)
    m = heads * dh
    a_r = coo_matrix((r_vals.cpu().numpy(), (r_rows.numpy(), r_cols.numpy())), shape=(m, n * heads))
    a_eq = hstack([coo_matrix((a_z / scale).cpu().numpy()), a_r, identity(m), -identity(m)]).tocsr()
    ub_rows = np.arange(n * heads)
    a_ub = hstack(
        [
            coo_matrix((-np.ones(n * heads), (ub_rows, np.repeat(np.arange(n), heads))), shape=(n * heads, n)),
            identity(n * heads),
            coo_matrix((n * heads, 2 * m)),
        ]
    ).tocsr()
    cost = np.concatenate([np.zeros(n), np.ones(n * heads), np.full(2 * m, penalty)])
    lower = np.zeros(cost.size)
    upper = np.concatenate([np.ones(n + n * heads), np.full(2 * m, np.inf)])
    lower[anchor] = 1.0
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(n * heads), A_eq=a_eq, b_eq=np.zeros(m),
                  bounds=np.stack([lower, upper], 1), method="highs-ipm")  # fmt: skip
    if res.x is None:
        raise RuntimeError(f"the membership LP failed: {res.message}")
    return torch.from_numpy(res.x[:n]), float(res.x[n + n * heads :].sum())


def span_attention_dropout(
    grads: Mapping[str, Tensor],
    tables: EmbeddingTables,
    layer: FirstLayer,
    rates: DropoutRates,
    batch_size: int,
    *,
    segment: int = 0,
    position_offset: int = 0,
    cls_token_id: int | None = None,
    sep_token_id: int | None = None,
    always_floating: Collection[int] = (),
    units: int = 768,
    input_tol: float = 1e-5,
    solve_tol: float = 1e-8,
    certify_tol: float = 1e-3,
    max_anchors: int | None = None,
    deadline: float | None = None,
    generator: torch.Generator | None = None,
) -> SpanAttentionResult:
    """Recover the batch's sentences exactly from training-mode (dropout-on) first-layer gradients.

    Args:
        grads: gradients by role: ``"word"`` ``[V, d]``, ``"position"`` ``[P, d]``, ``"inputs"`` (a list
            of layer 0's query/key/value weight gradients, each ``[d, d]``), ``"context"``
            (``attention.output.dense.weight``), ``"hidden"`` (``intermediate.dense.weight``) and ``"ffn"``
            (``output.dense.weight``).
        tables, layer: embedding tables and layer 0's values; ``rates``: the dropout probabilities.
        batch_size: ``B``; the search stops after ``B`` accepted sentences.
        segment, position_offset, cls_token_id, always_floating: as for
            :func:`~leak_audit.attacks.text.span_attention.span_attention`; ``sep_token_id``: the token every
            sentence ends with, which tells how many instances each position holds (optional).
        units: FFN units in the ``h1`` solve; ``input_tol``: residual under which a masked input is in
            ``S_x``; ``solve_tol``: ``h1`` solve loss for convergence; ``certify_tol``: largest LP slack
            for an accepted sentence (true sentences 2.4e-5 to 5.5e-4 on 16 CoLA sentences, B=4; a
            missing or wrong member ≥ 1).
        max_anchors: cap on anchors tried (default ``4B + 8``); ``deadline``: ``time.monotonic()`` after
            which the search stops (checked after the setup, between rounds of the mask recovery, between
            Levenberg-Marquardt iterations and before each anchor's linear program; the result then has
            ``cut_short`` set); ``generator``: picks the FFN units.

    Returns:
        A :class:`~leak_audit.attacks.text.layer0.SpanAttentionResult`.

    Raises:
        NotApplicable: zero position gradient, or as many tokens as the hidden size.
    """
    d = tables.word.shape[1]
    prow = grads["position"].abs().sum(1).nonzero().flatten()
    if prow.numel() == 0:
        raise NotApplicable("the position-embedding gradient is zero")
    length = int(prow.max()) + 1 - position_offset
    basis_x = span_basis(list(grads["inputs"]))[0]
    basis_c = span_basis([grads["context"]])[0]
    basis_h1 = span_basis([grads["hidden"]])[0]
    basis_a = span_basis([grads["ffn"]])[0].float()
    rank = basis_x.shape[1]
    if max(rank, basis_c.shape[1], basis_h1.shape[1]) >= d - 8:
        raise NotApplicable(
            f"the first layer's gradients have rank {rank} of {d}: the batch has about as many tokens as the "
            "hidden size, so its inputs span the whole space (physical limit of span checks)"
        )
    setup_cut = SpanAttentionResult.describe(0, batch_size, 0, "stopped in the setup")
    if late(deadline):
        return SpanAttentionResult([], {}, [], 0, 0, rank, length, cut_short=True, progress=setup_cut)
    shifted = shift_positions(tables, position_offset)
    located, floating = locate_tokens(grads["word"], shifted, length, segment, always_floating=always_floating)
    fset = set(floating)
    cands = [(v, i) for v, i in located.items() if v not in fset]
    cands += [(v, i) for v in sorted(fset) for i in range(length)]
    if cls_token_id is not None and (cls_token_id, 0) not in cands:
        cands.append((cls_token_id, 0))
    tok = torch.tensor([c[0] for c in cands], dtype=torch.long)
    pos = torch.tensor([c[1] for c in cands], dtype=torch.long)
    y = candidate_inputs(shifted, tok, pos, segment)
    owner, xs, cut = masked_instances(y, cands, basis_x, rates.embeddings, batch_size, tol=input_tol,
                                      sep_token_id=sep_token_id, generator=generator, deadline=deadline)
    if cut:
        setup_cut = SpanAttentionResult.describe(0, batch_size, 0, "stopped while recovering the dropout masks")
        return SpanAttentionResult([], located, floating, 0, 0, rank, length, cut_short=True, progress=setup_cut)
    pairs = [cands[j] for j in owner]
    if not pairs:
        return SpanAttentionResult([], located, floating, 0, 0, rank, length,
                                   progress=SpanAttentionResult.describe(0, batch_size, 0))
    xf = xs.float()
    h, dh = layer.heads, layer.head_size
    q = F.linear(xf, layer.wq, layer.bq).view(-1, h, dh)
    k = F.linear(xf, layer.wk, layer.bk).view(-1, h, dh)
    v = F.linear(xf, layer.wv, layer.bv).view(-1, h, dh)
    solver = HiddenSolver(layer, basis_h1, basis_a, units=units, generator=generator)
    # anchors: instances of tokens that occur once (one instance), then the rest; never [CLS]
    count: dict[tuple[int, int], int] = {}
    for pr in pairs:
        count[pr] = count.get(pr, 0) + 1
    order = sorted(
        (j for j, pr in enumerate(pairs) if pr[0] != cls_token_id),
        key=lambda j: (pairs[j][0] in fset or count[pairs[j]] > 1, pairs[j][1]),
    )
    cap = max_anchors if max_anchors is not None else 4 * batch_size + 8
    sequences: list[list[int]] = []
    covered: set[int] = set()
    tried = converged = 0
    while len(sequences) < batch_size and tried < cap and not cut:
        todo = [j for j in order if j not in covered][: max(1, min(batch_size - len(sequences), cap - tried))]
        if not todo:
            break
        if late(deadline):
            cut = True
            break
        order = [j for j in order if j not in todo]
        tried += len(todo)
        h0 = F.layer_norm(xf[todo] + layer.bo, (d,), layer.ln1_weight, layer.ln1_bias, layer.ln1_eps)
        h1, loss = solver.solve(h0, deadline=deadline)
        for j, hj, f in zip(todo, h1, loss.tolist(), strict=True):
            if len(sequences) < batch_size and late(deadline):
                cut = True  # this anchor (and the rest of the round) was not finished
                break
            if not f <= solve_tol or j in covered or len(sequences) >= batch_size:  # NaN: diverged
                continue
            converged += 1
            # the solve may land on another instance of a repeated pair: try each instance's input
            mates = [i for i, pr in enumerate(pairs) if pr == pairs[j] and i not in covered]
            c, share = context_from_hidden(hj.expand(len(mates), -1), xs[mates], layer, basis_c, rates.hidden)
            best = int(share.argmin())
            if float(share[best]) > 2.5 * rates.hidden + 0.05:
                continue
            anchor = mates[best]
            live = [i for i in range(len(pairs)) if i not in covered]  # instances of found sentences are out
            try:
                z_live, slack = dropped_membership(
                    q[anchor], c[best].view(h, dh).float(), k[live], v[live], live.index(anchor), rates.attention
                )
            except RuntimeError:
                continue
            z = torch.zeros(len(pairs), dtype=torch.float64, device=z_live.device)
            z[live] = z_live
            seq, members = _read(z, pairs)
            if seq is None or slack > certify_tol or seq in sequences:
                continue
            sequences.append(seq)
            covered.update(members)
    stage = "stopped by the deadline" if cut else ""
    return SpanAttentionResult(
        sequences, located, floating, tried, converged, rank, length, cut_short=cut,
        progress=SpanAttentionResult.describe(len(sequences), batch_size, tried, stage),
    )


def _read(z: Tensor, pairs: Sequence[tuple[int, int]], cut: float = 0.5) -> tuple[list[int] | None, list[int]]:
    """The sentence ``z`` selects, or ``None`` unless it holds each position ``0 … n−1`` exactly once."""
    members = (z > cut).nonzero().flatten().tolist()
    at: dict[int, int] = {}
    for j in members:
        t, i = pairs[j]
        if i in at:
            return None, members
        at[i] = t
    if not at or sorted(at) != list(range(len(at))):
        return None, members
    return [at[i] for i in range(len(at))], members
