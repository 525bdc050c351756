"""Token bag: the batch's set of tokens from the word-embedding gradient (FILM's first step).

Follows Gupta, Huang, Zhong, Gao, Li, Chen, "Recovering Private Text in Federated Learning of Language
Models" (FILM, NeurIPS 2022), §3.1. An embedding lookup routes gradient only to the rows it read, so the
nonzero rows of ``∂L/∂E_word`` (``[V, d]``) are exactly the token ids that occur in the batch. Padding
is excluded automatically: ``nn.Embedding(padding_idx=...)`` never receives gradient at the padding row,
and padded positions carry zero gradient under the attention mask.

Under DP-SGD every row carries Gaussian noise (std ``s`` per coordinate), so "nonzero" becomes a test:
a row's squared norm over ``s²`` is chi-square with ``d`` degrees of freedom when the token is absent,
and a row is kept when it exceeds that law's ``1 − α/V`` quantile (Bonferroni over the ``V`` rows,
``α = 0.01``: about one false token per hundred audits; :func:`~leak_audit.attacks.spans.noise_threshold`).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements
from leak_audit.attacks.spans import noise_threshold
from leak_audit.models import TextModelSpec

__all__ = ["TokenBag", "token_bag"]


def token_bag(word_embedding_grad: Tensor, threshold: float = 0.0) -> Tensor:
    """Token ids whose embedding row has a gradient.

    Args:
        word_embedding_grad: ``[V, d]`` gradient of the word-embedding table.
        threshold: a row counts as nonzero when its L2 norm exceeds ``threshold``; ``0`` is exact for
            noise-free gradients.

    Returns:
        ``[K]`` int64 token ids, ascending.

    Raises:
        ValueError: the gradient is not 2-D, or ``threshold < 0``.
    """
    if word_embedding_grad.dim() != 2:
        raise ValueError(f"expected a [V, d] embedding gradient, got shape {tuple(word_embedding_grad.shape)}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    norms = torch.linalg.vector_norm(word_embedding_grad.detach().float(), dim=1)
    return (norms > threshold).nonzero().flatten()


class TokenBag(Attack):
    """Registered attack ``"token_bag"``: the set of tokens in the batch, from the word-embedding gradient.

    Analytic (one pass over the gradient's rows, no time limit of its own): it only checks that the
    audit's deadline has not passed when it starts (then it returns at once, timed out).

    Args:
        threshold: row-norm threshold, see :func:`token_bag`.
    """

    name = "token_bag"

    def __init__(self, threshold: float = 0.0) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.threshold = threshold

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        if spec.word_embeddings not in tapped:
            raise NotApplicable(
                f"needs the gradient of the word embeddings ({spec.word_embeddings!r}), which is not tapped"
            )
        if spec.tied_embeddings:
            raise NotApplicable(
                "the word embeddings are tied to the LM head, whose gradient reaches every row: the nonzero rows "
                "no longer mark the batch's tokens (span_decoder ranks rows by the layer-0 span instead)"
            )
        return Requirements(gradients=frozenset({spec.word_embeddings}))

    def run(self, inp: AttackInput) -> Reconstruction:
        grad = inp.gradients[inp.spec.word_embeddings]
        threshold = max(self.threshold, noise_threshold(inp.noise_std, *grad.shape))
        ids = token_bag(grad, threshold)
        return Reconstruction(attack=self.name, token_bag=ids.tolist(),
                              info={"num_tokens": int(ids.numel()), "threshold": threshold})
