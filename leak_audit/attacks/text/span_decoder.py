"""Exact text from a decoder's first layers: DAGER's decoder path, done our way.

Follows Petrov, Dimitrov, Baader, Müller, Vechev, "DAGER: Exact Gradient Inversion for Large Language
Models" (NeurIPS 2024), §4-5, for causal decoders (GPT-2, the Llama family). A linear map's weight gradient
is ``∂L/∂W = Σ_t δ_t x_tᵀ``: its row space spans the inputs ``x_t`` of the positions that received
gradient, as long as they number fewer than the input size ``d``. The attack reads that twice:

1. **Candidates.** Layer 0's attention projections read ``Norm(E[v] (+ P[i]))``. Under rotary positions
   (Llama family) these carry no position, so every vocabulary row is ranked by its relative residual to
   the row space of the stacked ``q/k/v`` gradients; the rows under :attr:`SpanDecoder.threshold` are the
   candidate tokens. ``q_proj`` alone misses the first position (one key: the softmax is constant) and
   the last; ``k_proj`` and ``v_proj`` see the first. With learned positions (GPT-2) a candidate is a
   (token, position) pair, ranked position by position until a position has none; GPT-2's fused
   ``c_attn`` is a ``Conv1D`` stored transposed, so its gradient's columns span the inputs.
2. **Left-to-right assembly.** Position ``i`` of a causal model depends on tokens ``0..i`` only. Starting
   from single tokens, every live prefix is extended by every candidate, the replica runs the new
   position through layer 0 (one key/value-cached step, stopping before the rest of the model:
   :meth:`~leak_audit.models.replica.ModelReplica.module_inputs`), and an extension survives when the new
   position's inputs to the *check* maps lie in their gradients' row spaces: layer 0's attention output
   and feed-forward maps, layer 1's attention projections (whatever is tapped). A prefix no candidate
   extends is finished.
3. **The last token** (causal LM). The last position predicts nothing, so no weight gradient below the
   head sees it: the prefixes end one token short. It is the target of the position before, and the LM
   head's gradient (``Σ_t (p_t − e_{y_t}) h_tᵀ / N``, tied to the input embedding in many decoders) holds
   it: with the finished prefixes the replica computes every known term, and the remaining rows are
   ``−Σ_b h_b / N`` at each sentence's last target, solved by least squares against the prefixes' final
   hidden states ``h_b``. Without the head's gradient (LoRA, or layers 0-1 tapped) the position before the
   last token still carries its loss alone: the check map's gradient there is matched against the model's
   likeliest next tokens (:func:`~leak_audit.attacks.text.decoder_pursuit.last_tokens_by_matching`); it needs
   every trainable weight in the snapshot (the adapters under LoRA; a fully fine-tuned model tapped below
   the head skips it, and ``info`` says so).

Degenerate case: a run of one repeated token (``"the the"`` at the very start) gives the same hidden state at
every position of the run, so such extensions are refused unless their inputs differ. With only layer 0's
attention projections tapped (one linear, e.g. ``v_proj``) the candidates come back as an exact token bag.
Fewer sentences than the batch holds are marked lower bounds (:func:`~leak_audit.attacks.gaps.decoder_sentences_gap`).

Exact while the batch's positions fit: distinct tokens below ``d`` at layer 0, and ``B·n`` below each check map's
input size. Under DP-SGD noise nothing lies in a span exactly: the rows are ranked against the directions above the
noise edge (:func:`~leak_audit.attacks.text.decoder_candidates.ranked_bag`, also the fallback where the sparse
recovery beyond LoRA's rank does not close), giving a partial token bag (rotary decoders).

**LoRA** (base weights frozen): the adapters' ``A`` gradients ``s·Bᵀ Σ_t δ_t x_tᵀ`` ``[r, d]`` stand in for the
projections' (layer 0's candidates, layer 1's check). Their rows mix the inputs, so they hold each input only
while the positions number at most about ``r`` per adapter (q and v stacked: ``2r``); the steps above then
apply unchanged. Beyond that rank no input lies in the row space, but the rows are still combinations of the
batch's inputs alone: :mod:`~leak_audit.attacks.text.decoder_pursuit` recovers the token bag and then the
prefix tree by joint sparse recovery (exact on SmolLM2 at r = 8 up to B = 8 CoLA sentences; SST-2 reviews at
B = 4 ROUGE-1 0.991, B = 8 0.594: a pursuit that stops without explaining the gradient marks its sentence metrics
as lower bounds, :func:`~leak_audit.attacks.gaps.decoder_pursuit_gap`; a bag that does not close, as under
``lora_dropout``, its token metrics, :func:`~leak_audit.attacks.gaps.decoder_bag_gap`). ``lora_B = 0``: nothing.

**Massive activations.** Trained adapters can give a few row directions singular values ``10⁴``-``10⁷`` times the
rest (SmolLM2 after 50 steps, CoLA dev 44-47: 650 and 335, then 0.032 to 4.9e-5). The rank read at ``rtol`` then
falls short of the rows (11 of 16) and the span test passes a couple of tokens. When the candidates' inputs do not
span the rows (:func:`~leak_audit.attacks.text.decoder_candidates.unexplained`), the rows are read as saturated, and
the token bag and the prefix pursuit run on :func:`~leak_audit.attacks.spans.balanced_rows`, every direction weighed
alike down to float32's round-off, which also sets their stopping and acceptance levels (:data:`BALANCED_ACCEPT`,
:data:`BALANCED_PATIENCE`, :data:`BALANCED_MARGIN`)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from leak_audit.attacks.base import (Attack, AttackInput, Budget, NotApplicable, Reconstruction, Requirements,
                                     require_layers)
from leak_audit.attacks.budget import late
from leak_audit.attacks.gaps import decoder_bag_gap, decoder_ends_gap, decoder_pursuit_gap, decoder_sentences_gap
from leak_audit.attacks.spans import balanced_rows, span_basis
from leak_audit.attacks.text.decoder_candidates import (candidate_tokens, candidates_by_position, ranked_bag,
                                                        unexplained)
from leak_audit.attacks.text.decoder_peeling import peel_sentences
from leak_audit.attacks.text.decoder_pursuit import last_tokens_by_matching, leaf_coefficients, pursue_prefixes
from leak_audit.attacks.text.sparse_bag import sparse_bag
from leak_audit.models import EmbeddingTables, TextModelSpec
from leak_audit.models.replica import ModelReplica
from leak_audit.results.records import LOWER_BOUND

__all__ = ["CheckMap", "SpanDecoder", "check_maps", "input_rows", "layer0_rows", "lora_blocks"]

BALANCED_ACCEPT = 3.0
"""Under massive activations (:func:`~leak_audit.attacks.spans.balanced_rows`), a recovery closes below this many
times the rows' round-off level in the balanced frame."""

