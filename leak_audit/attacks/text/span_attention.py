"""Span attention: exact recovery of a whole batch from an encoder's first-layer gradients (B > 1).

DAGER's span check (:mod:`leak_audit.attacks.text.span_check`) finds which tokens sit at which position, but
in a BERT encoder layer 0's inputs are ``LayerNorm(word + position + segment)``: at ``B > 1`` the span
of those inputs also contains every *cross* pair (a token of one sentence at a position of another),
so per-position candidates do not say which tokens form one sentence. DAGER (Petrov et al. 2024)
assembles encoder sentences by sampling combinations and filtering with the next layer, which does not
scale past a few sentences. This attack groups tokens exactly, with three facts of layer 0:

1. **Token positions from LayerNorm orthogonality.** LayerNorm is invariant to shifting and scaling its
   input ``e``, so its input gradient ``g = ∂L/∂e`` is orthogonal to ``1`` and to ``e``. A token ``v``
   that occurs once in the batch (or only at one position) has word-embedding gradient row
   ``∂L/∂E[v] = g``, orthogonal to ``e = E[v] + P[i] + T[s]`` only at its own position ``i``. Tokens
   occurring at several positions are *floating*: they are candidates at every position.
2. **One exact attention context per sentence.** The attention output projection's weight gradient
   spans the contexts ``c_t`` (layer 0, every position of every sentence), the FFN's up- and down-
   projections span ``h1_t = LN(x_t + W_o c_t + b_o)`` and ``a_t = act(W_1 h1_t + b_1)``. For an anchor
   (a located token) only its true context puts ``h1`` and ``a`` into those spans (``a`` lives in a
   ``d_ff``-dimensional space, so the test is heavily over-determined): a damped Gauss-Newton solve over
   ``c ∈ span`` recovers the anchor's exact context, or fails for a false anchor.
3. **Sentence membership is linear.** Per head, ``c = Σ_j α_j v_j`` with ``α_j ∝ exp(q·k_j/√d_h)``,
   so ``Σ_j exp(q·k_j/√d_h) (v_j − c) = 0``. Given the anchor's query and context, the indicator of
   the sentence's (token, position) pairs is the non-negative solution of that linear system over all
   candidate pairs (``d`` equations; non-negative least squares), which reads off the whole sentence,
   its length included.

Every assembled sentence is *certified*: run through layer 0, each of its positions must fall into the
three spans. A certified sentence is exact (dropout off). Exactness needs the number of tokens in the
batch below the hidden size ``d`` (the spans must be proper subspaces): 384 for MiniLM, a physical limit
DAGER shares.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements, require_encoder
from leak_audit.attacks.least_squares import levenberg_marquardt
from leak_audit.attacks.spans import span_basis
from leak_audit.attacks.text.layer0 import (
    DropoutRates,
    FirstLayer,
    SpanAttentionResult,
    candidate_inputs,
    locate_tokens,
    shift_positions,
)
from leak_audit.attacks.text.span_dropout import span_attention_dropout
from leak_audit.models import EmbeddingTables, TextModelSpec, UnsupportedModelError

__all__ = ["ContextSolver", "SpanAttention", "sentence_membership", "span_attention"]


class ContextSolver:
    """Recover the exact layer-0 attention context of an anchor (token, position) from gradient spans.

    Unknown ``θ`` (``c = B_c θ``, ``B_c`` ``[d, r]`` an orthonormal basis of the attention output
    projection's gradient row space). Residuals: ``h1 = LN(x + W_o c + b_o)`` outside the span of the
    FFN up-projection's gradient, and ``a = act(W_1 h1 + b_1)`` outside the down-projection's span,
    restricted to ``units`` hidden units for speed. Solved by Levenberg-Marquardt with the analytic
    Jacobian, batched over anchors.

    Args:
        layer: layer 0's values.
        basis_c, basis_h1, basis_a: orthonormal bases ``[d, r]``, ``[d, r1]``, ``[d_ff, r2]`` of the row
            spaces of the gradients of ``attention.output.dense``, ``intermediate.dense``, ``output.dense``.
        units: hidden units used for the FFN residual (must exceed ``r2`` for a test).
        generator: picks the units.
    """

    def __init__(
        self,
        layer: FirstLayer,
        basis_c: Tensor,
        basis_h1: Tensor,
        basis_a: Tensor,
        units: int = 512,
        generator: torch.Generator | None = None,
    ) -> None:
        self.layer = layer
        self.basis_c = basis_c
        m = layer.w1.shape[0]
        sub = torch.randperm(m, generator=generator)[: min(units, m)]
        self.w1, self.b1 = layer.w1[sub], layer.b1[sub]
        mo = layer.wo @ basis_c
        self.mo = mo
        self.mo_centred = mo - mo.mean(0, keepdim=True)
        self.basis_h1 = basis_h1
        self.basis_a = span_basis([basis_a[sub].T.contiguous()])[0].float()
        self.scale = float(layer.ln1_weight.square().sum())

    def residual(self, x: Tensor, theta: Tensor, jacobian: bool = True) -> tuple[Tensor, Tensor | None]:
        """Residuals ``[n, m]`` (and Jacobians ``[n, m, r]``) for inputs ``x`` ``[n, d]`` at ``theta`` ``[n, r]``."""
        lay = self.layer
        d = x.shape[1]
        z = x + theta @ self.mo.T + lay.bo
        zc = z - z.mean(-1, keepdim=True)
        sig = (zc.square().mean(-1, keepdim=True) + lay.ln1_eps).sqrt()
        zh = zc / sig
        h1 = lay.ln1_weight * zh + lay.ln1_bias
        r1 = h1 - (h1 @ self.basis_h1) @ self.basis_h1.T
        u = (h1 @ self.w1.T + self.b1).detach().requires_grad_(True)
        with torch.enable_grad():
            a = lay.act(u)
            slope = torch.autograd.grad(a.sum(), u)[0] if jacobian else None
        a = a.detach()
        r2 = a - (a @ self.basis_a) @ self.basis_a.T
        r = torch.cat([r1, r2], -1)
        if not jacobian:
            return r, None
        p = self.mo_centred[None] - zh[:, :, None] * (zh @ self.mo_centred)[:, None, :] / d
        jh = (lay.ln1_weight[None, :, None] / sig[:, :, None]) * p
        j1 = jh - self.basis_h1 @ (self.basis_h1.T @ jh)
        ja = slope[:, :, None] * (self.w1 @ jh)  # type: ignore[index]
        j2 = ja - self.basis_a @ (self.basis_a.T @ ja)
        return r, torch.cat([j1, j2], 1)

    def solve(
        self, x: Tensor, theta0: Tensor | None = None, iters: int = 40, tol: float = 1e-12,
        deadline: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Levenberg-Marquardt from ``theta0`` (default zero), stopped early at ``deadline`` (a
        ``time.monotonic()`` value).

        Returns:
            ``(contexts [n, d], loss [n])``; ``loss`` is the squared residual over ``‖γ‖²`` (about 1e-10
            for a true anchor, above 1e-5 for a false one on MiniLM).
        """
        theta = torch.zeros(x.shape[0], self.basis_c.shape[1], device=x.device) if theta0 is None else theta0.clone()

        def residual(rows: Tensor, th: Tensor) -> tuple[Tensor, Tensor]:
            r, jac = self.residual(x[rows], th)
            assert jac is not None
            return r, jac

        theta, loss = levenberg_marquardt(residual, theta, self.scale, iters, tol, deadline)
        return theta @ self.basis_c.T, loss


def sentence_membership(
    query: Tensor, context: Tensor, keys: Tensor, values: Tensor, anchor: int
) -> tuple[Tensor, float]:
    """Which candidate (token, position) pairs form the anchor's sentence, from its exact context.

    Solves ``Σ_j z_j exp(q·k_j/√d_h) (v_j − c) = 0`` (every head, ``d`` equations) for ``z ≥ 0`` with
    ``z_anchor = 1`` by non-negative least squares (``scipy.optimize.nnls``).

    Args:
        query: ``[H, d_h]`` the anchor's query; ``context``: ``[H, d_h]`` its attention context.
        keys, values: ``[n, H, d_h]`` of every candidate pair.
        anchor: index of the anchor among the candidates.

    Returns:
        ``(z [n], residual)``; members have ``z ≈ 1``, others ``≈ 0``.
    """
    from scipy.optimize import nnls

    dh = query.shape[-1]
    s = torch.einsum("hd,nhd->nh", query.double(), keys.double()) * dh**-0.5
    w = (s - s.max(0).values).exp()
    m = (w[:, :, None] * (values.double() - context.double()[None])).reshape(keys.shape[0], -1).T
    m = m / m.norm(dim=0).clamp_min(1e-300).max()
    rest = [j for j in range(keys.shape[0]) if j != anchor]
    m = m.cpu()  # SciPy's NNLS
    sol, res = nnls(m[:, rest].numpy(), -m[:, anchor].numpy(), maxiter=20 * keys.shape[0])
    z = torch.zeros(keys.shape[0], dtype=torch.float64)
    z[rest] = torch.from_numpy(sol)
    z[anchor] = 1.0
    return z.to(keys.device), float(res)


def span_attention(
    grads: Mapping[str, Tensor],
    tables: EmbeddingTables,
    layer: FirstLayer,
    batch_size: int,
    *,
    segment: int = 0,
    position_offset: int = 0,
    cls_token_id: int | None = None,
    always_floating: Collection[int] = (),
    units: int = 512,
    solve_tol: float = 1e-7,
    certify_tol: float = 1e-4,
    max_anchors: int | None = None,
    deadline: float | None = None,
    generator: torch.Generator | None = None,
) -> SpanAttentionResult:
    """Recover the batch's sentences exactly from full first-layer and embedding gradients.

    Args:
        grads: gradients by role: ``"word"`` ``[V, d]``, ``"position"`` ``[P, d]``, ``"context"``
            (``attention.output.dense.weight``, ``[d, d]``), ``"hidden"`` (``intermediate.dense.weight``,
            ``[d_ff, d]``) and ``"ffn"`` (``output.dense.weight``, ``[d, d_ff]``) of layer 0.
        tables: embedding tables and LayerNorm; ``layer``: layer 0's values.
        batch_size: ``B``; the search stops after ``B`` certified sentences.
        segment: token-type id of the batch; ``position_offset``: first position row (RoBERTa: pad + 1).
        cls_token_id: the ``[CLS]`` id (never used as an anchor: it is in every sentence).
        always_floating: token ids never located (``[SEP]`` ends every sentence, at varying positions).
        units: FFN units in the context solve (see :class:`ContextSolver`).
        solve_tol: a context solve converged below this loss.
        certify_tol: a sentence is accepted when every position's residual fraction in the three spans
            is below this (true sentences ~1e-7, one wrong token ≥ 0.04 on MiniLM).
        max_anchors: cap on context solves (default ``4B + 8``).
        deadline: ``time.monotonic()`` value after which the search stops (checked after the setup, between
            Levenberg-Marquardt iterations and before each anchor's membership solve); the result then has
            ``cut_short`` set and holds the sentences certified so far.
        generator: random generator (FFN units).

    Returns:
        A :class:`~leak_audit.attacks.text.layer0.SpanAttentionResult`.

    Raises:
        NotApplicable: the position gradient is zero, or the batch has as many tokens as the hidden size
            (the spans are the whole space: the physical limit of span checks).
    """
    d = tables.word.shape[1]
    prow = grads["position"].abs().sum(1).nonzero().flatten()
    if prow.numel() == 0:
        raise NotApplicable("the position-embedding gradient is zero")
    length = int(prow.max()) + 1 - position_offset
    basis_c = span_basis([grads["context"]])[0].float()
    basis_h1 = span_basis([grads["hidden"]])[0].float()
    basis_a = span_basis([grads["ffn"]])[0].float()
    rank = basis_c.shape[1]
    if rank >= d - 8 or basis_h1.shape[1] >= d - 8:
        raise NotApplicable(
            f"the first layer's gradients have rank {rank} of {d}: the batch has about as many tokens as the "
            "hidden size, so its inputs span the whole space (physical limit of span checks)"
        )
    if late(deadline):
        return SpanAttentionResult([], {}, [], 0, 0, rank, length, cut_short=True,
                                   progress=SpanAttentionResult.describe(0, batch_size, 0, "stopped in the setup"))
    shifted = shift_positions(tables, position_offset)
    located, floating = locate_tokens(
        grads["word"], shifted, length, segment, always_floating=always_floating
    )
    if late(deadline):
        return SpanAttentionResult([], located, floating, 0, 0, rank, length, cut_short=True,
                                   progress=SpanAttentionResult.describe(0, batch_size, 0, "stopped in the setup"))
    fset = set(floating)
    always_floating = set(always_floating)
    # candidate (token, position) pairs: located tokens at their position, floating tokens anywhere
    pairs = [(v, i) for v, i in sorted(located.items(), key=lambda kv: (kv[1], kv[0])) if v not in fset]
    pairs += [(v, i) for v in floating for i in range(length)]
    tok = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    pos = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    x = candidate_inputs(shifted, tok, pos, segment)
    h, dh = layer.heads, layer.head_size
    q = F.linear(x, layer.wq, layer.bq).view(-1, h, dh)
    k = F.linear(x, layer.wk, layer.bk).view(-1, h, dh)
    v = F.linear(x, layer.wv, layer.bv).view(-1, h, dh)
    solver = ContextSolver(layer, basis_c, basis_h1, basis_a, units=units, generator=generator)
    anchors = [j for j, (t, i) in enumerate(pairs) if t not in fset and t != cls_token_id and i > 0]
    cap = max_anchors if max_anchors is not None else 4 * batch_size + 8
    sequences: list[list[int]] = []
    covered: set[tuple[int, int]] = set()
    tried = converged = 0
    cut = False  # the deadline stopped the search with work left

    found_contexts: list[Tensor] = []

    def attempt(todo: list[int], warm: bool = False) -> None:
        nonlocal tried, converged, cut
        tried += len(todo)
        theta0 = None
        if warm and found_contexts:
            theta0 = (torch.cat(found_contexts).mean(0) @ basis_c).expand(len(todo), -1)
        ctx, loss = solver.solve(x[todo], theta0, deadline=deadline)
        for j, c, f in zip(todo, ctx, loss.tolist(), strict=True):
            if len(sequences) < batch_size and late(deadline):
                cut = True  # this anchor (and the rest of the round) was not finished
                return
            if f > solve_tol:
                continue
            converged += 1
            z, _ = sentence_membership(q[j], c.view(h, dh), k, v, j)
            seq = _read_sentence(z, pairs, length)
            if seq is None or seq in sequences or len(sequences) >= batch_size:
                continue
            if _certify(seq, shifted, layer, segment, (basis_c, basis_h1, basis_a)) > certify_tol:
                continue
            sequences.append(seq)
            covered.update((t, i) for i, t in enumerate(seq))
            ids = torch.tensor(seq, dtype=torch.long)
            found_contexts.append(layer.forward(candidate_inputs(shifted, ids, torch.arange(len(seq)), segment)[None])[0][0])

    def result() -> SpanAttentionResult:
        stage = "stopped by the deadline" if cut else ""
        return SpanAttentionResult(
            sequences, located, floating, tried, converged, rank, length, cut_short=cut,
            progress=SpanAttentionResult.describe(len(sequences), batch_size, tried, stage),
        )

    # 1. located tokens: each is in exactly one sentence
    done: set[int] = set()
    while len(sequences) < batch_size and tried < cap and not cut:
        todo = [j for j in anchors if j not in done and pairs[j] not in covered]
        todo = todo[: max(1, min(batch_size - len(sequences), cap - tried))]
        if not todo:
            break
        if late(deadline):
            cut = True
            break
        done.update(todo)
        attempt(todo)
        if not converged and not cut:  # not one located token solves: the gradient is not exact (dropout, DP noise)
            return result()
    # 1b. located tokens whose solve failed from zero: once more from the mean of the certified contexts
    retry = [j for j in anchors if pairs[j] not in covered]
    while retry and found_contexts and len(sequences) < batch_size and tried < cap and not cut:
        if late(deadline):
            cut = True
            break
        n = max(1, min(batch_size - len(sequences), cap - tried))
        todo, retry = retry[:n], retry[n:]
        attempt(todo, warm=True)
        retry = [j for j in retry if pairs[j] not in covered]
    # 2. sentences without a located token: floating (token, position) pairs no certified sentence has.
    # The rank counts the batch's tokens, so with one sentence missing its [SEP] position is known.
    missing = rank - sum(len(seq) for seq in sequences)
    first = [j for j, p in enumerate(pairs) if p[0] in always_floating and p[1] == missing - 1]
    rest = sorted(
        (j for j, (t, i) in enumerate(pairs) if t in fset and t != cls_token_id and i > 0),
        key=lambda j: (pairs[j][1], pairs[j][0]),
    )
    pool = first + [j for j in rest if j not in first]
    while len(sequences) < batch_size and tried < cap and not cut:
        todo = [j for j in pool if j not in done and pairs[j] not in covered]
        todo = todo[: max(1, min(2 * (batch_size - len(sequences)), cap - tried))]
        if not todo:
            break
        if late(deadline):
            cut = True
            break
        done.update(todo)
        attempt(todo, warm=True)
    return result()


def _read_sentence(z: Tensor, pairs: Sequence[tuple[int, int]], length: int, cut: float = 0.5) -> list[int] | None:
    """The sentence ``z`` selects: one token per position from 0 up, or ``None`` if inconsistent."""
    best: dict[int, tuple[float, int]] = {}
    for j in (z > cut).nonzero().flatten().tolist():
        t, i = pairs[j]
        if i not in best or float(z[j]) > best[i][0]:
            best[i] = (float(z[j]), t)
    if not best:
        return None
    n = max(best) + 1
    if n > length or any(i not in best for i in range(n)):
        return None
    return [best[i][1] for i in range(n)]


def _certify(
    seq: list[int], tables: EmbeddingTables, layer: FirstLayer, segment: int, bases: tuple[Tensor, Tensor, Tensor]
) -> float:
    """Largest residual fraction of the sentence's layer-0 vectors outside the three gradient spans."""
    ids = torch.tensor(seq, dtype=torch.long)
    x = candidate_inputs(tables, ids, torch.arange(len(seq)), segment)[None]
    c, h1, a = layer.forward(x)
    worst = 0.0
    for vec, basis in zip((c[0], h1[0], a[0]), bases, strict=True):
        res = vec - (vec @ basis) @ basis.T
        worst = max(worst, float((res.square().sum(1) / vec.square().sum(1).clamp_min(1e-30)).max()))
    return worst


class SpanAttention(Attack):
    """Registered attack ``"span_attention"``: exact batch recovery through layer 0's attention.

    Needs the gradients of the word and position embeddings and of layer 0's ``attention.output.dense``,
    ``intermediate.dense`` and ``output.dense`` weights (the ``full`` and embeddings + layer-0 views),
    and fewer tokens in the batch than the hidden size. Training-mode gradients (dropout on) are
    detected when layer 0's query/key/value gradients are tapped too, and read by
    :func:`~leak_audit.attacks.text.span_dropout.span_attention_dropout`, which recovers the dropout masks.
    Sentences it returns are certified exact; it returns fewer than ``B`` when some could not be
    certified.

    Budget: no time limit of its own. The audit's deadline is checked after the setup (gradient spans,
    token location, dropout-mask recovery), between Levenberg-Marquardt iterations and before each
    anchor's membership solve. Stopped by it with sentences and anchors left to try, it returns the
    certified sentences so far with ``timed_out`` set and ``info["progress"]`` (e.g. ``"3 of 8 sentences
    certified, 5 anchors tried; stopped by the deadline"``).

    Args:
        units: FFN units in the context solve.
        max_anchors: cap on context solves per batch (default ``4B + 8``).
    """

    name = "span_attention"
    uses = ("token_bag",)

    def __init__(self, units: int = 512, max_anchors: int | None = None) -> None:
        if units < 1:
            raise ValueError(f"units must be >= 1, got {units}")
        if max_anchors is not None and max_anchors < 1:
            raise ValueError(f"max_anchors must be >= 1 or None, got {max_anchors}")
        self.units = units
        self.max_anchors = max_anchors

    @staticmethod
    def _grad_names(spec: TextModelSpec) -> dict[str, str]:
        layer = spec.layers[0]
        names = {
            "word": spec.word_embeddings,
            "position": spec.position_embeddings,
            "context": layer.attention_output,
            "hidden": layer.ffn_input,
            "ffn": layer.ffn_output,
        }
        # a part the model family lacks is never tapped, so requirements() reports it as missing
        return {role: name or f"<no {role} weight in {spec.family} models>" for role, name in names.items()}

    @staticmethod
    def _input_grad_names(spec: TextModelSpec) -> list[str]:
        return list(spec.layers[0].input_projections)

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        require_encoder(spec)
        if not spec.layers:
            raise NotApplicable("the model has no encoder layers")
        names = self._grad_names(spec)
        missing = [n for n in names.values() if n not in tapped]
        if missing:
            raise NotApplicable(
                "needs the gradients of the word and position embeddings and of layer 0's attention output "
                f"and FFN weights; not tapped: {', '.join(repr(m) for m in missing[:3])}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            )
        extra = [spec.token_type_embeddings] if spec.token_type_embeddings in tapped else []
        # layer 0's query/key/value gradients span its (masked) inputs: needed for training-mode gradients
        extra += [n for n in self._input_grad_names(spec) if n in tapped]
        return Requirements(
            gradients=frozenset(list(names.values()) + extra),
            params=frozenset(spec.embedding_params),
            replica=True,
        )

    def run(self, inp: AttackInput) -> Reconstruction:
        spec = inp.spec
        if inp.noise_std > 0:
            raise NotApplicable(
                f"its exact certificates need noise-free gradients; these carry DP noise (std {inp.noise_std:.3g} "
                "per coordinate): span_check, token_bag, labels and gradient_matching rank candidates under noise"
            )
        if inp.replica is None:
            raise NotApplicable("needs the model replica (layer 0's structure)")
        budget = inp.budget()
        names = self._grad_names(spec)
        grads = {role: inp.gradients[n] for role, n in names.items()}
        tables = EmbeddingTables.from_params(inp.params, spec)
        replica = inp.replica

        try:
            layer = FirstLayer.from_params(inp.params, spec.layers[0], spec.num_heads, replica.submodule)
        except UnsupportedModelError as exc:
            raise NotApplicable(str(exc)) from None
        segment = 0
        tt = inp.gradients.get(spec.token_type_embeddings) if spec.token_type_embeddings else None
        if tt is not None and bool(tt.any()):
            used = tt.abs().sum(1).nonzero().flatten().tolist()
            if len(used) > 1:
                raise NotApplicable(f"sentence pairs (token types {used}) are not supported")
            segment = int(used[0])
        inputs = [inp.gradients[n] for n in self._input_grad_names(spec) if n in inp.gradients]
        rates = _dropout_rates(spec)
        trained = bool(inputs) and rates.any and _masked_inputs(grads["word"], inputs, tables, segment, spec)
        common = {
            "segment": segment,
            "position_offset": spec.position_offset,
            "cls_token_id": spec.cls_token_id,
            "always_floating": [spec.sep_token_id] if spec.sep_token_id is not None else (),
            "max_anchors": self.max_anchors,
            "deadline": budget.deadline,
            "generator": inp.generator,
        }
        with torch.no_grad():
            if trained:
                result = span_attention_dropout(
                    {**grads, "inputs": inputs}, tables, layer, rates, inp.batch_size, sep_token_id=spec.sep_token_id,
                    **common,
                )
            else:
                result = span_attention(grads, tables, layer, inp.batch_size, units=self.units, **common)
        positions: list[list[int]] = [[] for _ in range(result.length)]
        for token, position in result.located.items():  # tokens placed at one position, certified or not
            if 0 <= position < result.length:
                positions[position].append(int(token))
        timed_out = result.cut_short and budget.audit_bound
        return Reconstruction(
            attack=self.name,
            sequences=list(result.sequences),  # none certified: an empty list scores 0, not "no metrics"
            position_candidates=positions,
            timed_out=timed_out,
            info={
                **({"progress": result.progress} if timed_out else {}),
                "certified": len(result.sequences),
                "located": len(result.located),
                "floating": len(result.floating),
                "anchors_tried": result.anchors_tried,
                "anchors_converged": result.anchors_converged,
                "rank": result.rank,
                "length": result.length,
                "dropout": trained,
            },
        )


def _dropout_rates(spec: TextModelSpec) -> DropoutRates:
    """Training-mode dropout probabilities of the embeddings and of layer 0 (from the model's spec)."""
    layer = spec.layers[0]
    return DropoutRates(spec.dropout, layer.attention_dropout, layer.attention_output_dropout)


def _masked_inputs(
    word_grad: Tensor, inputs: Sequence[Tensor], tables: EmbeddingTables, segment: int, spec: TextModelSpec
) -> bool:
    """Whether layer 0's inputs were dropped out: located tokens' ``LN(e)`` are not in the inputs' span.

    Exact (eval-mode) gradients put every true pair's input in the span (residual ≤ 1.4e-5 on 16 CoLA
    sentences, B=4); training-mode gradients leave 0.05-0.4 of its norm outside.
    """
    shifted = shift_positions(tables, spec.position_offset)
    length = shifted.position.shape[0]
    basis = span_basis(list(inputs))[0].float()
    if basis.shape[1] >= basis.shape[0] - 8:
        return False
    bag = word_grad.abs().sum(1).nonzero().flatten()[:16]
    base = shifted.position[:length].float()
    if shifted.token_type is not None:
        base = base + shifted.token_type[segment].float()
    worst = []
    for v in bag.tolist():
        e = tables.word[v].float() + base
        e = e - e.mean(1, keepdim=True)
        g = word_grad[v].float()
        i = int(((e @ g).abs() / (e.norm(dim=1) * g.norm()).clamp_min(1e-30)).argmin())
        x = candidate_inputs(shifted, torch.tensor([v]), torch.tensor([i]), segment)
        worst.append(float((x - (x @ basis) @ basis.T).norm() / x.norm()))
    return bool(worst) and min(worst) > 1e-3
