"""The search of gradient matching (TAG / LAMP): search space, best candidate, discrete moves, language prior.

:class:`~leak_audit.attacks.text.gradient_matching.GradientMatching` follows Balunović, Dimitrov, Jovanović,
Vechev, "LAMP: Extracting Text from Gradients with Language Model Priors" (NeurIPS 2022): a continuous
phase in a :class:`SearchSpace` (softmax mixtures of token embeddings, or LAMP's free embeddings) whose
projections to tokens are kept in a :class:`BestCandidate`, then a :class:`DiscreteSearch` over token
sequences (cross-sequence exchanges, single-token replacements with HotFlip/GCG candidates, and LAMP's
random reorderings, :func:`random_moves`), scored by the gradient distance plus, optionally, a causal
language model's perplexity (:class:`LanguagePrior`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor

from leak_audit.attacks.budget import late
from leak_audit.attacks.optim import Layout, nearest_tokens, random_embeddings

__all__ = [
    "MOVES",
    "PARAMETRIZATIONS",
    "BestCandidate",
    "DiscreteSearch",
    "LanguagePrior",
    "SearchSpace",
    "distinct_permutations",
    "random_moves",
]

PARAMETRIZATIONS: tuple[str, ...] = ("simplex", "free")
"""Continuous search spaces: softmax mixtures of token embeddings, or unconstrained embeddings (LAMP)."""

MOVES: tuple[str, ...] = ("swap", "move_token", "move_span", "replace")
"""LAMP's discrete transformations of a projected sequence."""


class LanguagePrior:
    """Mean token negative log-likelihood of text under a Hugging Face causal LM (LAMP's prior).

    Args:
        path: a local directory ``AutoModelForCausalLM.from_pretrained`` reads (no hub downloads).
        tokenizer: the *classifier's* tokenizer (object or local path), to decode candidate token ids
            into text that the LM's own tokenizer (read from ``path``) re-encodes. ``None``: the LM
            shares the classifier's vocabulary and reads the ids directly.

    Raises:
        OSError: ``path`` holds no model (from ``transformers``).
    """

    def __init__(self, path: str, tokenizer: Any = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.lm_tokenizer = AutoTokenizer.from_pretrained(path) if tokenizer is not None else None
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)

    def nll(self, sequences: Sequence[Sequence[int]], special: Collection[int]) -> float:
        """Mean over sequences of the mean per-token NLL (nats) of their non-special tokens.

        Raises:
            ValueError: without a tokenizer, a token id outside the LM's vocabulary.
        """
        total = 0.0
        for seq in sequences:
            content = [int(t) for t in seq if int(t) not in special]
            if self.tokenizer is not None:
                assert self.lm_tokenizer is not None
                text = self.tokenizer.decode(content, skip_special_tokens=True)
                ids = self.lm_tokenizer(text, return_tensors="pt")["input_ids"][0].tolist()
                bos = self.lm_tokenizer.bos_token_id
                if bos is not None and (not ids or ids[0] != bos):
                    ids = [bos, *ids]
            else:
                if content and max(content) >= self.vocab_size:
                    raise ValueError(
                        f"token id {max(content)} is outside the language model's vocabulary ({self.vocab_size}); "
                        "pass lm_tokenizer= (the classifier's tokenizer) to re-tokenise the text"
                    )
                ids = content
            if len(ids) < 2:
                continue
            with torch.no_grad():
                x = torch.tensor([ids])
                total += float(self.model(input_ids=x, labels=x).loss)
        return total / max(1, len(sequences))


