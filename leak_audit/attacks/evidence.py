"""The attacker's own evidence: how well a reconstruction explains the observed gradient.

An auditor can score every attack against the private batch and report the best (the *oracle* over an
attack portfolio: ``leak/max/*``, ``best`` in ``bench text``). A real attacker holds no answer key: it
runs its attacks and keeps the reconstruction its own evidence favours. The evidence used here is the one
the gradient-matching literature uses to rank candidates (DLG, Zhu et al. 2019; LAMP, Balunović et al.
2022; DAGER's final filter, Petrov et al. 2024): the relative gradient residual

    r = ‖(B'/B)·∇W(x̂, ŷ) − ∇W‖ / ‖∇W‖

of the reconstruction ``x̂`` (``B'`` sequences or images, labels ``ŷ``) at the snapshot's parameters,
over the tapped gradients ``∇W`` of a batch of ``B`` examples. ``r = 0`` for an exact reconstruction of
a noise-free gradient. This module never sees the private batch: it reads a :class:`Reconstruction`, the
observed gradients, the parameters, the model replica and public metadata.

Labels (text): under next-token loss (an LM head, no classifier) the sequences themselves; the reconstruction's
own labels when aligned; otherwise the ``labels`` attack's multiset
(every distinct assignment of it to the sequences when there are at most :data:`MAX_ASSIGNMENTS`,
keeping the smallest residual; else its class frequencies as soft labels for every sequence); without
either, every hard assignment when there are at most :data:`MAX_ASSIGNMENTS`, else uniform soft labels.
Every reconstruction of one audit is ranked under the same rule. Soft labels are a compromise: they
inflate the residual of an exact reconstruction (a fresh classification head gives ``r`` near 1), so the
pick is reliable where labels are known (``B' = 1``, one class, or few assignments).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor

from leak_audit.attacks.base import AttackInput, Reconstruction
from leak_audit.models.image_replica import ImageReplica
from leak_audit.models import TextModelSpec
from leak_audit.models.replica import ModelReplica

__all__ = ["MAX_ASSIGNMENTS", "gradient_residual", "pick"]

MAX_ASSIGNMENTS = 8
"""Label assignments tried per reconstruction (one forward and backward pass each)."""


def gradient_residual(recon: Reconstruction, inp: AttackInput) -> float | None:
    """The relative gradient residual of ``recon`` (see the module docstring), or ``None`` where it cannot
    be computed: no sequences or images, no replica, or no tapped gradient the replica owns.

    Args:
        recon: a finished reconstruction (``sequences`` for text, ``images`` ``[B', C, H, W]`` for images).
        inp: the attack input of the audit: ``gradients`` (the observed ones), ``params`` (must hold every
            trainable parameter of the replica), ``replica``, ``spec``, ``batch_size`` and ``priors``
            (the ``labels`` attack's result, if it ran).

    Returns:
        ``r >= 0`` (dimensionless), the smallest over the label assignments tried.
    """
    replica = inp.replica
    if replica is None:
        return None
    names = [n for n in sorted(inp.gradients) if n in replica.parameter_names]
    if not names or any(n not in inp.params for n in replica.trainable):
        return None
    target = torch.cat([inp.gradients[n].flatten() for n in names]).double()
    norm = float(target.norm())
    if not norm > 0:
        return None
    if isinstance(replica, ImageReplica):
        if recon.images is None or recon.labels is None or not recon.labels_aligned or not len(recon.images):
            return None
        x = recon.images.to(target.device)
        y = torch.tensor(recon.labels, dtype=torch.long, device=x.device)
        grads = replica.gradients(inp.params, names, x, y)
        return _relative(grads, len(x) / inp.batch_size, target, norm)
    if not isinstance(replica, ModelReplica) or not isinstance(inp.spec, TextModelSpec) or not recon.sequences:
        return None
    spec = inp.spec
    ids, mask = _pad(recon.sequences, spec.pad_token_id or 0, target.device)
    scale = len(recon.sequences) / inp.batch_size
    extra = {"token_type_ids": torch.zeros_like(ids)} if spec.token_type_embeddings is not None else {}
    if spec.classifier_weight is None and spec.lm_head is not None:  # next-token loss: the labels are the text
        options = [ids.masked_fill(mask == 0, -100)]  # (the loss is a mean over target tokens: B'/B is approximate)
    else:
        options = _label_options(recon, inp, len(recon.sequences))
    best = math.inf
    for labels in options:
        grads = replica.gradients(inp.params, names, labels=labels.to(ids.device), input_ids=ids,
                                  attention_mask=mask, **extra)
        best = min(best, _relative(grads, scale, target, norm))
    return best


def pick(residuals: Mapping[str, float | None], order: Sequence[str], certified: Collection[str] = ()) -> str | None:
    """The attack an attacker without the answer keeps: the first in ``order`` of ``certified`` (attacks whose
    own certificate says their reconstruction is the whole batch, exactly: ``span_attention`` and ``span_cluster``
    with ``info["certified"] == B``), else the smallest residual (ties: earlier in ``order``); ``None`` when no
    attack has either.

    A certificate outranks the residual because the residual is computed in eval mode with the labels' best
    guess: with dropout on, or soft labels at B > 8, it stays well above zero for an exact reconstruction (CoLA,
    B = 8, dropout on: the residual kept ``span_check``'s 0.37 ROUGE-1 reading over ``span_attention``'s certified
    1.000 in 2 of 8 batches)."""
    for name in order:
        if name in certified:
            return name
    ranked = [(r, order.index(a)) for a, r in residuals.items() if r is not None and math.isfinite(r)]
    if not ranked:
        return None
    return order[min(ranked)[1]]


def _relative(grads: Sequence[Tensor], scale: float, target: Tensor, norm: float) -> float:
    flat = torch.cat([g.flatten() for g in grads]).double() * scale
    return float((flat - target).norm()) / norm


def _pad(sequences: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[i, : len(s)] = 1
    return ids, mask


def _label_options(recon: Reconstruction, inp: AttackInput, n: int) -> list[Tensor]:
    """Hard ``[n]`` or soft ``[n, C]`` label tensors to try, following the module docstring's rule."""
    assert isinstance(inp.spec, TextModelSpec)
    classes = max(inp.spec.num_labels, 1)
    if recon.labels is not None and recon.labels_aligned and len(recon.labels) == n:
        return [torch.tensor(recon.labels, dtype=torch.long)]
    prior = inp.priors.get("labels")
    multiset = list(prior.labels) if prior is not None and prior.labels else []
    if multiset:
        if len(set(multiset)) == 1:
            return [torch.full((n,), multiset[0], dtype=torch.long)]
        counts = Counter(multiset)
        distinct = math.factorial(n) // math.prod(math.factorial(c) for c in counts.values())
        if len(multiset) == n and distinct <= MAX_ASSIGNMENTS:
            options = dict.fromkeys(itertools.permutations(multiset))
            return [torch.tensor(o, dtype=torch.long) for o in options]
        soft = torch.tensor([counts.get(c, 0) for c in range(classes)], dtype=torch.float64)
        return [(soft / soft.sum()).float().expand(n, classes).clone()]
    if classes**n <= MAX_ASSIGNMENTS:
        return [torch.tensor(o, dtype=torch.long) for o in itertools.product(range(classes), repeat=n)]
    return [torch.full((n, classes), 1.0 / classes)]