BALANCED_MARGIN = 4.0
"""Under massive activations a last token is also matched when it fits this many times better than any other
candidate (:func:`~leak_audit.attacks.text.decoder_pursuit.last_tokens_by_matching`)."""

BALANCED_PATIENCE = 16
"""Under massive activations the token bag's picks stop once this many in a row leave the residual above 0.9 of what
it was: the round-off floor (SmolLM2, CoLA dev 44-47: the 23 true tokens first, then ~1-3% per false pick)."""


@dataclass(frozen=True)
class CheckMap:
    """Linear maps that read the same prefix-dependent input, and the module whose input is captured.

    Attributes:
        module: root-relative module name whose (first positional) input is the maps' input.
        weights: the tapped weight names reading that input; their gradients are stacked row-wise.
    """

    module: str
    weights: tuple[str, ...]
    transposed: bool = False


def input_rows(grad: Tensor, transposed: bool) -> Tensor:
    """A weight gradient as rows that span the map's inputs: ``grad`` ``[d_out, d_in]`` (``nn.Linear``), or its
    transpose for a weight stored ``[d_in, d_out]`` (GPT-2's ``Conv1D``)."""
    return grad.T if transposed else grad


def _module_of(weight: str) -> str:
    module = weight.rsplit(".", 1)[0]
    return module[: -len(".base_layer")] if module.endswith(".base_layer") else module


def check_maps(spec: TextModelSpec, tapped: Collection[str]) -> list[CheckMap]:
    """The tapped maps whose inputs depend on the prefix: layer 0's attention output, feed-forward input and
    output projections (each its own input), then layer 1's attention input projections (stacked: they
    share their input; ``q_proj`` alone misses the first position)."""
    out: list[CheckMap] = []
    first = spec.layers[0]
    for w in (first.attention_output, first.ffn_input, first.ffn_output):
        if w is not None and w in tapped:
            out.append(CheckMap(_module_of(w), (w,), first.transposed))
    if len(spec.layers) > 1:
        second = [w for w in spec.layers[1].input_projections if w in tapped]
        if second:
            # the module called first reads the input (Llama: q_proj); any of them sees the same tensor
            out.append(CheckMap(_module_of(spec.layers[1].query), tuple(second), spec.layers[1].transposed))
        else:  # LoRA: the A matrices' gradients span (part of) the same inputs
            adapters = [a for a in spec.layers[1].lora if a.a in tapped]
            if adapters:
                out.append(CheckMap(adapters[0].module, tuple(a.a for a in adapters)))
    return out