class BestCandidate:
    """The best-scoring candidate seen so far, with the replacement tokens the discrete phase tries.

    Attributes:
        score: the search's score (gradient distance, plus the language prior when there is one).
        distance: the gradient distance; ``relative``: the scale-invariant relative l2 distance.
        ids: ``[B, L]`` token ids; ``labels``: ``[B]`` labels; ``neighbours``: ``[B, L, k]`` replacement
            token ids per position (``None`` until the first offer).
    """

    def __init__(self) -> None:
        self.score = math.inf
        self.distance = math.inf
        self.relative = math.inf
        self.ids: Tensor | None = None
        self.labels: Tensor | None = None
        self.neighbours: Tensor | None = None

    def offer(self, score: float, distance: float, relative: float, ids: Tensor, labels: Tensor, *, neighbours: Tensor) -> None:
        """Keep the candidate when its ``score`` is lower than the best so far."""
        if score < self.score:
            self.score, self.distance, self.relative = score, distance, relative
            self.ids, self.labels, self.neighbours = ids, labels, neighbours


class SearchSpace:
    """Where the continuous phase searches.

    ``"simplex"``: logits ``w`` ``[B, L, K]`` over the ``K`` candidate tokens, ``x = softmax(w) E_K``, so
    every position is a convex combination of real token embeddings and projects to ``argmax w``.
    ``"free"``: ``x = w`` ``[B, L, d]`` unconstrained (LAMP), projected to the nearest token (cosine).
    """

    def __init__(self, kind: str, table: Tensor, vocabulary: Tensor) -> None:
        self.kind = kind
        self.table = table.detach().float()
        self.vocabulary = vocabulary
        self.cand = self.table[vocabulary]
        self.mean_norm = float(self.cand.norm(dim=1).mean())
        self.default_lr = 0.5 if kind == "simplex" else 0.1
        self.lr_unit = 1.0 if kind == "simplex" else float(self.table.std())

    def embeddings(self, w: Tensor) -> Tensor:
        return w.softmax(-1) @ self.cand if self.kind == "simplex" else w

    def projections(self, w: Tensor) -> list[Tensor]:
        """Token ids ``[B, L]`` nearest to ``w``: the nearest token (cosine) to the embedding, and for
        ``"simplex"`` also the mixture's heaviest token (``argmax w``)."""
        w = w.detach()
        near = nearest_tokens(self.embeddings(w), self.table, self.vocabulary, 1)[..., 0]
        if self.kind == "simplex":
            return [self.vocabulary[w.argmax(-1)], near]
        return [near]

    def neighbours(self, w: Tensor, k: int) -> Tensor:
        """``[B, L, ≤ 2(k+1)]`` candidate tokens per position (the ``replace`` move's and the sweep's)."""
        w = w.detach()
        near = nearest_tokens(self.embeddings(w), self.table, self.vocabulary, k + 1)
        if self.kind == "simplex":
            heavy = self.vocabulary[w.topk(min(k + 1, w.shape[-1]), dim=-1).indices]
            return torch.stack([heavy, near], dim=-1).flatten(-2)  # interleaved: best-ranked first
        return near

    def init_random(self, layout: Layout, gen: torch.Generator) -> Tensor:
        b, n = layout.free.shape
        if self.kind == "simplex":
            return torch.randn(b, n, self.cand.shape[0], generator=gen).to(self.table.device)
        return random_embeddings((b, n, self.table.shape[1]), self.table, gen)

    def init_seed(self, ids: Tensor, gen: torch.Generator) -> Tensor:
        """A start at token ids ``[B, L]`` (tokens outside the vocabulary: their nearest candidate)."""
        if self.kind == "free":
            return self.table[ids].clone()
        k = self.cand.shape[0]
        dev = self.table.device
        lookup = torch.full((int(max(int(ids.max()), int(self.vocabulary.max()))) + 1,), -1, dtype=torch.long, device=dev)
        lookup[self.vocabulary] = torch.arange(k, device=dev)
        idx = lookup[ids]
        missing = idx < 0
        if bool(missing.any()):
            near = nearest_tokens(self.table[ids[missing]], self.table, self.vocabulary, 1)[..., 0]
            idx[missing] = lookup[near]
        w = 0.1 * torch.randn(*ids.shape, k, generator=gen).to(dev)
        w.scatter_add_(-1, idx[..., None], torch.full((*ids.shape, 1), math.log(k) + 3.0, device=dev))
        return w


