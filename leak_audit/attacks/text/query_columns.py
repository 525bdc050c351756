"""Layer 0's query weight gradient split over the batch's tokens and positions (fact 1 of span clustering).

``∂L/∂W_q = Σ_t δq_t x_tᵀ`` and every layer-0 input is ``x_t = A a_t`` with ``A`` the additive atoms of its
token and position (:func:`additive_atoms`), so ``H = ∂L/∂W_q · A (AᵀA)⁻¹`` (:func:`token_query_gradients`)
holds per token ``Σ_{t: token v} δq_t/σ_t`` and per position ``Σ_{t at i} δq_t/σ_t``. Used by
:mod:`~leak_audit.attacks.text.span_cluster`, :mod:`~leak_audit.attacks.text.pair_pursuit` and the peeling
certificates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from leak_audit.models import EmbeddingTables

__all__ = ["additive_atoms", "token_query_gradients"]


def _centre(z: Tensor) -> Tensor:
    return z - z.mean(-1, keepdim=True)


def additive_atoms(tables: EmbeddingTables, bag: Sequence[int], length: int, segment: int = 0) -> Tensor:
    """Columns spanning the layer-0 inputs of every (bag token, position) pair: ``[d, |bag| + length + 1]``.

    ``[γ⊙C(E[v]) for v in bag] + [γ⊙C(P[i] + T[segment]) for i < length] + [β]`` in float64, where ``C``
    centres a vector: ``LN(E[v] + P[i] + T) = (γ⊙C(E[v]) + γ⊙C(P[i] + T)) / σ + β``.
    """
    gam = tables.norm_weight.detach().double()
    word = tables.word.detach()[torch.as_tensor(list(bag), dtype=torch.long)].double()
    pos = tables.position.detach()[tables.position_offset : tables.position_offset + length].double()
    if tables.token_type is not None:
        pos = pos + tables.token_type[segment].detach().double()
    return torch.cat([gam * _centre(word), gam * _centre(pos), tables.norm_bias.detach().double()[None]]).T


def token_query_gradients(grad: Tensor, atoms: Tensor) -> Tensor:
    """Split a first-layer weight gradient ``[d_out, d]`` over the columns of ``atoms`` ``[d, m]``.

    Returns ``H`` ``[d_out, m]`` with ``grad = H atomsᵀ`` (least squares; exact when the gradient's rows
    lie in the atoms' span, i.e. for exact gradients). For the atoms of :func:`additive_atoms` the
    column of token ``v`` is ``Σ_{t: token v} δ_t / σ_t``, the output gradients of its occurrences.
    """
    return torch.linalg.lstsq(atoms, grad.detach().double().T).solution.T
