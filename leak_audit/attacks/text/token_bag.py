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

**Without the embedding gradient** (LoRA: the embeddings are frozen), the ``lora_A`` gradients of layer 0's
adapted projections are read instead: their rows are combinations of the batch's layer-0 inputs, and
joint sparse recovery over token and position atoms gives the exact set of tokens and the longest length
(:func:`~leak_audit.attacks.text.sparse_bag.sparse_bag`). That holds beyond the adapters' rank, where no
single input lies in their row space; a pursuit that does not close (relative residual above
``accept``), or runs into the audit's deadline, gives no bag (``skipped``, or ``timed_out``).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements
from leak_audit.attacks.spans import noise_threshold
from leak_audit.attacks.text.sparse_bag import sparse_bag
from leak_audit.models import EmbeddingTables, TextModelSpec

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
    """Registered attack ``"token_bag"``: the set of tokens in the batch, from the word-embedding gradient, or
    (when that is not tapped) from layer 0's ``lora_A`` gradients.

    From the embedding gradient it is one pass over the rows (no time limit of its own). From LoRA adapters
    it is a pursuit over ``V + L + 1`` atoms (0.8-6 s per B = 4-8 batch on MiniLM, 2 CPU cores) that stops
    at the audit's deadline. Either way it returns at once, timed out, when started past the deadline.

    Args:
        threshold: row-norm threshold, see :func:`token_bag`.
        accept: the LoRA pursuit's relative residual at which its bag counts as complete.

    Raises:
        ValueError: ``threshold < 0``, or ``accept`` not in ``(0, 1)``.
    """

    name = "token_bag"

    def __init__(self, threshold: float = 0.0, accept: float = 1e-4) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if not 0 < accept < 1:
            raise ValueError(f"accept must be in (0, 1), got {accept}")
        self.threshold = threshold
        self.accept = accept

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        if spec.word_embeddings in tapped and not spec.tied_embeddings:
            return Requirements(gradients=frozenset({spec.word_embeddings}))
        adapters = [a.a for a in (spec.layers[0].lora if spec.layers else ()) if a.a in tapped]
        if adapters and spec.norm_weight is not None:
            return Requirements(gradients=frozenset(adapters), params=frozenset(spec.embedding_params))
        if spec.word_embeddings in tapped:
            raise NotApplicable(
                "the word embeddings are tied to the LM head, whose gradient reaches every row: the nonzero rows "
                "no longer mark the batch's tokens (span_decoder ranks rows by the layer-0 span instead)"
            )
        raise NotApplicable(
            f"needs the gradient of the word embeddings ({spec.word_embeddings!r}) or of a LoRA adapter on layer 0's "
            "attention; neither is tapped"
        )

    def run(self, inp: AttackInput) -> Reconstruction:
        spec = inp.spec
        if spec.word_embeddings in inp.gradients and not spec.tied_embeddings:
            grad = inp.gradients[spec.word_embeddings]
            threshold = max(self.threshold, noise_threshold(inp.noise_std, *grad.shape))
            ids = token_bag(grad, threshold)
            return Reconstruction(attack=self.name, token_bag=ids.tolist(),
                                  info={"num_tokens": int(ids.numel()), "threshold": threshold})
        if inp.noise_std > 0:
            raise NotApplicable("the LoRA pursuit needs exact gradients: DP noise fills every direction of the rows")
        rows = [g for a in spec.layers[0].lora if (g := inp.gradients.get(a.a)) is not None]
        if not any(bool(g.any()) for g in rows):
            raise NotApplicable("layer 0's lora_A gradients are zero (lora_B = 0 at initialisation): no input to read")
        budget = inp.budget()
        read = sparse_bag(rows, EmbeddingTables.from_params(inp.params, spec), deadline=budget.deadline)
        info = {"source": "lora", "bag_residual": float(f"{read.residual:.3g}"), "length": read.length}
        if read.cut:
            return Reconstruction(attack=self.name, token_bag=read.tokens.tolist(), timed_out=budget.audit_bound,
                                  info={**info, "progress": f"{int(read.tokens.numel())} tokens when the deadline came"})
        if read.residual > self.accept:
            raise NotApplicable(f"the pursuit over layer 0's adapters left relative residual {read.residual:.2g} "
                                f"> {self.accept:g}: not a complete bag")
        return Reconstruction(attack=self.name, token_bag=read.tokens.tolist(),
                              info={**info, "num_tokens": int(read.tokens.numel())})