def lora_blocks(spec: TextModelSpec, tapped: Collection[str], depth: int = 4) -> list[CheckMap]:
    """The tapped LoRA adapters of layers ``1 .. depth − 1``, one map per layer (its adapters' ``A`` gradients
    stacked): beyond the adapters' rank every layer's rows constrain the same positions, and the sparse recovery
    of the prefixes reads them together (:func:`~leak_audit.attacks.text.decoder_pursuit.pursue_prefixes`)."""
    out = []
    for layer in spec.layers[1:depth]:
        adapters = [a for a in layer.lora if a.a in tapped]
        if not adapters:
            break
        out.append(CheckMap(adapters[0].module, tuple(a.a for a in adapters)))
    return out


def layer0_rows(spec: TextModelSpec, tapped: Collection[str]) -> list[tuple[str, bool]]:
    """The tapped gradients whose rows span layer 0's attention inputs, with whether each is stored transposed:
    the attention projections' weights, or else (LoRA fine-tuning, base weights frozen) their adapters' ``A``
    matrices (``[r, d]``: each row a mix of the inputs, so the span holds them only while they number ≤ r)."""
    layer = spec.layers[0]
    base = [(w, layer.transposed) for w in layer.input_projections if w in tapped]
    return base or [(a.a, False) for a in layer.lora if a.a in tapped]


def _residuals(x: Tensor, basis: Tensor) -> Tensor:
    """Relative residual ``‖x − V Vᵀ x‖ / ‖x‖`` of each row of ``x`` ``[..., d]``, in ``basis``'s dtype (float32
    suffices to separate true inputs, about 1e-6, from others, above 1e-2)."""
    x = x.to(basis.dtype)
    proj = (x @ basis) @ basis.T
    return torch.linalg.vector_norm(x - proj, dim=-1) / torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-30)


