"""Layer 0 of a post-LayerNorm encoder (BERT, DistilBERT) as values and a forward: :class:`FirstLayer`.

The span-attention attacks (:mod:`~leak_audit.attacks.text.span_attention`, after Petrov et al., "DAGER",
NeurIPS 2024) run candidate inputs through layer 0 with snapshot weights: attention, the output projection
and residual, the post-attention LayerNorm, and the feed-forward input map and activation. The parameter and
module names come from the layer's :class:`~leak_audit.models.spec.EncoderLayerSpec`, so the attacks never
spell an architecture's names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leak_audit.models.hf import UnsupportedModelError
from leak_audit.models.spec import EncoderLayerSpec

__all__ = ["FirstLayer"]


@dataclass(frozen=True)
class FirstLayer:
    """Parameter values and constants of layer 0 of a post-LayerNorm encoder (BERT, DistilBERT).

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
    def from_params(
        cls, params: Mapping[str, Tensor], layer: EncoderLayerSpec, heads: int, module: Callable[[str], nn.Module]
    ) -> FirstLayer:
        """Read layer 0 from ``params`` by the names in its spec; constants (LayerNorm epsilon, activation,
        position type) from ``module(name)``, which returns the replica's module of a root-relative name.

        Raises:
            UnsupportedModelError: a parameter or module is missing, the projections are fused, or positions
                are relative (the layer is not a plain post-LayerNorm encoder layer).
        """
        if layer.fused or layer.attention_norm is None or layer.ffn_activation is None:
            raise UnsupportedModelError(f"layer 0 ({layer.prefix}) is not a post-LayerNorm encoder layer with "
                                        "separate query/key/value projections")
        if layer.attention_output is None or layer.ffn_input is None or heads < 1:
            raise UnsupportedModelError(f"layer 0 ({layer.prefix}) names no attention output or FFN input map")

        def bias(weight: str) -> str:
            return weight[: -len("weight")] + "bias"

        names = {
            "wq": layer.query, "bq": bias(layer.query), "wk": layer.key, "bk": bias(layer.key),
            "wv": layer.value, "bv": bias(layer.value),
            "wo": layer.attention_output, "bo": bias(layer.attention_output),
            "ln1_weight": f"{layer.attention_norm}.weight", "ln1_bias": f"{layer.attention_norm}.bias",
            "w1": layer.ffn_input, "b1": bias(layer.ffn_input),
        }  # fmt: skip
        missing = [n for n in names.values() if n not in params]
        if missing:
            raise UnsupportedModelError(f"layer 0 is not a plain post-LayerNorm encoder layer (no {missing[0]!r})")
        try:
            norm = module(layer.attention_norm)
            act = module(layer.ffn_activation)
            attention = module(layer.modules[0].rsplit(".", 1)[0])
        except (AttributeError, KeyError) as err:
            raise UnsupportedModelError(f"layer 0 is not a plain post-LayerNorm encoder layer ({err})") from None
        if getattr(attention, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise UnsupportedModelError("relative position embeddings are not supported")
        vals = {k: params[n].detach().float() for k, n in names.items()}
        return cls(heads=heads, ln1_eps=float(norm.eps), act=act, **vals)  # type: ignore[arg-type]

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
