"""Peeling for decoders: certify whole sentences from layer 0's adapter gradients, subtract them, pursue again.

The batch loss of causal-LM fine-tuning is the mean of every sentence's next-token losses over the batch's ``N``
targets, so the gradient is ``(1/N) Σ_s ∇ℓ_s`` and the sentences do not interact (each attends to itself; padding
is masked). Layer 0 reads ``Norm(E[v])``, the same at every position under rotary positions, so the rows of its
adapters' ``A`` gradients split exactly over the bag's tokens (:func:`token_columns`: ``[rows, K]``). A token that
occurs once in the batch holds the part of its single occurrence, which depends on its own sentence only, and one
forward/backward of a candidate sentence alone (:func:`sentence_gradients`) predicts those columns up to the
common scale ``1/N`` (:func:`certify`). On SmolLM2 with LoRA r = 8 the true sentences of SST-2 dev 8-15 fit to
9e-7 to 1.7e-6 at the scale 1/211; the check is not local: a sentence cut after its next token misfits by 0.31 to
1.40 (``docs/decoders.md``).

A certified sentence's exact gradient, times that scale, is subtracted from every tapped adapter, and the prefix
pursuit of :mod:`~leak_audit.attacks.text.decoder_pursuit` runs again on the fewer sentences left
(:func:`peel_sentences`). On SST-2 dev 16-23 (B = 8, 159 prefixes, a pursuit that did not close) the rounds
certified 1, 1 and 3 sentences, after which the pursuit closed on the last 3. Certifying whole sentences and
subtracting them is the idea of :mod:`~leak_audit.attacks.text.peeling` (encoders); the decoder's columns and the
loop are ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.models.replica import ModelReplica

__all__ = ["CERTIFY_TOL", "PeelResult", "certify", "next_token_gradients", "peel_sentences", "sentence_gradients",
           "token_columns"]

CERTIFY_TOL = 1e-4
"""Largest relative misfit of a token's predicted column that counts as a fit (true sentences: about 1e-6)."""

CERTIFY_SHARE = 0.4
"""A sentence is certified when at least this share of its distinct tokens (and at least 3) fit at one scale:
tokens that also occur in other sentences hold their parts too and do not fit."""


def token_columns(rows: Tensor, inputs_pinv: Tensor) -> Tensor:
    """Split input-spanning gradient rows ``[..., k, d]`` over the bag's inputs: ``[..., k, K]``.

    Args:
        rows: gradient rows whose span lies in that of the bag's inputs (layer 0 of a rotary decoder).
        inputs_pinv: ``[d, K]`` the pseudo-inverse of the bag's inputs ``[K, d]``.
    """
    return rows.to(inputs_pinv.dtype) @ inputs_pinv


def sentence_gradients(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    weights: Sequence[str],
    sentences: Sequence[Sequence[int]],
    *,
    chunk: int = 16,
) -> Tensor:
    """Each sentence's own gradient of its summed next-token losses w.r.t. linear ``weights`` (LoRA ``A`` matrices).

    One batched forward/backward per ``chunk`` sentences: hooks keep each module's input ``x`` and the gradient ``g``
    at its output, and the weight gradient of a sentence is ``Σ_t g_t x_tᵀ`` over its positions.

    Args:
        replica: the model replica (runs the whole model).
        params: parameter values by root-relative name.
        weights: root-relative weight names ``[r_i, d]``, stacked in this order.
        sentences: token ids, at least 2 each.

    Returns:
        ``[S, Σ r_i, d]`` float64.

    Raises:
        ValueError: a sentence shorter than 2 tokens.
    """
    if any(len(s) < 2 for s in sentences):
        raise ValueError("every sentence needs at least 2 tokens (one next-token target)")
    out: list[Tensor] = []
    for start in range(0, len(sentences), chunk):
        part = sentences[start:start + chunk]
        ids, mask = _padded(part, params)
        targets = [list(s[1:]) for s in part]
        out.append(_target_gradients(replica, params, weights, ids, mask, [targets])[0])
    return torch.cat(out)


