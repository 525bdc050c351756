"""Position match: a sentence in order from the word- and position-embedding gradients alone (B = 1).

BERT-family embeddings add a token's row and its position's row before the first normalisation,
``z_i = E[v_i] + P[i] (+ T[s])``, so both tables receive the same gradient ``g_i = ∂L/∂z_i`` (``[d]``): at
``B = 1``

* row ``i`` of ``∂L/∂P`` is ``g_i`` (one row per position, zero past the sentence's length);
* row ``v`` of ``∂L/∂E`` is ``Σ_{i: v_i = v} g_i`` (nonzero exactly for the sentence's tokens: FILM's bag).

A token that occurs once has its row *equal* to one position's row, and a repeated token's row is the sum of its
positions' rows. The sentence is therefore the assignment ``z`` of positions to the bag's tokens that minimises

    F(z) = Σ_{v in bag} ‖E_v − Σ_{i: z_i = v} P_i‖²,

which is 0 at the truth on exact gradients and, under DP-SGD's Gaussian noise (std ``s`` per coordinate), is
the negative log-likelihood of the released word rows when the released position rows are taken as exact (up to
scale and a constant). Embedding dropout acts after the normalisation, so the identity holds in training mode too.

Steps (:func:`position_match`): the length is one past the last position row above the noise (exact at
``s = 0``; a chi-square test, Bonferroni over the table's rows, under noise); the candidates are the bag
(word rows above the noise, :func:`~leak_audit.attacks.spans.noise_threshold`) and, under noise, each
position's ``top_k`` tokens by ``⟨E_v, P_i⟩`` over the whole vocabulary (a per-position test that sees
tokens the row-norm test misses); a linear assignment (Hungarian, on ``‖E_v − P_i‖²``, each candidate
available as often as there are positions) starts a local search that moves one position to another token, or
exchanges two positions' tokens, while ``F`` falls.

Measured on the pretrained MiniLM through Opacus (flat clipping to ``C = 1`` over all 22.7M parameters, B = 1,
first 64 CoLA dev sentences; benchmarks/README.md, "position_match under noise"): 64 of 64 sentences exact at
σ = 0 and at σ = 1e-4, where every span attack reads nothing; ROUGE-1 0.874 at σ = 3e-4 and 0.319 at 1e-3, where
a position row's signal is about a quarter of the noise's norm. The derivation is ours (the shared
pre-normalisation gradient); the bag is FILM's first step (Gupta et al. 2022).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from leak_audit.attacks.base import Attack, AttackInput, NotApplicable, Reconstruction, Requirements
from leak_audit.attacks.spans import noise_threshold
from leak_audit.models import TextModelSpec

__all__ = ["PositionMatch", "PositionMatchResult", "position_match"]

MAX_SWEEPS = 200
"""Local-search rounds (each tries every position's best move once, then the best exchange of two positions' tokens;
it stops when nothing lowers ``F``)."""


@dataclass
class PositionMatchResult:
    """Output of :func:`position_match`.

    Attributes:
        sequence: the recovered token ids, position 0 first (special tokens included), ``[n]``.
        length: ``n``, the sentence's length in tokens.
        candidates: how many tokens the assignment chose from.
        objective: ``F`` at the result over ``F`` with nothing assigned (``Σ‖E_v‖²``): 0 when every word row is
            explained exactly (exact gradients); under noise it stays above 0 even at the truth (noise is never
            explained).
    """

    sequence: list[int]
    length: int
    candidates: int
    objective: float


def position_match(
    word_grad: Tensor,
    position_grad: Tensor,
    *,
    noise_std: float = 0.0,
    top_k: int = 3,
    position_offset: int = 0,
    exclude: Collection[int] = (),
) -> PositionMatchResult:
    """Recover one sentence in order from its word- and position-embedding gradients.

    Args:
        word_grad: ``[V, d]`` gradient of the word-embedding table (one sentence, ``B = 1``).
        position_grad: ``[P, d]`` gradient of the position-embedding table.
        noise_std: per-coordinate std ``s`` of Gaussian noise in both (DP-SGD's ``σ·C``; 0: exact gradients).
        top_k: under noise, tokens added to the candidates per position by ``⟨E_v, P_i⟩`` (0: the bag only).
        position_offset: index of position 0 in the table (RoBERTa: ``pad_token_id + 1``).
        exclude: token ids never proposed (e.g. padding).

    Returns:
        A :class:`PositionMatchResult`.

    Raises:
        ValueError: tensors that are not 2-D or differ in width, ``noise_std < 0``, ``top_k < 0``, or
            ``position_offset`` outside the table.
        NotApplicable: no position row or no word row above the noise (nothing to match).
    """
    if word_grad.dim() != 2 or position_grad.dim() != 2 or word_grad.shape[1] != position_grad.shape[1]:
        raise ValueError(
            f"expected word [V, d] and position [P, d] gradients of one width, got {tuple(word_grad.shape)} and "
            f"{tuple(position_grad.shape)}"
        )
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 <= position_offset < position_grad.shape[0]:
        raise ValueError(f"position_offset must be in [0, {position_grad.shape[0]}), got {position_offset}")
    E = word_grad.detach().double()
    P = position_grad.detach().double()[position_offset:]
    V, d = E.shape
    live = (P.norm(dim=1) > noise_threshold(noise_std, P.shape[0], d)).nonzero().flatten()
    if live.numel() == 0:
        raise NotApplicable("no position-embedding row stands above the noise: no position to match")
    n = int(live.max()) + 1
    banned = torch.zeros(V, dtype=torch.bool, device=E.device)
    banned[torch.tensor([t for t in exclude if 0 <= t < V], dtype=torch.long, device=E.device)] = True
    in_bag = (E.norm(dim=1) > noise_threshold(noise_std, V, d)) & ~banned
    Pn = P[:n]
    if noise_std > 0 and top_k > 0:
        scores = (Pn @ E.T).masked_fill(banned, -torch.inf)
        in_bag[scores.topk(min(top_k, V), dim=1).indices.flatten()] = True
    bag = in_bag.nonzero().flatten()
    if bag.numel() == 0:
        raise NotApplicable("no word-embedding row stands above the noise: no token to place")
    Eb = E[bag]
    m = len(bag)
    # Hungarian start: every candidate available at every position (repeats allowed), cost ‖E_v − P_i‖²
    cost = torch.cdist(Pn, Eb).square()
    rows, cols = linear_sum_assignment(cost.repeat(1, -(-n // m)).cpu().numpy())
    z = torch.empty(n, dtype=torch.long)
    z[torch.as_tensor(rows)] = torch.as_tensor(cols) % m
    # local search on F: R holds E_v − Σ_{i: z_i = v} P_i per candidate
    R = Eb.clone()
    R.index_add_(0, z.to(E.device), -Pn)
    gram = Pn @ Pn.T
    sq = gram.diagonal()
    for _ in range(MAX_SWEEPS):
        moved = False
        for i in range(n):  # move one position to another token
            v = int(z[i])
            leave = (R[v] + Pn[i]).square().sum() - R[v].square().sum()
            join = (R - Pn[i]).square().sum(1) - R.square().sum(1)
            delta = leave + join
            delta[v] = 0.0
            w = int(delta.argmin())
            if float(delta[w]) < -1e-12 * float(sq[i]):
                R[v] += Pn[i]
                R[w] -= Pn[i]
                z[i] = w
                moved = True
        # the best exchange of two positions' tokens (a repeated token's positions can need one):
        # swapping i, j changes F by 2⟨R_{z_i} − R_{z_j}, P_i − P_j⟩ + 2‖P_i − P_j‖²
        a = R[z.to(E.device)] @ Pn.T  # a[i, j] = ⟨R_{z_i}, P_j⟩
        ad = a.diagonal()
        delta = 2 * (ad[:, None] + ad[None, :] - a - a.T) + 2 * (sq[:, None] + sq[None, :] - 2 * gram)
        same = z[:, None] == z[None, :]
        delta[same.to(E.device)] = 0.0
        k = int(delta.argmin())
        i, j = divmod(k, n)
        if float(delta[i, j]) < -1e-12 * float(sq[i] + sq[j]):
            v, w = int(z[i]), int(z[j])
            R[v] += Pn[i] - Pn[j]
            R[w] += Pn[j] - Pn[i]
            z[i], z[j] = w, v
            moved = True
        if not moved:
            break
    total = float(Eb.square().sum())
    return PositionMatchResult(
        sequence=bag[z.to(bag.device)].tolist(),
        length=n,
        candidates=m,
        objective=float(R.square().sum()) / max(total, 1e-300),
    )


class PositionMatch(Attack):
    """Registered attack ``"position_match"``: one sentence in order from the word- and position-embedding
    gradients (:func:`position_match`), exact at ``B = 1`` on exact gradients and the first to read text under
    small DP noise.

    Needs the gradients of the word and the (learned, absolute) position embeddings, untied from any LM head:
    BERT, DistilBERT, RoBERTa and their kin in the ``full`` view, or any view that taps the embeddings. At
    ``B > 1`` a position's row sums the sentences' gradients there, so it is ``skipped`` (``span_attention``
    reads those batches). Analytic: well under a second per audit on CPU (one ``[n, V]`` product under noise), no
    time limit of its own.

    Args:
        top_k: see :func:`position_match`.

    Raises:
        ValueError: ``top_k < 0``.
    """

    name = "position_match"
    cost = "analytic"

    def __init__(self, top_k: int = 3) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.top_k = int(top_k)

    def requirements(self, spec: TextModelSpec, tapped: Collection[str]) -> Requirements:
        if spec.position_embeddings is None:
            raise NotApplicable(f"the model has no learned position table ({spec.position_scheme} positions)")
        if spec.tied_embeddings:
            raise NotApplicable("the word embeddings are tied to the LM head, whose gradient reaches every row")
        missing = [n for n in (spec.word_embeddings, spec.position_embeddings) if n not in tapped]
        if missing:
            raise NotApplicable(f"needs the gradients of the word and position embeddings; not tapped: {missing}")
        return Requirements(gradients=frozenset({spec.word_embeddings, spec.position_embeddings}))

    def run(self, inp: AttackInput) -> Reconstruction:
        spec = inp.spec
        if inp.batch_size != 1:
            raise NotApplicable(
                f"B = {inp.batch_size}: each position's row sums {inp.batch_size} sentences' gradients (it reads B = 1)"
            )
        exclude = {spec.pad_token_id} if spec.pad_token_id is not None else set()
        found = position_match(
            inp.gradients[spec.word_embeddings], inp.gradients[spec.position_embeddings], noise_std=inp.noise_std,
            top_k=self.top_k, position_offset=spec.position_offset, exclude=exclude,
        )
        return Reconstruction(
            attack=self.name, sequences=[found.sequence], token_bag=sorted(set(found.sequence)),
            info={"length": found.length, "candidates": found.candidates, "objective": float(f"{found.objective:.3g}")},
        )