class DiscreteSearch:
    """Greedy local search over token sequences (LAMP's discrete step), from ``keep``'s candidate.

    :meth:`sweep` tries, position by position, each of the position's replacement tokens (the ``top_k``
    of the continuous solution, and the ``top_k`` of a first-order HotFlip/GCG estimate at the current
    sequence) and keeps any that lowers the score (coordinate descent). :meth:`exchange` swaps tokens between
    sequences at one position (``B > 1``). :meth:`try_candidates` scores a list of
    sequences and keeps the best when it is better.
    """

    def __init__(
        self, layout: Layout, score: Any, keep: BestCandidate, deadline: float, exact_tol: float, linearized: Any = None
    ) -> None:
        assert keep.ids is not None and keep.labels is not None and keep.neighbours is not None
        self.layout = layout
        self.score_fn = score
        self.linearized = linearized
        self.neighbours = keep.neighbours
        self.deadline = deadline
        self.exact_tol = exact_tol
        self.score, self.distance, self.relative = keep.score, keep.distance, keep.relative
        self.ids, self.labels = keep.ids, keep.labels
        self.accepted = 0
        self.cut = False  # the deadline stopped the search (not exactness)
        self.evaluated: set[tuple[int, ...]] = {tuple(self.ids.flatten().tolist())}

    def _fresh(self, ids: Tensor) -> bool:
        """Whether ``ids`` was not scored yet (scores do not change, so nothing is scored twice)."""
        key = tuple(ids.flatten().tolist())
        if key in self.evaluated:
            return False
        self.evaluated.add(key)
        return True

    def done(self) -> bool:
        """Exact, or past the deadline (which sets :attr:`cut`)."""
        if self.relative < self.exact_tol:
            return True
        if late(self.deadline):
            self.cut = True
            return True
        return False

    def _offer(self, ids: Tensor) -> bool:
        if not self._fresh(ids):
            return False
        s, d, rel = self.score_fn(ids, self.labels)
        if s < self.score:
            self.score, self.distance, self.relative, self.ids = s, d, rel, ids
            self.accepted += 1
            return True
        return False

    def sweep(self) -> bool:
        """One pass of single-token replacements, breadth-first: every position's best-ranked
        candidate of every source before any second-ranked one, so a time limit cuts the least
        promising candidates, not the last positions."""
        improved = False
        b_, n_ = self.ids.shape
        # the sequence's own tokens (repeated words are common), the continuous neighbours, HotFlip's picks
        own = self.ids.masked_fill(~self.layout.free, -1)[:, None, :].expand(b_, n_, n_)
        sources = [self.neighbours, own]
        if self.linearized is not None and not self.done():
            sources.insert(0, self.linearized(self.ids, self.labels))
        width = max(src.shape[-1] for src in sources)
        options = torch.stack([src[..., r] for r in range(width) for src in sources if r < src.shape[-1]], dim=-1)
        tried: set[tuple[int, int, int]] = set()
        free = [self.layout.free[b].nonzero().flatten().tolist() for b in range(b_)]
        for r in range(options.shape[-1]):
            for b in range(b_):
                for pos in free[b]:
                    tok = int(options[b, pos, r])
                    if tok < 0 or tok == int(self.ids[b, pos]) or (b, pos, tok) in tried:
                        continue
                    if self.done():
                        return improved
                    tried.add((b, pos, tok))
                    cand = self.ids.clone()
                    cand[b, pos] = tok
                    improved = self._offer(cand) or improved
        return improved

    def exchange(self) -> bool:
        """One pass of cross-sequence exchanges (``B > 1``): at each position, every pair of sequences
        that both have a free token there swaps it, and the best swap that lowers the score is kept.

        This is the move that assigns tokens to sentences: the analytic attacks on low-rank gradients
        (``span_check`` past its rank) recover the tokens at each position but not whose they are,
        and no within-sequence move or single replacement can fix that assignment.
        """
        improved = False
        b_, n_ = self.ids.shape
        for pos in range(n_):
            if self.done():
                break
            rows = [b for b in range(b_) if bool(self.layout.free[b, pos])]
            cands = []
            for b, c in itertools.combinations(rows, 2):
                if int(self.ids[b, pos]) != int(self.ids[c, pos]):
                    cand = self.ids.clone()
                    cand[b, pos], cand[c, pos] = self.ids[c, pos], self.ids[b, pos]
                    cands.append(cand)
            improved = self.try_candidates(cands) or improved
        return improved

    def try_candidates(self, cands: Sequence[Tensor]) -> bool:
        best: tuple[float, float, float, Tensor] | None = None
        for c in cands:
            if self.done():
                break
            if not self._fresh(c):
                continue
            s, d, rel = self.score_fn(c, self.labels)
            if best is None or s < best[0]:
                best = (s, d, rel, c)
        if best is not None and best[0] < self.score:
            self.score, self.distance, self.relative, self.ids = best
            self.accepted += 1
            return True
        return False