def next_token_gradients(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    weights: Sequence[str],
    prefixes: Sequence[Sequence[int]],
    k: int,
    *,
    chunk: int = 8,
) -> tuple[list[list[int]], Tensor]:
    """The model's ``k`` likeliest next tokens after each prefix, and the gradient of each prefix so completed.

    A sentence's last token is only a target: no loss reads its position, so ``prefix + [y]`` has the gradient of
    the prefix's own losses plus ``−log p(y | prefix)``, all from one forward of the prefix. The ``k`` completions
    share that forward and take one backward each (against ``k + 1`` forwards and ``k`` backwards of the
    completed sentences with :func:`sentence_gradients`, which gives the same gradients).

    Args:
        replica: the model replica (runs the whole model).
        params: parameter values by root-relative name.
        weights: root-relative weight names ``[r_i, d]``, stacked in this order.
        prefixes: token ids, at least 1 each.
        k: completions per prefix (at most the vocabulary).
        chunk: prefixes per forward.

    Returns:
        ``(tokens, grads)``: ``tokens[b]`` the ``k`` next tokens of prefix ``b``, likeliest first; ``grads``
        ``[len(prefixes), k, Σ r_i, d]`` float64, the gradient of ``prefixes[b] + [tokens[b][j]]``.

    Raises:
        ValueError: an empty prefix or ``k < 1``.
    """
    if any(len(p) < 1 for p in prefixes) or k < 1:
        raise ValueError(f"need non-empty prefixes and k >= 1, got k = {k}")
    tokens: list[list[int]] = []
    out: list[Tensor] = []
    for start in range(0, len(prefixes), chunk):
        part = prefixes[start:start + chunk]
        ids, mask = _padded(part, params)
        chosen: list[list[int]] = []

        def pick(last: Tensor) -> list[list[int]]:
            chosen.extend(last.topk(min(k, last.shape[-1]), dim=-1).indices.tolist())
            return [[list(p[1:]) + [chosen[b][j]] for b, p in enumerate(part)] for j in range(len(chosen[0]))]

        grads = _target_gradients(replica, params, weights, ids, mask, pick)  # [k][b, Σ r, d]
        tokens.extend(chosen)
        out.append(torch.stack(grads, 1))
    return tokens, torch.cat(out)


