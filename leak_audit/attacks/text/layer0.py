"""Encoder layer 0 as the span-attention attacks read it, shared by the dropout-off and dropout-on searches.

:mod:`~leak_audit.attacks.text.span_attention` (exact, eval-mode gradients) and
:mod:`~leak_audit.attacks.text.span_dropout` (training-mode gradients) recover a batch from layer 0 of a
BERT encoder (after Petrov et al., "DAGER: Exact Gradient Inversion for Large Language Models", NeurIPS
2024, see those modules for the method). Both need the layer's values (:class:`FirstLayer`), its dropout
probabilities (:class:`DropoutRates`), the inputs of candidate (token, position) pairs
(:func:`candidate_inputs`, :func:`shift_positions`), the positions of tokens that occur once
(:func:`locate_tokens`) and return one result type (:class:`SpanAttentionResult`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from leak_audit.attacks.base import NotApplicable
from leak_audit.models import EmbeddingTables

__all__ = [
    "DropoutRates",
    "FirstLayer",
    "SpanAttentionResult",
    "candidate_inputs",
    "locate_tokens",
    "shift_positions",
]


@dataclass(frozen=True)
class FirstLayer:
    """Parameter values and constants of encoder layer 0 (BERT layout).

    Shapes: ``wq, wk, wv, wo`` ``[d, d]`` with biases ``[d]``; ``w1`` ``[d_ff, d]``, ``b1`` ``[d_ff]``;
    LayerNorm weight/bias ``[d]``. The layer's output projection is not needed: the attack stops at the
    FFN activations (its *gradient* spans them).
    """

    wq: Tensor
    bq: Tensor
    wk: Tensor
    bk: Tensor
    wv: Tensor
    bv: Tensor
    wo: Tensor
    bo: Tensor
    ln1_weight: Tensor
    ln1_bias: Tensor
    ln1_eps: float
    w1: Tensor
    b1: Tensor
    heads: int
    act: torch.nn.Module

    @property
    def head_size(self) -> int:
        return self.wq.shape[0] // self.heads

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor], prefix: str, module: torch.nn.Module) -> FirstLayer:
        """Read layer ``prefix`` (root-relative) from ``params``; constants from the replica's ``module``.

        Raises:
            NotApplicable: a parameter is missing or the layer is not BERT-shaped.
        """
        names = {
            "wq": "attention.self.query.weight", "bq": "attention.self.query.bias",
            "wk": "attention.self.key.weight", "bk": "attention.self.key.bias",
            "wv": "attention.self.value.weight", "bv": "attention.self.value.bias",
            "wo": "attention.output.dense.weight", "bo": "attention.output.dense.bias",
            "ln1_weight": "attention.output.LayerNorm.weight", "ln1_bias": "attention.output.LayerNorm.bias",
            "w1": "intermediate.dense.weight", "b1": "intermediate.dense.bias",
        }  # fmt: skip
        missing = [f"{prefix}.{n}" for n in names.values() if f"{prefix}.{n}" not in params]
        if missing:
            raise NotApplicable(f"layer 0 is not a plain BERT layer (no {missing[0]!r})")
        try:
            attn = module.attention.self
            heads = int(attn.num_attention_heads)
            ln1_eps = float(module.attention.output.LayerNorm.eps)
            act = module.intermediate.intermediate_act_fn
        except AttributeError as err:
            raise NotApplicable(f"layer 0 is not a BERT layer ({err})") from None
        if getattr(attn, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise NotApplicable("relative position embeddings are not supported")
        vals = {k: params[f"{prefix}.{n}"].detach().float() for k, n in names.items()}
        return cls(heads=heads, ln1_eps=ln1_eps, act=act, **vals)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Layer 0 on inputs ``x`` ``[N, L, d]`` (``mask`` ``[N, L]``, 1 = token).

        Returns:
            ``(c, h1, a)``: attention contexts ``[N, L, d]``, post-attention LayerNorm outputs ``[N, L, d]``
            and FFN activations ``[N, L, d_ff]`` (the inputs of ``output.dense``).
        """
        n, length, d = x.shape
        h, dh = self.heads, self.head_size
        q = F.linear(x, self.wq, self.bq).view(n, length, h, dh).transpose(1, 2)
        k = F.linear(x, self.wk, self.bk).view(n, length, h, dh).transpose(1, 2)
        v = F.linear(x, self.wv, self.bv).view(n, length, h, dh).transpose(1, 2)
        s = q @ k.transpose(-1, -2) * dh**-0.5
        if mask is not None:
            s = s.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        c = (s.softmax(-1) @ v).transpose(1, 2).reshape(n, length, d)
        h1 = F.layer_norm(F.linear(c, self.wo, self.bo) + x, (d,), self.ln1_weight, self.ln1_bias, self.ln1_eps)
        a = self.act(F.linear(h1, self.w1, self.b1))
        return c, h1, a


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
