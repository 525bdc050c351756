"""Encoder layer 0 as the span-attention attacks read it, shared by the dropout-off and dropout-on searches.

:mod:`~leak_audit.attacks.text.span_attention` (exact, eval-mode gradients) and
:mod:`~leak_audit.attacks.text.span_dropout` (training-mode gradients) recover a batch from layer 0 of a
BERT encoder (after Petrov et al., "DAGER: Exact Gradient Inversion for Large Language Models", NeurIPS
2024, see those modules for the method). Both need the layer's values (:class:`~leak_audit.models.first_layer.FirstLayer`,
from the model layer), its dropout
probabilities (:class:`DropoutRates`), the inputs of candidate (token, position) pairs
(:func:`candidate_inputs`, :func:`shift_positions`), the positions of tokens that occur once
(:func:`locate_tokens`) and return one result type (:class:`SpanAttentionResult`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from leak_audit.models import EmbeddingTables
from leak_audit.models.first_layer import FirstLayer

__all__ = [
    "DropoutRates",
    "FirstLayer",
    "SpanAttentionResult",
    "candidate_inputs",
    "locate_tokens",
    "shift_positions",
]


@dataclass(frozen=True)
class DropoutRates:
    """Dropout probabilities of layer 0 in training mode (BERT: all ``0.1``).

    Attributes:
        embeddings: after the embedding LayerNorm (``hidden_dropout_prob``).
        attention: on the attention probabilities (``attention_probs_dropout_prob``).
        hidden: on the attention output projection (``hidden_dropout_prob``).
    """

    embeddings: float
    attention: float
    hidden: float

    def __post_init__(self) -> None:
        for name in ("embeddings", "attention", "hidden"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"dropout rate {name} must be in [0, 1), got {value}")

    @property
    def any(self) -> bool:
        return max(self.embeddings, self.attention, self.hidden) > 0.0


@dataclass
class SpanAttentionResult:
    """Output of :func:`~leak_audit.attacks.text.span_attention.span_attention` and
    :func:`~leak_audit.attacks.text.span_dropout.span_attention_dropout`.

    Attributes:
        sequences: certified sentences (token ids, ``[CLS]`` … ``[SEP]``), in discovery order.
        located: ``{token: position}`` of tokens at one position; ``floating`` the others.
        anchors_tried, anchors_converged: context solves run and solved.
        rank: rank of the attention-output gradient (``= number of tokens`` when exact).
        cut_short: the deadline stopped the search while sentences and anchors were left to try.
        progress: how far it got, a short string (e.g. ``"3 of 8 sentences certified, 5 anchors tried"``).
    """

    sequences: list[list[int]]
    located: dict[int, int]
    floating: list[int]
    anchors_tried: int
    anchors_converged: int
    rank: int
    length: int
    cut_short: bool = False
    progress: str = ""

    @staticmethod
    def describe(sequences: int, batch_size: int, tried: int, stage: str = "") -> str:
        """The ``progress`` line: sentences certified of ``B`` and anchors tried (``stage``: where it stopped)."""
        done = f"{sequences} of {batch_size} sentences certified, {tried} anchors tried"
        return f"{done}; {stage}" if stage else done


def candidate_inputs(tables: EmbeddingTables, tokens: Tensor, positions: Tensor, segment: int) -> Tensor:
    """Layer-0 inputs ``LN(E[v] + P[i] + T[s])`` for pairs ``(tokens[n], positions[n])``: ``[n, d]`` float32.

    ``positions`` index ``tables.position`` as it is: pass tables made by :func:`shift_positions` when the
    model's positions start at an offset. Dropout is not applied.
    """
    e = tables.word[tokens].float() + tables.position[positions].float()
    if tables.token_type is not None:
        e = e + tables.token_type[segment].float()
    return F.layer_norm(e, (e.shape[-1],), tables.norm_weight.float(), tables.norm_bias.float(), tables.norm_eps)


def shift_positions(tables: EmbeddingTables, offset: int) -> EmbeddingTables:
    """``tables`` whose position table starts at row ``offset`` (RoBERTa: pad + 1), so position ``i`` is row ``i``.

    Only the ``position`` tensor is sliced (``position_offset`` is kept); :func:`candidate_inputs` and
    :func:`locate_tokens` index it directly.
    """
    if not offset:
        return tables
    return replace(tables, position=tables.position[offset:])


def locate_tokens(
    word_grad: Tensor,
    tables: EmbeddingTables,
    length: int,
    segment: int = 0,
    tol: float = 1e-7,
    loose: float = 1e-5,
    always_floating: Collection[int] = (),
) -> tuple[dict[int, int], list[int]]:
    """Find the position of every token that occurs at one position only, by LayerNorm orthogonality.

    Args:
        word_grad: ``[V, d]`` gradient of the word-embedding table.
        tables: embedding tables and LayerNorm at the audited step.
        length: positions ``0 .. length-1`` to test (the nonzero rows of the position-embedding gradient).
        segment: the token-type id of the batch.
        tol: a token is located at ``i`` when ``|cos(∂L/∂E[v], C(E[v] + P[i] + T[s]))| < tol`` (``C``
            centres a vector). On MiniLM (float32) tokens at one position score at most 4.5e-8; tokens at
            several positions at least 1.8e-7 (one occurrence can dominate the sum), usually ~1e-3.
        loose: tokens scoring between ``tol`` and ``loose`` are located *and* floating (kept as
            candidates everywhere, never used as anchors).
        always_floating: token ids that are floating whatever their score (e.g. ``[SEP]``, which ends
            every sentence).

    Returns:
        ``(located, floating)``: ``{token: position}`` and the tokens (sorted) that may occur at several
        positions. A token is in both when its location is uncertain.
    """
    bag = word_grad.abs().sum(1).nonzero().flatten()
    located: dict[int, int] = {}
    floating: list[int] = []
    pos = torch.arange(length)
    base = tables.position[pos].float()
    if tables.token_type is not None:
        base = base + tables.token_type[segment].float()
    for v in bag.tolist():
        gv = word_grad[v].float()
        e = tables.word[v].float() + base
        e = e - e.mean(1, keepdim=True)
        cos = (e @ gv).abs() / (e.norm(dim=1) * gv.norm()).clamp_min(1e-30)
        j = int(cos.argmin())
        if float(cos[j]) < loose:
            located[v] = j
        if float(cos[j]) >= tol or v in always_floating:
            floating.append(v)
    return located, sorted(floating)
