"""Shared pieces of the text optimisation attacks (:mod:`~leak_audit.attacks.text.gradient_matching`,
:mod:`~leak_audit.attacks.text.dlg`); the image inversions use its gradient distance.

Both attacks search for inputs whose gradient, computed by a :class:`~leak_audit.models.replica.ModelReplica`
at the audited step's parameters, matches the observed one. This module holds what they share: which
tapped gradients can be matched, the gradient distances (DLG's l2, TAG's l2 + l1, LAMP's cosine), the
sequence-length rule, the layout of a (padded) candidate batch, and the projection of continuous
embeddings to the nearest tokens.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from leak_audit.attacks.base import NotApplicable
from leak_audit.attacks.spans import noise_threshold, numerical_rank
from leak_audit.models import TextModelSpec
from leak_audit.models.replica import ModelReplica

__all__ = [
    "LOSSES",
    "GradientDistance",
    "Layout",
    "Objective",
    "infer_length",
    "matched_gradient_names",
    "nearest_tokens",
    "random_embeddings",
]

LOSSES: tuple[str, ...] = ("cos", "l2", "l2+l1")
"""Gradient distances: LAMP's cosine, DLG's squared l2, TAG's l2 + α·l1."""


def _math_attention():
    """Scaled-dot-product attention through differentiable primitives.

    PyTorch's fused CPU attention kernels have no double backward (``derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``), which gradient
    matching needs. The math backend computes the same function with ordinary ops.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def matched_gradient_names(spec: TextModelSpec, tapped: Collection[str]) -> list[str]:
    """The tapped parameters whose gradients an optimisation attack matches, sorted.

    Every tapped parameter of the Hugging Face model except the word-embedding table: its gradient is
    only defined for discrete token ids (a lookup), not for the continuous ``inputs_embeds`` the attacks
    optimise (the token bag attack reads it instead).

    Raises:
        NotApplicable: nothing but the word-embedding table (or nothing of the model) is tapped.
    """
    prefix = spec.hf_prefix + "." if spec.hf_prefix else ""
    names = sorted(n for n in tapped if n.startswith(prefix) and n != spec.word_embeddings)
    if not names:
        raise NotApplicable(
            "needs the gradient of at least one parameter of the model other than the word-embedding table "
            f"({spec.word_embeddings!r}), whose gradient is undefined for continuous inputs"
        )
    return names


def infer_length(
    gradients: Mapping[str, Tensor],
    spec: TextModelSpec,
    batch_size: int,
    max_length: int,
    noise_std: float = 0.0,
) -> tuple[int, str]:
    """Sequence length ``L`` (special tokens included) behind the gradients, when no seed gives it.

    In order: (1) the number of leading nonzero rows of the position-embedding gradient (exact for any
    ``B``: the longest sequence; padded positions receive no gradient); (2) at ``B = 1``, the largest
    informative :func:`~leak_audit.attacks.spans.numerical_rank` of a tapped 2-D gradient (a linear map's
    weight gradient has rank equal to the number of positions when all positions' inputs are distinct;
    weights used only at ``[CLS]`` give rank 1 and are outvoted); (3) ``max_length``. With DP noise
    (``noise_std > 0``, per coordinate) a position row counts only above pure noise's row-norm quantile
    (:func:`~leak_audit.attacks.spans.noise_threshold`), and the rank route is skipped (noise has
    full rank).

    Returns:
        ``(L, source)`` with ``source`` one of ``"position_embeddings"``, ``"rank"``, ``"max_length"``.
    """
    pos = gradients.get(spec.position_embeddings)
    if pos is not None and pos.dim() == 2:
        table = pos.detach()[spec.position_offset :].float()
        if noise_std > 0:
            rows = (table.norm(dim=1) > noise_threshold(noise_std, *table.shape)).nonzero().flatten()
        else:
            rows = (table.abs().sum(1) > 0).nonzero().flatten()
        if rows.numel():
            return min(int(rows[-1]) + 1, spec.max_positions - spec.position_offset), "position_embeddings"
    if batch_size == 1 and noise_std == 0:
        best = 0
        for name, g in gradients.items():
            if name == spec.word_embeddings or g.dim() != 2:
                continue
            rank, deficient = numerical_rank(g)
            if deficient:
                best = max(best, rank)
        if best >= 2:
            return best, "rank"
    return max_length, "max_length"


class GradientDistance:
    """Distance between candidate gradients and the observed ones (a list of tensors, same order).

    * ``"l2"`` (DLG, Zhu et al. 2019): ``Σ_k ‖g_k − g*_k‖² / Σ_k ‖g*_k‖²``. The normalisation is a
      constant factor (same minimiser) that keeps the value near 1 whatever the gradient's scale, so
      optimiser tolerances behave alike on every model.
    * ``"l2+l1"`` (TAG, Deng et al. 2021): the above plus ``α Σ_k ‖g_k − g*_k‖₁ / Σ_k ‖g*_k‖₁``.
    * ``"cos"`` (LAMP, Balunović et al. 2022): mean over tensors of ``1 − cos(g_k, g*_k)``. Per tensor,
      not one global cosine: gradient norms differ by orders of magnitude across a Transformer (the
      classifier's dominate), and a global cosine would all but ignore the early layers, which are the
      ones that pin down the tokens. Tensors whose observed gradient is numerically zero (norm below
      ``1e-6`` of the largest tensor's) are left out: the attention *key* bias, for one, has an exactly
      zero gradient (softmax is shift-invariant), so its observed value is float32 round-off
      (``~1e-12``) and its cosine is noise that would otherwise weigh as much as any real tensor.

    With DP noise of known per-coordinate std ``s`` (``noise_std``), the cosine terms are weighted by
    each tensor's estimated signal share ``w_k = max(0, 1 − s² n_k / ‖g*_k‖²)`` (``n_k`` coordinates):
    DP-SGD adds the same noise to every coordinate, so tensors with small gradients (the attention
    query and key weights of a small BERT at 1% noise: signal-to-noise 0.08) are pure noise, and their
    cosine, whose gradient grows as the candidate's tensor shrinks, would pull the search anywhere.
    Tensors whose share is below ``max(0.1, 4 √(2/n_k))`` (4 standard deviations of a pure-noise
    tensor's share) are left out. On
    the tests' small BERT at that noise, unweighted cosine matching recovered ROUGE-1 0.03 of 4 CoLA
    sentences.

    Args:
        targets: observed gradients.
        loss: one of :data:`LOSSES`.
        alpha: weight of the l1 term (``"l2+l1"`` only).
        noise_std: per-coordinate std of DP noise in ``targets`` (0: none).

    Raises:
        ValueError: unknown ``loss``, or no nonzero target.
    """

    def __init__(self, targets: Sequence[Tensor], loss: str = "cos", alpha: float = 0.01, noise_std: float = 0.0) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.loss = loss
        self.alpha = alpha
        self.targets = [t.detach().float() for t in targets]
        self.norms = [float(t.norm()) for t in self.targets]
        self.sq = sum(n * n for n in self.norms)
        self.abs = sum(float(t.abs().sum()) for t in self.targets)
        if self.sq <= 0:
            raise ValueError("every observed gradient is zero: there is nothing to match")
        top = max(self.norms)
        self.active = [k for k, n in enumerate(self.norms) if n > 1e-6 * top]
        self.weights = [1.0] * len(self.targets)
        if noise_std > 0:
            self.weights = [max(0.0, 1 - noise_std**2 * t.numel() / max(n * n, 1e-300))
                            for t, n in zip(self.targets, self.norms, strict=True)]
            # a pure-noise tensor's share fluctuates by sqrt(2/n) around 0: keep clear signal only
            self.active = [k for k in self.active
                           if self.weights[k] > max(0.1, 4 * math.sqrt(2 / self.targets[k].numel()))] or self.active

    def __call__(self, grads: Sequence[Tensor]) -> Tensor:
        """The distance (a scalar tensor, differentiable when ``grads`` are)."""
        if self.loss == "cos":
            terms = []
            for k in self.active:
                g, t = grads[k], self.targets[k]
                gn = torch.sqrt(g.square().sum() + 1e-30)
                terms.append(self.weights[k] * (1 - (g * t).sum() / (gn * self.norms[k])))
            return torch.stack(terms).sum() / max(sum(self.weights[k] for k in self.active), 1e-30)
        out = sum((g - t).square().sum() for g, t in zip(grads, self.targets, strict=True)) / self.sq
        if self.loss == "l2+l1":
            out = out + self.alpha * sum((g - t).abs().sum() for g, t in zip(grads, self.targets, strict=True)) / self.abs
        return out  # type: ignore[return-value]

    def relative(self, grads: Sequence[Tensor]) -> float:
        """Scale-invariant relative l2 distance ``min_c ‖c·g − g*‖ / ‖g*‖`` over all tensors.

        Loss-independent, and blind to a common factor (global-norm gradient clipping and loss scaling
        multiply the observed gradient by a constant). 0 up to float32 round-off (``≲ 1e-6``) for the
        true input; a single wrong token gives ``~1e-3`` or more.
        """
        g64 = [g.detach().double() for g in grads]
        t64 = [t.double() for t in self.targets]
        dot = sum(float((g * t).sum()) for g, t in zip(g64, t64, strict=True))
        gg = sum(float(g.square().sum()) for g in g64)
        c = dot / gg if gg > 0 else 0.0
        diff = sum(float((c * g - t).square().sum()) for g, t in zip(g64, t64, strict=True))
        return math.sqrt(diff / self.sq)


@dataclass
class Layout:
    """Shape of a candidate batch: per-sequence lengths, which positions are free, the fixed tokens.

    Attributes:
        lengths: ``B`` sequence lengths (special tokens included).
        template: ``[B, L_max]`` token ids of the fixed positions (``[CLS]``, ``[SEP]``, padding); free
            positions hold ``filler``.
        free: ``[B, L_max]`` bool, the positions the attack chooses.
        attention_mask: ``[B, L_max]`` int64, 1 on the first ``lengths[b]`` positions.
    """

    lengths: list[int]
    template: Tensor
    free: Tensor
    attention_mask: Tensor

    @classmethod
    def build(
        cls, lengths: Sequence[int], spec: TextModelSpec, *, fix_special: bool, device: torch.device | str | None = None
    ) -> Layout:
        """``[CLS]`` first and ``[SEP]`` last are fixed when ``fix_special`` and the spec knows their ids. The
        tensors are on ``device`` (default: the CPU).

        Raises:
            ValueError: a length below 1 (or below 2 with fixed special tokens).
        """
        lengths = [int(n) for n in lengths]
        fixed = fix_special and spec.cls_token_id is not None and spec.sep_token_id is not None
        low = 2 if fixed else 1
        if not lengths or min(lengths) < low:
            raise ValueError(f"sequence lengths must be >= {low}, got {lengths}")
        b, lmax = len(lengths), max(lengths)
        pad = spec.pad_token_id if spec.pad_token_id is not None else 0
        template = torch.full((b, lmax), pad, dtype=torch.long)
        free = torch.zeros(b, lmax, dtype=torch.bool)
        mask = torch.zeros(b, lmax, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
            if fixed:
                template[i, 0] = spec.cls_token_id  # type: ignore[assignment]
                template[i, n - 1] = spec.sep_token_id  # type: ignore[assignment]
                free[i, 1 : n - 1] = True
            else:
                free[i, :n] = True
        return cls(lengths, template.to(device), free.to(device), mask.to(device))

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def ids(self, free_ids: Tensor) -> Tensor:
        """``[B, L_max]`` ids: ``free_ids`` (``[B, L_max]``) at free positions, the template elsewhere."""
        return torch.where(self.free, free_ids, self.template)

    def sequences(self, ids: Tensor) -> list[list[int]]:
        """The unpadded sequences of ``[B, L_max]`` ids."""
        return [ids[i, :n].tolist() for i, n in enumerate(self.lengths)]

    def from_sequences(self, seqs: Sequence[Sequence[int]]) -> Tensor:
        """``[B, L_max]`` ids of sequences whose lengths match :attr:`lengths` (template elsewhere)."""
        out = self.template.clone()
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=out.device)
        return self.ids(out)


def random_embeddings(shape: Sequence[int], table: Tensor, generator: torch.Generator) -> Tensor:
    """Gaussian embeddings with the table's per-coordinate mean and standard deviation: ``[*shape]``."""
    t = table.detach().float()
    mean, std = t.mean(0), t.std(0)
    noise = torch.randn(*shape, generator=generator, dtype=torch.float32)  # the attack's own (CPU) generator
    return mean + std * noise.to(t.device)


def nearest_tokens(embeds: Tensor, table: Tensor, vocabulary: Tensor, k: int = 1) -> Tensor:
    """The ``k`` tokens of ``vocabulary`` whose embeddings are nearest (cosine) to each row of ``embeds``.

    Args:
        embeds: ``[..., d]`` continuous embeddings.
        table: ``[V, d]`` word-embedding table.
        vocabulary: ``[K]`` candidate token ids.
        k: neighbours per row (capped at ``K``).

    Returns:
        ``[..., k]`` int64 token ids, nearest first.
    """
    cand = torch.nn.functional.normalize(table.detach().float()[vocabulary], dim=-1)
    e = torch.nn.functional.normalize(embeds.detach().float(), dim=-1)
    top = (e @ cand.T).topk(min(k, vocabulary.numel()), dim=-1).indices
    return vocabulary[top]


class Objective:
    """Gradients a candidate input produces at the snapshot's parameters, and their distance to the observed.

    Args:
        replica: the model to run.
        params: snapshot parameter values (root-relative names).
        names: the matched parameters (root-relative), aligned with ``distance.targets``.
        distance: the gradient distance.
        layout: the candidate batch's shape (its attention mask is used).
    """

    def __init__(
        self,
        replica: ModelReplica,
        params: Mapping[str, Tensor],
        names: Sequence[str],
        distance: GradientDistance,
        layout: Layout,
    ) -> None:
        self.replica = replica
        self.params = params
        self.names = list(names)
        self.distance = distance
        self.layout = layout
        self.table = replica.input_embeddings(params).detach()
        self.evaluations = 0

    def embed(self, free: Tensor) -> Tensor:
        """``[B, L_max, d]`` inputs: ``free`` (``[B, L_max, d]``) at free positions, fixed tokens elsewhere."""
        fixed = self.table[self.layout.template]
        return torch.where(self.layout.free[..., None], free, fixed)

    def grads_embeds(self, embeds: Tensor, labels: Tensor, create_graph: bool) -> list[Tensor]:
        """Gradients of the matched parameters for ``inputs_embeds`` ``[B, L_max, d]`` and ``labels``
        (``[B]`` class ids or ``[B, C]`` probabilities); differentiable w.r.t. both when ``create_graph``."""
        self.evaluations += 1
        ctx = _math_attention() if create_graph else nullcontext()
        with ctx:
            return self.replica.gradients(
                self.params, self.names, labels=labels, create_graph=create_graph,
                inputs_embeds=embeds, attention_mask=self.layout.attention_mask,
            )

    def grads_ids(self, ids: Tensor, labels: Tensor) -> list[Tensor]:
        """Gradients of the matched parameters for token ids ``[B, L_max]`` (the real model's lookup)."""
        self.evaluations += 1
        return self.replica.gradients(
            self.params, self.names, labels=labels, input_ids=ids, attention_mask=self.layout.attention_mask
        )

    def score_ids(self, ids: Tensor, labels: Tensor) -> tuple[float, float]:
        """``(distance, relative l2 distance)`` of token ids ``[B, L_max]``."""
        with torch.no_grad():
            g = self.grads_ids(ids, labels)
            return float(self.distance(g)), self.distance.relative(g)