def distinct_permutations(items: Sequence[int], limit: int) -> list[tuple[int, ...]]:
    """Up to ``limit`` distinct orderings of a multiset (the given order first)."""
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    for p in itertools.permutations(items):
        if p not in seen:
            seen.add(p)
            out.append(p)
            if len(out) >= limit:
                break
    return out


def random_moves(
    ids: Tensor, layout: Layout, neighbours: Tensor, count: int, gen: torch.Generator, *, reorder_only: bool = False
) -> list[Tensor]:
    """``count`` random LAMP transformations of ``ids`` ``[B, L]`` (distinct, different from ``ids``).

    ``neighbours`` ``[B, L, k]``: token ids the ``replace`` move draws from (the current token skipped).
    ``reorder_only``: swaps and moves only (no ``replace``).
    """
    free_pos = [layout.free[b].nonzero().flatten().tolist() for b in range(layout.batch_size)]
    rows = [b for b, p in enumerate(free_pos) if p]
    if not rows:
        return []
    out: list[Tensor] = []
    seen = {tuple(ids.flatten().tolist())}

    def rand(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    for _ in range(count * 4):
        if len(out) >= count:
            break
        b = rows[rand(len(rows))]
        pos = free_pos[b]
        seg = ids[b, pos].clone()
        n = len(pos)
        if n < 2 and reorder_only:
            continue
        move = MOVES[rand(len(MOVES) - int(reorder_only))] if n >= 2 else "replace"
        if move == "swap":
            i, j = rand(n), rand(n)
            if i == j:
                continue
            seg[i], seg[j] = seg[j].clone(), seg[i].clone()
        elif move == "move_token":
            i, j = rand(n), rand(n)
            if i == j:
                continue
            tok = seg[i : i + 1]
            rest = torch.cat([seg[:i], seg[i + 1 :]])
            seg = torch.cat([rest[:j], tok, rest[j:]])
        elif move == "move_span":
            i = rand(n)
            k = i + 2 + rand(max(1, n - i - 1))
            k = min(k, n)
            span, rest = seg[i:k], torch.cat([seg[:i], seg[k:]])
            j = rand(len(rest) + 1)
            seg = torch.cat([rest[:j], span, rest[j:]])
        else:
            i = rand(n)
            opts = [int(t) for t in neighbours[b, pos[i]].tolist() if int(t) != int(seg[i])]
            if not opts:
                continue
            seg[i] = opts[rand(len(opts))]
        cand = ids.clone()
        cand[b, pos] = seg
        key = tuple(cand.flatten().tolist())
        if key not in seen:
            seen.add(key)
            out.append(cand)
    return out