class SpanDecoder(Attack):
    """Registered attack ``"span_decoder"``: exact sentences from a causal decoder's first layers (DAGER).

    Args:
        threshold: relative residual below which an input counts as inside a gradient's row space. True
            inputs sit near float32 round-off (``1e-8 … 1e-5``), others above ``1e-2`` on SmolLM2.
        rtol: relative singular-value tolerance of the row spaces.
        max_seconds: the attack's own time limit (``inf``: none; the audit's budget still applies).
        max_length: longest sentence assembled, in tokens.
        last_token_candidates: rows of the LM head's gradient compared per sentence for its last token (LoRA
            beyond its rank with a frozen head: four times as many of the model's likeliest next tokens).
        bag_margin: where the sparse recovery does not close (below), the partial bag keeps the rows whose
            residual is below this fraction of the vocabulary's floor (:func:`ranked_bag`).
        pursuit_tol: relative residual at which the sparse recoveries of LoRA beyond its rank stop
            (:mod:`~leak_audit.attacks.text.decoder_pursuit`; float32 gradients: round-off near ``1e-7``).
        pursuit_accept: the token bag's recovery counts as complete below this relative residual; above it the
            ranked partial bag is returned instead.
        peel: where the prefix pursuit does not close (LoRA, rotary positions), certify whole sentences among its
            leaves, subtract them and pursue again (:mod:`~leak_audit.attacks.text.decoder_peeling`; a whole-model
            forward/backward per leaf and round).
    """

    name = "span_decoder"
    cost = "search"

    def __init__(self, threshold: float = 1e-3, rtol: float = 1e-6, max_seconds: float = math.inf,
                 max_length: int = 512, last_token_candidates: int = 8, bag_margin: float = 0.8,
                 pursuit_tol: float = 1e-6, pursuit_accept: float = 1e-4, peel: bool = True) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if not 0 < rtol < 1:
            raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length!r}")
        if not 0 < bag_margin < 1:
            raise ValueError(f"bag_margin must be in (0, 1), got {bag_margin!r}")
        if not 0 < pursuit_tol <= pursuit_accept < 1:
            raise ValueError(f"need 0 < pursuit_tol <= pursuit_accept < 1, got {pursuit_tol!r} and {pursuit_accept!r}")
        self.threshold, self.rtol, self.max_seconds, self.max_length = threshold, rtol, max_seconds, max_length
        self.last_token_candidates, self.bag_margin = last_token_candidates, bag_margin
        self.pursuit_tol, self.pursuit_accept, self.peel = pursuit_tol, pursuit_accept, peel

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:  # type: ignore[override]
        require_layers(spec)
        if not getattr(spec, "causal", False):
            raise NotApplicable("reads causal decoders (GPT-2, the Llama family); encoders are read by span_check")
        first = [w for w, _ in layer0_rows(spec, tapped)]
        if not first:
            raise NotApplicable("needs the gradient of layer 0's attention projections (q_proj/k_proj/v_proj or "
                                "c_attn, or their LoRA adapters); tap layer 0 (e.g. modules='model.layers.0')")
        checks = check_maps(spec, tapped)  # none (one linear of layer 0 tapped): the candidates, as a bag
        grads = set(first) | {w for c in checks + lora_blocks(spec, tapped) for w in c.weights}
        # the assembly runs layers 0 and 1 only; the last-token step runs the whole model (every trainable weight
        # copied): always with the LM head's gradient, and without it under LoRA (only the adapters train), where
        # the last token is matched at the adapters; a fully fine-tuned model tapped below the head skips it
        scope: tuple[str, ...] | None = tuple(layer.prefix for layer in spec.layers[:2])
        if spec.lm_head is not None and spec.lm_head in tapped and spec.classifier_weight is None:
            grads.add(spec.lm_head)
            scope = None
        elif checks and set(checks[-1].weights) <= {a.a for layer in spec.layers[:2] for a in layer.lora}:
            scope = None
        return Requirements(gradients=frozenset(grads), params=frozenset(spec.embedding_params), replica=True,
                            replica_scope=scope)

    def run(self, inp: AttackInput) -> Reconstruction:
        if not isinstance(inp.replica, ModelReplica) or not isinstance(inp.spec, TextModelSpec):
            raise NotApplicable("runs the decoder's first layers, but no text model replica was given")
        budget = inp.budget(self.max_seconds)
        spec, replica, params = inp.spec, inp.replica, inp.params
        first = [input_rows(inp.gradients[w], transposed) for w, transposed in layer0_rows(spec, inp.gradients)]
        if not any(bool(g.any()) for g in first):  # e.g. LoRA at initialisation: lora_B = 0, so dL/dA = 0
            return Reconstruction(attack=self.name, sequences=[], info={"rank_layer0": 0, "candidates": 0})
        tables = EmbeddingTables.from_params(params, spec)
        if inp.noise_std > 0:  # DP-SGD: nothing lies in a noised span exactly; rank rows against its signal part
            if spec.position_scheme == "absolute":
                raise NotApplicable("ranks position-free inputs under DP noise (rotary decoders); GPT-2's "
                                    "(token, position) inputs need noise-free gradients")
            bag, floor = ranked_bag(first, tables, self.rtol, self.bag_margin, noise_std=inp.noise_std)
            info_dp: dict[str, object] = {"noised": 1, "bag_floor": round(floor, 4), "bag": int(bag.numel())}
            return Reconstruction(attack=self.name, token_bag=sorted(bag.tolist()), info=info_dp)
        device = next(iter(params.values())).device
        per_position: list[Tensor] | None = None
        scan_cut, rank_read = False, None
        rows0 = sum(int(g.shape[0]) for g in first)
        rank0 = int(span_basis(first, rtol=self.rtol)[0].shape[1]) if spec.position_scheme == "absolute" else 0
        if rank0 >= min(rows0, tables.word.shape[-1]):
            # GPT-2 LoRA beyond its rank: no (token, position) pair lies in the span; the bag and prefixes by pursuit
            tokens = torch.zeros(0, dtype=torch.long)
        elif spec.position_scheme == "absolute":  # a candidate input is a (token, position) pair
            per_position, rank0, scan_cut = candidates_by_position(first, tables, self.threshold, self.rtol,
                                                                   self.max_length, budget.deadline)
            tokens = torch.cat(per_position).unique() if per_position else torch.zeros(0, dtype=torch.long)
            per_position = [t.to(device) for t in per_position]
        else:
            tokens, _, rank0 = candidate_tokens(first, tables, self.threshold, self.rtol)
            if rank0 < rows0 < tables.word.shape[-1] and unexplained(first, tables, tokens) > self.pursuit_accept:
                # the candidates do not span the rows: the rank was read too low (massive activations push directions
                # under rtol), so no input lies in the row space and the rows are read as saturated
                rank_read, rank0 = rank0, rows0
        checks = check_maps(spec, inp.gradients.keys())
        bases = [span_basis([input_rows(inp.gradients[w], c.transposed) for w in c.weights], rtol=self.rtol)[0]
                 for c in checks]
        info: dict[str, object] = {"rank_layer0": rank0, "candidates": int(tokens.numel()),
                                   "check_ranks": ",".join(str(b.shape[1]) for b in bases)}
        info.update({"candidate_positions": len(per_position)} if per_position is not None else {})
        info.update({"rank_read": rank_read} if rank_read is not None else {})
        saturated = per_position is None and rank0 >= min(rows0, tables.word.shape[-1])

        def partial_bag(cut: bool = False, **mark: str) -> Reconstruction:
            # more inputs than the row space has dimensions (LoRA's A gradients: 2r rows): none inside it exactly, but
            # those that dominate it sit far below every other row. ``cut``: the deadline stopped the sparse recovery
            bag, floor = ranked_bag(first, tables, self.rtol, self.bag_margin)
            info.update(saturated=1, bag_floor=round(floor, 4), bag=int(bag.numel()), **mark)
            return Reconstruction(attack=self.name, token_bag=sorted(bag.tolist()), info=info,  # a bag, no order
                                  timed_out=cut and budget.audit_bound)

        if saturated and rows0 >= tables.word.shape[-1]:  # B·n >= d: a full span; rows pass it by chance
            return partial_bag()
        # massive activations (the rank read too low): every row direction weighed alike, to its round-off level
        balanced = rank_read is not None
        accept = self.pursuit_accept
        if saturated and balanced:  # the sparsest vocabulary set, kept whole up to the noise floor (a superset)
            rows_b, noise = balanced_rows(first)
            accept = max(accept, BALANCED_ACCEPT * noise)
            read = sparse_bag([rows_b], tables, noise / 2, budget.deadline, patience=BALANCED_PATIENCE, prune=False)
            info["balanced_noise"] = float(f"{noise:.3g}")
        elif saturated:  # LoRA beyond its rank: the sparsest vocabulary set whose inputs span the rows
            read = sparse_bag(first, tables, self.pursuit_tol, budget.deadline)
        if saturated:
            tokens, bag_residual, bag_cut = read.tokens, read.residual, read.cut
            info.update(saturated=1, candidates=int(tokens.numel()), bag_residual=float(f"{bag_residual:.3g}"))
            if bag_cut or bag_residual > accept or tokens.numel() == 0:  # not closed: the ranked bag
                gap = decoder_bag_gap(bag_residual, accept, bag_cut)
                return partial_bag(cut=bag_cut, **({LOWER_BOUND: gap} if gap else {}))
        if tokens.numel() == 0:  # nothing in the span, or the deadline stopped the scan first (then: a timeout)
            return Reconstruction(attack=self.name, sequences=[], info=info, timed_out=scan_cut and budget.audit_bound)
        if not checks:  # no map whose inputs depend on the prefix is tapped: the exact bag, without order
            info["order"] = "missing: no tapped map depends on the prefix (layer 0's o_proj/MLP, layer 1's attention)"
            return Reconstruction(attack=self.name, token_bag=sorted(tokens.tolist()), info=info)
        # a check span with as many dimensions as its rows or inputs (LoRA beyond its rank, B·n >= d) accepts every
        # extension: it is dropped, and without any other check the exact candidates stay a bag
        check_rows = [sum(int(input_rows(inp.gradients[w], c.transposed).shape[0]) for w in c.weights) for c in checks]
        kept = [(c, b) for c, b, n in zip(checks, bases, check_rows, strict=True) if b.shape[1] < min(n, b.shape[0])]
        if len(kept) < len(checks):
            info["saturated_checks"] = len(checks) - len(kept)
        # a saturated check with fewer rows than inputs (LoRA's A beyond its rank) still fixes the prefixes: joint
        # sparse recovery over the prefix tree (decoder_pursuit); one that does not close is marked a lower bound
        # (beyond layer 0's rank the batch has more positions than a check of as many rows: saturated too, whatever
        # rank its singular values show)
        sparse = [c for c, b, n in zip(checks, bases, check_rows, strict=True)
                  if (b.shape[1] >= n or (saturated and tokens.numel() >= n)) and n < b.shape[0]
                  and per_position is None]
        if sparse and (saturated or not kept):
            c = sparse[-1]  # layer 1's adapters, read with those of the next layers
            blocks = lora_blocks(spec, inp.gradients.keys()) or [c]
            rows = [[input_rows(inp.gradients[w], b.transposed) for w in b.weights] for b in blocks]
            tol = self.pursuit_tol
            if balanced:  # each block in its own balanced frame; stop under, accept near, the largest round-off
                weighed = [balanced_rows(r) for r in rows]
                noise = max(n for _, n in weighed)
                rows, tol, accept = [[r] for r, _ in weighed], noise / 2, max(self.pursuit_accept, BALANCED_ACCEPT * noise)
            prefixes, more, cut = pursue_prefixes(replica, params, [b.module for b in blocks], rows, tokens.to(device),
                                                  tol=tol, max_length=self.max_length, deadline=budget.deadline)
            gap = decoder_pursuit_gap(more, accept, len(prefixes), inp.batch_size)
            info.update(more, order="pursuit", prefixes=len(prefixes), **({LOWER_BOUND: gap} if gap else {}))
            if gap and self.peel and not balanced and not cut and spec.position_scheme != "absolute" \
                    and replica.trainable <= inp.params.keys() and (peeled := self._peel(
                        inp, spec, replica, params, tables, blocks, tokens.to(device), prefixes, info, budget)):
                return peeled
            cut = cut or bool(info.get("peel_cut"))  # the deadline stopped a peeling that certified nothing
            return self._finish(inp, spec, replica, params, prefixes[: inp.batch_size], tokens, info, cut,
                                budget.audit_bound, c, balanced=balanced)
        if not kept:
            info["order"] = "missing: every check span is saturated"
            return Reconstruction(attack=self.name, token_bag=sorted(tokens.tolist()), info=info)
        checks, bases = [c for c, _ in kept], [b for _, b in kept]
        prefixes, cut = self._assemble(replica, params, checks, bases, tokens.to(device), inp.batch_size,
                                       budget.deadline, per_position)
        info["prefixes"] = len(prefixes)
        covered = len({t for p in prefixes for t in p} & set(tokens.tolist()))
        if not cut and covered < 0.5 * tokens.numel():  # near saturation the candidates hold, their order does not
            info["order"] = f"missing: the assembly placed {covered} of {int(tokens.numel())} candidates"
            return Reconstruction(attack=self.name, token_bag=sorted(tokens.tolist()), info=info)
        return self._finish(inp, spec, replica, params, prefixes, tokens, info, cut, budget.audit_bound, checks[-1])

    def _finish(self, inp: AttackInput, spec: TextModelSpec, replica: ModelReplica, params: Mapping[str, Tensor],
                prefixes: list[list[int]], tokens: Tensor, info: dict[str, object], cut: bool,
                audit_bound: bool, check: CheckMap, balanced: bool = False) -> Reconstruction:
        """The prefixes with their last tokens: from the LM head's gradient where tapped, else matched at ``check``
        (``balanced``: the rows were read in the balanced frame, so a clear best match counts and an unmatched end is
        marked)."""
        sequences = prefixes
        head = spec.lm_head if spec.lm_head in inp.gradients and spec.classifier_weight is None else None
        if prefixes and head is not None and not cut:
            sequences = self._last_tokens(replica, params, inp.gradients[head], prefixes)
            info["last_token"] = "lm_head"
        elif spec.classifier_weight is None and cut:
            info["last_token"] = "missing: the deadline cut the assembly"
        elif spec.classifier_weight is None and len(prefixes) != inp.batch_size:
            info["last_token"] = f"missing: {len(prefixes)} sentences found for a batch of {inp.batch_size}"
        elif spec.classifier_weight is None and not replica.trainable <= inp.params.keys():
            # the matching runs the whole model; trainable weights outside the snapshot may have moved on since
            info["last_token"] = "missing: the LM head's gradient is not tapped and the snapshot holds layers 0-1 only"
        elif spec.classifier_weight is None:
            rows = [input_rows(inp.gradients[w], check.transposed) for w in check.weights]
            coefficients = leaf_coefficients(replica, params, check.module, rows, prefixes)
            last = last_tokens_by_matching(replica, params, check.weights, prefixes, coefficients,
                                           candidates=4 * self.last_token_candidates,
                                           margin=BALANCED_MARGIN if balanced else None)
            info["last_token"] = f"matched at {check.module}: {sum(t is not None for t in last)} of {len(last)}"
            sequences = [p + [t] if t is not None else p for p, t in zip(prefixes, last, strict=True)]
            if LOWER_BOUND not in info and (gap := decoder_ends_gap(balanced, last)):
                info[LOWER_BOUND] = gap  # read at round-off level, an unmatched end may be a sentence cut short
        if LOWER_BOUND not in info and (gap := decoder_sentences_gap(len(prefixes), inp.batch_size, cut)):
            info[LOWER_BOUND] = gap
        return Reconstruction(attack=self.name, sequences=sequences, token_bag=sorted(tokens.tolist()),
                              info=info, timed_out=cut and audit_bound)

    def _peel(self, inp: AttackInput, spec: TextModelSpec, replica: ModelReplica, params: Mapping[str, Tensor],
              tables: EmbeddingTables, blocks: Sequence[CheckMap], tokens: Tensor, prefixes: list[list[int]],
              info: dict[str, object], budget: Budget) -> Reconstruction | None:
        """Certified sentences peeled off an unclosed pursuit (LoRA ``A`` rows of layer 0), or ``None`` if none."""
        first = [w for w, _ in layer0_rows(spec, inp.gradients)]
        if not set(first) <= {a.a for a in spec.layers[0].lora}:  # base weights tapped: no adapters to peel from
            return None
        used = {w: inp.gradients[w] for w in dict.fromkeys([*first, *(w for b in blocks for w in b.weights)])}

        def pursue(grads: Mapping[str, Tensor]) -> tuple[list[list[int]], bool, bool]:
            rows = [[input_rows(grads[w], b.transposed) for w in b.weights] for b in blocks]
            leaves, more, cut = pursue_prefixes(replica, params, [b.module for b in blocks], rows, tokens,
                                                tol=self.pursuit_tol, max_length=self.max_length,
                                                deadline=budget.deadline)
            return leaves, float(more["pursuit_residual"]) <= self.pursuit_accept, cut  # type: ignore[arg-type]

        inputs = tables.normalize(tables.word[tokens.to(tables.word.device)].to(torch.float64))
        out = peel_sentences(replica, params, used, first, tokens, inputs, prefixes, pursue, inp.batch_size,
                             deadline=budget.deadline)
        if not out.sentences:  # tried: the record says so
            info.update(certified=0, **({"peel_cut": 1} if out.cut else {}))
            return None
        info.update(certified=len(out.sentences), peel_rounds=out.rounds, peel_closed=int(out.closed),
                    last_token=f"certified: {len(out.sentences)} of {inp.batch_size}")
        if len(out.sentences) == inp.batch_size:  # every sentence certified by its own exact gradient
            info.pop(LOWER_BOUND, None)
        sequences = out.sentences + out.leaves[: max(0, inp.batch_size - len(out.sentences))]
        return Reconstruction(attack=self.name, sequences=sequences, token_bag=sorted(tokens.tolist()), info=info,
                              timed_out=out.cut and budget.audit_bound)

    # ------------------------------------------------------------------ assembly
    def _assemble(
        self,
        replica: ModelReplica,
        params: Mapping[str, Tensor],
        checks: Sequence[CheckMap],
        bases: Sequence[Tensor],
        tokens: Tensor,
        batch_size: int,
        deadline: float,
        per_position: Sequence[Tensor] | None = None,
    ) -> tuple[list[list[int]], bool]:
        """Grow prefixes left to right; return the finished ones and whether the deadline cut the search.
        ``per_position``: the candidates of each position (learned positions); ``None``: ``tokens`` everywhere."""

        def at(position: int) -> Tensor:
            if per_position is None:
                return tokens
            return per_position[position] if position < len(per_position) else tokens[:0]

        modules = [c.module for c in checks]
        width = max(4 * batch_size, 16)  # live prefixes kept (sentences may share a prefix)
        tokens = at(0)
        cache = replica.new_cache()  # layer 0's keys and values of the live prefixes, grown one position a step
        with torch.no_grad():
            seen = replica.module_inputs(params, modules, tokens[:, None], cache=cache)
        score = self._score(seen, modules, bases, self.threshold)[:, 0]
        keep = (score < self.threshold).nonzero().flatten()
        keep = keep[score[keep].argsort()][:width]
        live = [[int(tokens[i])] for i in keep]
        cache.batch_select_indices(keep)
        last = [[seen[m][i, 0] for m in modules] for i in keep]
        finished: list[list[int]] = []
        while live:
            if late(deadline):
                return finished + live, True
            tokens = at(len(live[0]))
            n = int(tokens.numel())
            if len(live[0]) >= self.max_length or n == 0:
                finished += live
                break
            with torch.no_grad():
                seen, score = self._extend(replica, params, modules, bases, cache, tokens, len(live))
            score = score.view(len(live), n)
            ok = (score < self.threshold).nonzero()
            if ok.numel():
                # a repeated token at a prefix made of it reproduces the previous hidden state: no new information
                rows = ok[:, 0] * n + ok[:, 1]
                same = torch.stack([
                    torch.linalg.vector_norm(seen[m][rows] - prev, dim=-1) <= 1e-6 * torch.linalg.vector_norm(prev, dim=-1)
                    for q, m in enumerate(modules)
                    for prev in [torch.stack([last[int(j)][q] for j in ok[:, 0]])]
                ]).all(0)
                ok = ok[~same]
            if ok.numel() == 0:
                finished += live
                break
            extended = {int(j) for j in ok[:, 0]}
            finished += [p for j, p in enumerate(live) if j not in extended]
            order = score[ok[:, 0], ok[:, 1]].argsort()[:width]
            pairs = ok[order]
            live = [live[int(j)] + [int(tokens[int(i)])] for j, i in pairs]
            chosen = pairs[:, 0] * n + pairs[:, 1]
            cache.batch_select_indices(chosen)
            last = [[seen[m][int(r)] for m in modules] for r in chosen]
        finished.sort(key=len, reverse=True)
        return finished[:batch_size], False

    def _extend(
        self,
        replica: ModelReplica,
        params: Mapping[str, Tensor],
        modules: Sequence[str],
        bases: Sequence[Tensor],
        cache: Any,
        tokens: Tensor,
        live: int,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Every live prefix extended by every candidate (row ``j·n + i``: prefix ``j``, candidate ``i``): the
        check maps' inputs ``{module: [live·n, d_in]}`` (zeros where a row failed early) and the scores
        ``[live·n]``. Two passes: the first check map alone (layer 0's attention output: the forward stops
        before the MLP), then the whole check only for the rows it kept; ``cache`` ends holding every row."""
        n = int(tokens.numel())
        rows = tokens.repeat(live)[:, None]
        cache.batch_repeat_interleave(n)
        length = cache.get_seq_length()
        first = replica.module_inputs(params, modules[:1], rows, cache=cache)[modules[0]][:, 0]
        score = _residuals(first, bases[0].to(device=first.device, dtype=torch.float32)).to(torch.float32)
        seen = {m: first.new_zeros(0) for m in modules}
        alive = (score < self.threshold).nonzero().flatten()
        if len(modules) == 1 or alive.numel() == 0:
            seen[modules[0]] = first
            return seen, score
        # the rest of the check for the kept rows, on a copy of their cache cut back to the prefixes
        sub = replica.new_cache()
        for layer in range(len(cache.layers)):
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
            if keys is not None and keys.numel():
                sub.update(keys[alive, :, :length], values[alive, :, :length], layer)
        rest = replica.module_inputs(params, modules, rows[alive], cache=sub)
        part = self._score(rest, modules, bases, self.threshold)[:, 0]
        score[alive] = torch.maximum(score[alive], part)
        for m in modules:
            full = rest[m].new_zeros(rows.shape[0], rest[m].shape[-1])
            full[alive] = rest[m][:, 0]
            seen[m] = full
        return seen, score

    @staticmethod
    def _score(seen: Mapping[str, Tensor], modules: Sequence[str], bases: Sequence[Tensor], threshold: float
               ) -> Tensor:
        """The largest relative residual over the check maps, ``[M, k]``: exact for rows under ``threshold``; a
        row is dropped at the first map it fails (its score is then that map's residual, already too large).
        Layer 1's map, the last and most selective, goes first."""
        first = seen[modules[0]]
        score = torch.zeros(first.shape[:-1], dtype=torch.float32, device=first.device)
        alive = torch.ones_like(score, dtype=torch.bool)
        for m, b in reversed(list(zip(modules, bases, strict=True))):
            r = _residuals(seen[m][alive], b.to(device=first.device, dtype=torch.float32)).to(torch.float32)
            score[alive] = torch.maximum(score[alive], r)
            alive &= score < threshold
            if not bool(alive.any()):
                break
        return score

    # ------------------------------------------------------------------ the last token
    def _last_tokens(
        self, replica: ModelReplica, params: Mapping[str, Tensor], head_grad: Tensor, prefixes: list[list[int]]
    ) -> list[list[int]]:
        """Append each prefix's last token, read from the LM head's gradient (see the module docstring)."""
        b = len(prefixes)
        lengths = [len(p) for p in prefixes]
        width = max(lengths)
        pad = 0
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prefixes], dtype=torch.long,
                           device=head_grad.device)
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.long, device=head_grad.device)
        with torch.no_grad():
            out = replica.forward(params, input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = out.hidden_states[-1].to(torch.float64)  # [b, width, d]: the final norm's output, the head's input
        p = out.logits.to(torch.float64).softmax(-1)  # [b, width, V]
        total = sum(lengths)  # targets in the batch: every position but each sentence's last
        last_h = torch.stack([h[s, lengths[s] - 1] for s in range(b)])  # [b, d]
        pinv = torch.linalg.pinv(last_h)  # [d, b]; the remainder's rows are −Σ_b e_{y_b} h_bᵀ (+ lookup rows)
        coef = -(total * (head_grad.to(torch.float64) @ pinv))  # [V, b]: how much of each h_b every row holds
        for s in range(b):
            n = lengths[s]
            hp = h[s, :n] @ pinv  # [n, b]
            coef += p[s, :n].T @ hp  # the Σ_t p_t h_tᵀ term
            coef.index_add_(0, ids[s, 1:n], -hp[: n - 1])  # the known targets' −e_y h_tᵀ term
        # A row holding other gradient too (the embedding lookup of a token that also occurs in a prefix, when
        # the head is tied) can reach a large coefficient without being explained by the h_b: among each
        # sentence's top rows, prefer the one whose remainder the h_b explain, with a coefficient near 1.
        top = coef.topk(min(self.last_token_candidates, coef.shape[0]), dim=0).indices  # [k, b]
        rows = top.flatten().unique()
        remainder = total * head_grad[rows].to(torch.float64)
        for s in range(b):
            n = lengths[s]
            remainder -= p[s, :n, rows].T @ h[s, :n]
            hit = ids[s, 1:n, None] == rows[None, :]  # [n-1, r]
            remainder += hit.to(h.dtype).T @ h[s, : n - 1]
        fitted = -(remainder @ pinv) @ last_h  # the remainder's part in the span of the h_b, [r, d]
        misfit = torch.linalg.vector_norm(remainder + fitted, dim=-1) / torch.linalg.vector_norm(remainder, dim=-1)
        where = {int(v): i for i, v in enumerate(rows)}
        out = []
        for s, prefix in enumerate(prefixes):
            cands = top[:, s].tolist()
            penalty = [float(misfit[where[v]]) + abs(float(coef[v, s]) - 1.0) for v in cands]
            out.append(prefix + [int(cands[min(range(len(cands)), key=penalty.__getitem__)])])
        return out

