"""Layer 0's attention inputs, computed from snapshot tensors: :class:`EmbeddingTables`.

The span-check attacks (Petrov et al., "DAGER: Exact Gradient Inversion for Large Language Models",
NeurIPS 2024) test candidate inputs of the first attention layer against the row space of its weight
gradient. What those inputs are is model knowledge, described by the
:class:`~leak_audit.models.spec.TextModelSpec`:

    x(v, i, s) = Norm(E_word[v] + E_pos[i + offset] + E_type[s])

with ``Norm`` the first-layer normalisation (:data:`~leak_audit.models.spec.NormKind`: LayerNorm for the
BERT family, RMSNorm for the Llama family), ``E_pos`` the learned position table (an all-zero table when
positions are rotary or absent: layer 0's inputs then carry no position) and ``E_type`` the segment table
(BERT only). Dropout, when on, comes after ``Norm`` in the BERT family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from leak_audit.models.spec import NormKind, TextModelSpec

__all__ = ["EmbeddingTables"]


@dataclass(frozen=True)
class EmbeddingTables:
    """The tensors that define layer 0's inputs.

    Attributes:
        word: ``[V, d]`` token embeddings.
        position: ``[P, d]`` position embeddings (all zeros, as an expanded view, when the model has no
            learned absolute positions).
        token_type: ``[T, d]`` segment embeddings, or ``None``.
        norm_weight, norm_bias: ``[d]`` normalisation affine parameters (``norm_bias`` all zeros for
            RMSNorm, which has none); ``norm_eps`` its epsilon.
        position_offset: index of position 0 in ``position`` (2 for RoBERTa, 0 for BERT).
        norm_kind: ``"layernorm"`` or ``"rmsnorm"`` (see :data:`~leak_audit.models.spec.NormKind`).
    """

    word: Tensor
    position: Tensor
    token_type: Tensor | None
    norm_weight: Tensor
    norm_bias: Tensor
    norm_eps: float
    position_offset: int = 0
    norm_kind: NormKind = "layernorm"

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor], spec: TextModelSpec) -> EmbeddingTables:
        """Read the tables named by ``spec`` from ``params`` (root-relative parameter names).

        Raises:
            KeyError: ``params`` lacks one of ``spec.embedding_params``.
            ValueError: the spec names no first-layer normalisation (a ``"generic"`` spec: layers unknown).
        """
        if spec.norm_weight is None:
            raise ValueError(f"the {spec.family} spec of {spec.model_type!r} does not know layer 0's inputs")
        word = params[spec.word_embeddings]
        weight = params[spec.norm_weight]
        if spec.position_embeddings is not None:
            position = params[spec.position_embeddings]
        else:
            position = word.new_zeros(1, word.shape[-1]).expand(max(spec.max_positions, 1), -1)
        tt = params[spec.token_type_embeddings] if spec.token_type_embeddings else None
        return cls(
            word=word,
            position=position,
            token_type=tt,
            norm_weight=weight,
            norm_bias=params[spec.norm_bias] if spec.norm_bias is not None else torch.zeros_like(weight),
            norm_eps=spec.norm_eps,
            position_offset=spec.position_offset,
            norm_kind=spec.norm_kind,
        )

    @property
    def max_length(self) -> int:
        """Positions the table covers: ``P - position_offset``."""
        return int(self.position.shape[0]) - self.position_offset

    @property
    def num_token_types(self) -> int:
        """Rows of the segment table (1 without one)."""
        return 1 if self.token_type is None else int(self.token_type.shape[0])

    def normalize(self, z: Tensor) -> Tensor:
        """The first-layer normalisation of ``z`` ``[..., d]`` in ``z``'s dtype (affine parameters cast to it).

        LayerNorm: ``γ ⊙ (z − mean z) / √(var z + ε) + β``; RMSNorm: ``γ ⊙ z / √(mean z² + ε)``.
        """
        weight = self.norm_weight.to(z.dtype)
        if self.norm_kind == "rmsnorm":
            return torch.nn.functional.rms_norm(z, z.shape[-1:], weight, self.norm_eps)
        return torch.nn.functional.layer_norm(z, z.shape[-1:], weight, self.norm_bias.to(z.dtype), self.norm_eps)

    def layer_inputs(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """``Norm(word + position + type)`` for ``input_ids`` ``[B, L]``: returns ``[B, L, d]`` (no dropout)."""
        pos = torch.arange(input_ids.shape[-1], device=input_ids.device) + self.position_offset
        z = self.word[input_ids] + self.position[pos]
        if self.token_type is not None:
            tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            z = z + self.token_type[tt]
        return self.normalize(z)

    def additive_atoms(self, segments: tuple[int, ...] = (0,), dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """Vectors whose span holds every layer-0 input, one per token and one per position (and segment).

        LayerNorm centres and scales its input ``z = E[v] + P[i] + T[s]`` as a whole, so
        ``Norm(z) = (γ ⊙ c(E[v]) + γ ⊙ c(P[i] + T[s])) / σ(z) + β`` with ``c`` the centring: each input lies in
        the span of its token's atom, its position's atom and ``β``. RMSNorm is the same without centring and
        ``β`` (``β`` is then the zero vector). Rotary or position-free models have all-zero position atoms.

        Args:
            segments: segment ids whose position atoms to build (``(0,)``: single-sentence inputs).
            dtype: dtype of the atoms.

        Returns:
            ``(tokens [V, d], positions [len(segments)·L, d], bias [d])``, ``L`` = :attr:`max_length`; position
            atom ``k·L + i`` is position ``i`` (from 0) in segment ``segments[k]``.
        """
        weight = self.norm_weight.to(dtype)

        def centre(z: Tensor) -> Tensor:
            z = z.to(dtype)
            return z if self.norm_kind == "rmsnorm" else z - z.mean(-1, keepdim=True)

        tokens = weight * centre(self.word)
        table = self.position[self.position_offset:]
        rows = [table.to(dtype) + (self.token_type[s].to(dtype) if self.token_type is not None else 0.0) for s in segments]
        positions = weight * centre(torch.cat(rows))
        return tokens, positions, self.norm_bias.to(dtype)

    def pair_inputs(
        self, tokens: Tensor, positions: Tensor, segment: int = 0, dtype: torch.dtype = torch.float64
    ) -> Tensor:
        """``Norm(E[v] + P[i] + T[segment])`` for pairs ``(tokens[n], positions[n])``: ``[n, d]`` in ``dtype``.

        ``positions`` count from 0 (``position_offset`` is added here).
        """
        e = self.word[tokens].to(dtype) + self.position[positions + self.position_offset].to(dtype)
        if self.token_type is not None:
            e = e + self.token_type[segment].to(dtype)
        return self.normalize(e)
