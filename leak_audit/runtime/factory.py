"""Build the :class:`~leak_audit.runtime.auditor.Auditor` a training run needs, for a text or an image model.

A text model is a Hugging Face model of a registered family (BERT, Llama) (:class:`~leak_audit.models.TextModelSpec`,
:class:`~leak_audit.models.replica.ModelReplica`, optional dropout-off recompute, the text scorer); an image
model is any classifier from ``[B, C, H, W]`` images to logits (:class:`~leak_audit.models.ImageModelSpec`,
:class:`~leak_audit.models.image_replica.ImageReplica`, :class:`~leak_audit.metrics.scoring.ImageScorer`).
Everything after construction is the same for both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leak_audit.attacks import Attack
from leak_audit.metrics.scoring import ImageScorer
from leak_audit.models import UnsupportedModelError, find_hf_model, image_model_spec, text_model_spec
from leak_audit.models.image_replica import ImageReplica
from leak_audit.models.replica import ModelReplica
from leak_audit.runtime.auditor import Auditor
from leak_audit.runtime.recompute import EvalRecompute

__all__ = ["build_auditor", "decoder", "find_tokenizer"]


def find_tokenizer(tokenizer: Any, module: nn.Module) -> Any:
    """``tokenizer`` when given, else the module's ``tokenizer`` attribute, else ``None``."""
    return tokenizer if tokenizer is not None else getattr(module, "tokenizer", None)


def decoder(tokenizer: Any) -> Callable[[Sequence[int]], str] | None:
    """Token ids -> words with ``tokenizer`` (special tokens dropped); ``None`` without one (the auditor then
    joins the ids)."""
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


def build_auditor(
    modality: str,
    module: nn.Module,
    tapped: Collection[str],
    attacks: Sequence[Attack],
    *,
    tokenizer: Any = None,
    network: str | None = None,
    recompute: str = "observed",
    log_samples: bool = False,
    log_dir: Path = Path("leak_audit_logs"),
    max_seconds: float | None = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> Auditor:
    """The auditor of ``module`` (a LightningModule) for ``modality``, with a storage-sharing replica.

    Args:
        modality: ``"text"`` or ``"image"``.
        module: the audited module; its Hugging Face model (text) or image network is found inside.
        tapped: names of the tapped parameters (relative to ``module``).
        attacks: attacks of ``modality``.
        tokenizer: text only: decodes reconstructions and names the special tokens (``None``: token ids).
        network: image only: the classifier's module name (``""``: ``module`` itself; ``None``: found).
        recompute: ``"observed"`` or, for text, ``"eval"`` (dropout-off recompute on the replica).
        log_samples: keep samples: text in the records; images as ``log_dir/samples/*.npz``.
        log_dir: the audit log's directory.
        max_seconds: time budget of each attack, in seconds (``None``: unbounded).
        seed: seed of the attacks' private generator.
        device: where the replica runs (``None``: it shares the live parameters' storage on their device).

    Raises:
        ValueError: ``network`` given for a text model, or ``recompute="eval"`` for an image model.
        UnsupportedModelError: no model of a registered text family or no network (images) is found.
    """
    if modality == "text":
        if network is not None:
            raise ValueError(f"network={network!r} applies to image models; the text audit finds the Hugging "
                             "Face model itself (pass modality='image' if this is an image model)")
        spec = text_model_spec(module, generic=True).with_tokenizer(tokenizer)
        try:
            hf_name, hf_model = find_hf_model(module)
        except UnsupportedModelError:  # a plain nn.Module language model: attacks that run the model do not apply
            if recompute == "eval":
                raise ValueError("recompute='eval' re-runs a Hugging Face model's forward; this plain nn.Module "
                                 "has none: use recompute='observed'") from None
            replica = None
        else:
            replica = ModelReplica(hf_model, hf_name, device)  # shares the live parameters' storage on their device
        return Auditor(
            spec,
            attacks,
            tapped,
            decoder(tokenizer),
            log_samples=log_samples,
            recompute=recompute,
            recomputer=EvalRecompute(replica) if recompute == "eval" else None,
            max_seconds=max_seconds,
            seed=seed,
            replica=replica,
        )
    if recompute == "eval":
        raise ValueError("recompute='eval' is implemented for text models only; image audits attack the observed "
                         "gradient (recompute='observed')")
    image_spec = image_model_spec(module, network)
    image_replica = ImageReplica(module.get_submodule(image_spec.network), prefix=image_spec.network, device=device)
    scorer = ImageScorer(samples_dir=log_dir / "samples" if log_samples else None)
    return Auditor(
        image_spec,
        attacks,
        tapped,
        scorer=scorer,
        max_seconds=max_seconds,
        seed=seed,
        replica=image_replica,
    )