def _target_gradients(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    weights: Sequence[str],
    ids: Tensor,
    mask: Tensor,
    targets: Sequence[Sequence[Sequence[int]]] | Callable[[Tensor], Sequence[Sequence[Sequence[int]]]],
) -> list[Tensor]:
    """Per-sentence weight gradients ``[b, Σ r_i, d]`` of summed next-token losses, one per set of targets.

    ``targets[j][b]`` are the targets of row ``b`` of ``ids`` for the ``j``-th backward, one per position from the
    first (a target at the row's last input is a token not among its inputs); a callable gets the log-probabilities
    at each row's last input ``[b, V]`` and returns them. One forward, then one backward per set.
    """
    names = [w.removesuffix(".weight") for w in weights]
    modules = [replica.submodule(n) for n in names]
    seen: dict[int, tuple[Tensor, Tensor]] = {}

    def grab(module: torch.nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        # a module fed by an earlier one stays in the graph (its gradient reaches the earlier one through it)
        y = output if output.requires_grad else output.detach().requires_grad_(True)
        seen[id(module)] = (args[0].detach(), y)
        return y

    handles = [m.register_forward_hook(grab) for m in modules]
    rows = torch.arange(ids.shape[0], device=ids.device)
    lengths = mask.sum(1)
    try:
        with torch.enable_grad():
            logp = replica.forward(params, input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
            sets = targets(logp[rows, lengths - 1].detach()) if callable(targets) else targets
            outs = [seen[id(m)][1] for m in modules]
            result = []
            for j, per_row in enumerate(sets):
                tgt, valid = _padded(per_row, params)  # [b, ≤ L]: targets from the first position on
                loss = -(logp[:, : tgt.shape[1]].gather(-1, tgt[..., None])[..., 0] * valid).sum()
                grads = torch.autograd.grad(loss, outs, retain_graph=j + 1 < len(sets))
                result.append(torch.cat([torch.einsum("bnr,bnd->brd", g.double() * mask[..., None],
                                                      seen[id(m)][0].double())
                                         for m, g in zip(modules, grads, strict=True)], 1))
    finally:
        for h in handles:
            h.remove()
    return result


def certify(observed: Tensor, predicted: Tensor, columns: Sequence[int], *, tol: float = CERTIFY_TOL,
            share: float = CERTIFY_SHARE) -> float | None:
    """The scale at which a candidate sentence's predicted token columns fit the observed ones, or ``None``.

    Args:
        observed: ``[k, K]`` the batch's token columns (:func:`token_columns`).
        predicted: ``[k, K]`` the candidate's own (from :func:`sentence_gradients`).
        columns: the bag indices of the candidate's distinct tokens that carry a loss (all but its last position).
        tol: largest relative misfit of a fitting token.
        share: least share of ``columns`` that must fit (and at least 3).

    Returns:
        The scale (``1/N``, positive) when enough tokens fit at the median of their own scales; ``None`` otherwise.
    """
    if not columns:
        return None
    p, o = predicted[:, list(columns)], observed[:, list(columns)]
    scales = (p * o).sum(0) / (p * p).sum(0).clamp_min(1e-300)
    scale = float(scales.median())
    if not scale > 0.0:
        return None
    misfit = torch.linalg.vector_norm(scale * p - o, dim=0) / torch.linalg.vector_norm(o, dim=0).clamp_min(1e-300)
    fits = int((misfit < tol).sum())
    return scale if fits >= max(3, math.ceil(share * len(columns))) else None


@dataclass
class PeelResult:
    """What :func:`peel_sentences` certified, and the last pursuit's leaves.

    Attributes:
        sentences: the certified sentences, whole (their last token included), in the order found.
        leaves: the last pursuit's uncertified leaves (prefixes, no last token).
        rounds: pursuits run after the first; closed: whether the last pursuit closed.
        cut: whether the deadline stopped it.
    """

    sentences: list[list[int]] = field(default_factory=list)
    leaves: list[list[int]] = field(default_factory=list)
    rounds: int = 0
    closed: bool = False
    cut: bool = False


def peel_sentences(
    replica: ModelReplica,
    params: Mapping[str, Tensor],
    gradients: Mapping[str, Tensor],
    first: Sequence[str],
    tokens: Tensor,
    inputs: Tensor,
    leaves: Sequence[Sequence[int]],
    pursue: Callable[[Mapping[str, Tensor]], tuple[list[list[int]], bool, bool]],
    batch_size: int,
    *,
    next_tokens: int = 4,
    chunk: int = 8,
    deadline: float | None = None,
) -> PeelResult:
    """Certify sentences among the leaves, subtract them, pursue again, until the batch is read or nothing certifies.

    Args:
        replica: the model replica (the whole model: every trainable weight must be in ``params``).
        params: parameter values by root-relative name.
        gradients: the gradients the pursuit reads (LoRA ``A`` of layers 0-3), by root-relative name; each
            certified sentence is subtracted from all of them.
        first: layer 0's adapter ``A`` weights (keys of ``gradients``), whose rows span the bag's inputs.
        tokens: the bag ``[K]`` (exact: every token of the batch but those seen only last).
        inputs: ``[K, d]`` the bag's layer-0 inputs ``Norm(E[v])``.
        leaves: the first pursuit's leaves.
        pursue: runs the prefix pursuit on gradients with the same names; returns ``(leaves, closed, cut)``.
        batch_size: sentences in the batch.
        next_tokens: the model's likeliest next tokens tried after each leaf.
        chunk: leaves completed and differentiated per forward (:func:`next_token_gradients`).
        deadline: ``time.monotonic()`` value after which it stops (between rounds and chunks of leaves); the
            sentences certified before it are kept.

    Returns:
        A :class:`PeelResult`.
    """
    bag = [int(v) for v in tokens.tolist()]
    index = {v: k for k, v in enumerate(bag)}
    pinv = torch.linalg.pinv(inputs.to(next(iter(gradients.values())).device, torch.float64))  # [d, K]
    work = {k: v.to(torch.float64) for k, v in gradients.items()}
    names = list(work)
    result = PeelResult(leaves=[list(p) for p in leaves])
    while len(result.sentences) < batch_size:
        if late(deadline):
            result.cut = True
            break
        observed = token_columns(torch.cat([work[w] for w in first]), pinv)
        found: list[tuple[list[int], float]] = []
        candidates = [p for p in result.leaves if len(p) >= 2 and all(t in index for t in p)]
        for start in range(0, len(candidates), chunk):
            if late(deadline):
                result.cut = True
                break
            part = candidates[start:start + chunk]
            ys, grads = next_token_gradients(replica, params, first, part, next_tokens, chunk=chunk)
            predicted = token_columns(grads, pinv)  # [b, k, rows, K]
            for b, p in enumerate(part):
                columns = sorted({index[t] for t in p})
                for y, pred in zip(ys[b], predicted[b], strict=True):
                    sentence = p + [y]
                    scale = certify(observed, pred, columns)
                    if scale is not None and sentence not in result.sentences and all(sentence != s for s, _ in found):
                        found.append((sentence, scale))
                        break
        if not found:
            break
        found = found[: batch_size - len(result.sentences)]
        whole = sentence_gradients(replica, params, names, [s for s, _ in found])  # [S, Σ r, d]
        for (sentence, scale), g in zip(found, whole, strict=True):
            for w, part in zip(names, g.split([work[w].shape[0] for w in names]), strict=True):
                work[w] = work[w] - scale * part
            result.sentences.append(sentence)
        if len(result.sentences) >= batch_size:
            result.cut = False
            break
        if result.cut or late(deadline):  # what the round certified is kept
            result.cut = True
            break
        result.leaves, result.closed, cut = pursue({k: v.to(torch.float32) for k, v in work.items()})
        result.rounds += 1
        if cut:
            result.cut = True
            break
    return result


def _padded(sentences: Sequence[Sequence[int]], params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``sentences`` right-padded (id 0, masked) on the parameters' device: ``ids``, ``mask`` ``[b, L]``."""
    device = next(iter(params.values())).device
    ids = torch.zeros(len(sentences), max(len(s) for s in sentences), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(sentences):
        ids[b, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[b, : len(s)] = 1
    return ids, mask
