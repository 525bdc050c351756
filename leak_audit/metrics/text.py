"""Scores of a reconstruction against the private batch. Higher always means more leakage.

Text metrics (all in ``[0, 1]``):

* ``rouge1``, ``rouge2``, ``rougeL``: ROUGE F-measure (torchmetrics, keys without ``rougeLsum``, which
  would download nltk data) between decoded reconstructions and decoded references, after matching each
  reference to one reconstruction (Hungarian assignment on token-overlap F1, as LAMP and DAGER do);
  references left unmatched score 0.
* ``token_precision``, ``token_recall``: overlap of recovered and true tokens over the whole batch,
  special tokens excluded; multisets when the attack returns sequences, sets when it returns a bag.
* ``exact_match``: share of references reproduced exactly (special tokens ignored).
* ``position_recall``: share of true ``(position, token)`` pairs found among the attack's candidates
  for that position.
* ``label_accuracy``: share of labels recovered, per matched sentence when the attack aligns labels
  with its sequences, otherwise as multiset overlap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from leak_audit.attacks.base import Reconstruction
from leak_audit.capture.batch import TextBatch
from leak_audit.metrics.names import TEXT_METRICS

__all__ = [
    "TEXT_METRICS",
    "exact_match",
    "label_accuracy",
    "match_sequences",
    "position_recall",
    "rouge",
    "score_text_reconstruction",
    "token_precision_recall",
]


Decode = Callable[[Sequence[int]], str]


def _strip(seq: Sequence[int], ignore: Collection[int]) -> list[int]:
    return [t for t in seq if t not in ignore]


def _overlap_f1(a: Sequence[int], b: Sequence[int]) -> float:
    if not a or not b:
        return 0.0
    common = sum((Counter(a) & Counter(b)).values())
    return 2 * common / (len(a) + len(b))


def match_sequences(preds: Sequence[Sequence[int]], target: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """One-to-one matching of reconstructed to reference sequences maximising token-overlap F1.

    Returns:
        ``[(pred_index, target_index), ...]`` of length ``min(len(preds), len(target))``.
    """
    if not preds or not target:
        return []
    score = np.array([[_overlap_f1(p, t) for t in target] for p in preds])
    rows, cols = linear_sum_assignment(-score)
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def token_precision_recall(
    preds: Sequence[Sequence[int]] | Collection[int],
    target: Sequence[Sequence[int]],
    ignore: Collection[int] = (),
    *,
    as_set: bool = False,
) -> tuple[float, float]:
    """Precision and recall of recovered tokens over a whole batch.

    Args:
        preds: recovered sequences, or (with ``as_set``) a flat collection of recovered token ids.
        target: the true sequences.
        ignore: token ids left out on both sides (special tokens).
        as_set: compare sets of distinct ids (for a bag of tokens) instead of multisets.

    Returns:
        ``(precision, recall)``; precision is 0 when nothing was recovered.
    """
    true = Counter(t for seq in target for t in seq if t not in ignore)
    if as_set:
        rec = Counter({int(t): 1 for t in preds if int(t) not in ignore})  # type: ignore[union-attr]
        true = Counter({t: 1 for t in true})
    else:
        rec = Counter(t for seq in preds for t in seq if t not in ignore)  # type: ignore[union-attr]
    common = sum((rec & true).values())
    precision = common / sum(rec.values()) if rec else 0.0
    recall = common / sum(true.values()) if true else 0.0
    return precision, recall


def exact_match(
    preds: Sequence[Sequence[int]], target: Sequence[Sequence[int]], ignore: Collection[int] = ()
) -> float:
    """Share of target sequences reproduced exactly by a distinct prediction (``ignore`` ids dropped)."""
    if not target:
        return 0.0
    p = [_strip(s, ignore) for s in preds]
    t = [_strip(s, ignore) for s in target]
    return sum(p[i] == t[j] for i, j in match_sequences(p, t)) / len(t)


def position_recall(candidates: Sequence[Collection[int]], target: Sequence[Sequence[int]]) -> float:
    """Share of true ``(position, token)`` pairs whose token is among ``candidates[position]``."""
    total = hit = 0
    for seq in target:
        for i, tok in enumerate(seq):
            total += 1
            hit += i < len(candidates) and tok in candidates[i]
    return hit / total if total else 0.0


def rouge(preds: Sequence[str], target: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over aligned pairs (torchmetrics, offline-safe keys)."""
    from torchmetrics.functional.text.rouge import rouge_score

    if not target:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    out = rouge_score(list(preds), list(target), rouge_keys=("rouge1", "rouge2", "rougeL"))
    return {k: float(out[f"{k}_fmeasure"]) for k in ("rouge1", "rouge2", "rougeL")}


def label_accuracy(
    pred: Sequence[int], target: Sequence[int], pairs: Sequence[tuple[int, int]] | None = None
) -> float:
    """Share of ``target`` labels recovered.

    With ``pairs`` (``(pred_index, target_index)`` from sequence matching) labels are compared per
    example; without, as multisets.
    """
    if not target:
        return 0.0
    if pairs is not None:
        return sum(pred[i] == target[j] for i, j in pairs if i < len(pred)) / len(target)
    return sum((Counter(pred) & Counter(target)).values()) / len(target)


def score_text_reconstruction(
    recon: Reconstruction,
    batch: TextBatch,
    decode: Decode,
    special_ids: Collection[int] = (),
) -> dict[str, float]:
    """All text metrics that ``recon`` supports, against the private ``batch``.

    Args:
        recon: an attack's output.
        batch: the private inputs of the audited step.
        decode: token ids -> text (e.g. ``lambda ids: tokenizer.decode(ids, skip_special_tokens=True)``).
        special_ids: token ids excluded from token metrics and exact match.

    Returns:
        ``{metric: value}`` with keys from :data:`TEXT_METRICS`.
    """
    refs = batch.sequences()
    out: dict[str, float] = {}
    pairs: list[tuple[int, int]] | None = None
    if recon.sequences is not None:
        preds = [_strip(s, special_ids) for s in recon.sequences]
        clean_refs = [_strip(s, special_ids) for s in refs]
        pairs = match_sequences(preds, clean_refs)
        aligned_preds = [""] * len(refs)
        for i, j in pairs:
            aligned_preds[j] = decode(preds[i])
        out.update(rouge(aligned_preds, [decode(r) for r in clean_refs]))
        out["token_precision"], out["token_recall"] = token_precision_recall(preds, clean_refs)
        out["exact_match"] = exact_match(preds, clean_refs)
    elif recon.token_bag is not None:
        out["token_precision"], out["token_recall"] = token_precision_recall(
            recon.token_bag, refs, special_ids, as_set=True
        )
    if recon.position_candidates is not None:
        out["position_recall"] = position_recall([set(c) for c in recon.position_candidates], refs)
    if recon.labels is not None and batch.labels is not None:
        true = [int(y) for y in batch.labels.reshape(-1).tolist()]
        out["label_accuracy"] = label_accuracy(
            recon.labels, true, pairs if recon.labels_aligned and pairs is not None else None
        )
    return out
