"""From an attack's :class:`~leak_audit.attacks.Reconstruction` to the numbers (and opt-in samples) of its record.

A scorer is called by the :class:`~leak_audit.runtime.auditor.Auditor` on the worker thread with the
reconstruction and the snapshot (which holds the private batch), and returns a :class:`Score`: metric
values (every one grows with leakage), optional samples and diagnostics for ``AuditRecord.info``.

* :class:`TextScorer`: ROUGE, token precision/recall, exact match, position recall, label accuracy
  (:func:`~leak_audit.metrics.text.score_text_reconstruction`); samples are decoded text.
* :class:`ImageScorer`: PSNR (dB), SSIM and label accuracy after matching reconstructions to originals
  (:func:`~leak_audit.metrics.image.score_image_reconstruction`). LPIPS is a distance (lower = more
  leakage), so it never enters the metrics, whose worst case is a maximum: it goes to ``info["lpips"]``
  when its backbone weights are on disk, else ``info["lpips_status"]`` says why not. Samples are never
  pixels in the record: with a ``samples_dir`` each scored reconstruction is written to one compressed
  ``.npz`` file there and the record holds its path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from leak_audit.attacks.base import Reconstruction
from leak_audit.capture.batch import ImageBatch, TextBatch
from leak_audit.metrics.image import lpips_status, match_images, psnr, score_image_reconstruction, ssim
from leak_audit.metrics.text import label_accuracy, match_sequences, score_text_reconstruction
from leak_audit.models import TextModelSpec
from leak_audit.capture.snapshot import AuditSnapshot

__all__ = ["ImageScorer", "Score", "Scorer", "TextScorer", "display_images"]

Decode = Callable[[Sequence[int]], str]


@dataclass
class Score:
    """What a scorer returns for one reconstruction.

    Attributes:
        metrics: ``{name: value}``, each growing with leakage.
        samples: opt-in samples for the record (``None`` unless samples are logged).
        info: diagnostics for the record's ``info`` (numbers or short strings).
    """

    metrics: dict[str, float]
    samples: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Scorer(Protocol):
    """``(reconstruction, snapshot) -> Score``; may raise (the auditor records the attack as failed)."""

    def __call__(self, recon: Reconstruction, snapshot: AuditSnapshot) -> Score: ...


class TextScorer:
    """Scores text reconstructions against the snapshot's :class:`~leak_audit.capture.batch.TextBatch`.

    Args:
        spec: the model's spec (its special tokens are left out of token metrics and samples).
        decode: token ids -> text, for ROUGE and samples.
        log_samples: put original and reconstructed text into the records (opt-in: it is private data).
    """

    def __init__(self, spec: TextModelSpec, decode: Decode, *, log_samples: bool = False) -> None:
        self.spec = spec
        self.decode = decode
        self.log_samples = log_samples

    def __call__(self, recon: Reconstruction, snapshot: AuditSnapshot) -> Score:
        batch = snapshot.batch
        if not isinstance(batch, TextBatch):
            raise TypeError(f"TextScorer scores text batches, got {type(batch).__name__}")
        special = self.spec.special_token_ids
        metrics = score_text_reconstruction(recon, batch, self.decode, special)
        if not self.log_samples:
            return Score(metrics)
        refs = [[t for t in s if t not in special] for s in batch.sequences()]
        samples: list[dict] = []
        if recon.sequences is not None:
            preds = [[t for t in s if t not in special] for s in recon.sequences]
            matched = dict((j, i) for i, j in match_sequences(preds, refs))
            for j, ref in enumerate(refs):
                i = matched.get(j)
                samples.append({"reference": self.decode(ref), "reconstruction": self.decode(preds[i]) if i is not None else ""})
        elif recon.token_bag is not None:
            bag = [t for t in recon.token_bag if t not in special]
            samples.append({"reference": " | ".join(self.decode(r) for r in refs), "reconstruction": self.decode(bag)})
        if recon.labels is not None and batch.labels is not None:
            samples.append({"labels": batch.labels.tolist(), "recovered_labels": list(recon.labels)})
        return Score(metrics, samples)


class ImageScorer:
    """Scores image reconstructions against the snapshot's :class:`~leak_audit.capture.batch.ImageBatch`.

    Images are compared in the batch's box of valid values ``(low, high) = batch.bounds``: both are
    shifted by ``low`` and PSNR/SSIM use ``data_range = high - low``; reconstructions are clamped to the
    box first. Labels aligned with the images are scored per matched image, others as a multiset.

    Args:
        samples_dir: where to write one ``audit<NNNNN>-step<NNNNNNN>-<attack>.npz`` per scored
            reconstruction (``originals`` and matched ``reconstructions`` ``[B, C, H, W]`` float32 in the
            model's input space, ``labels``, ``recovered_labels``, per-image ``psnr``); the record's
            ``samples`` is then ``[{"file": <path relative to samples_dir's parent>, "images": B}]``.
            ``None`` (default): nothing is written, ``samples`` stays ``None``.
        with_lpips: compute LPIPS into ``info``; ``None``: when :func:`~leak_audit.metrics.image.lpips_status`
            is ``"available"`` (it never downloads).
    """

    def __init__(self, *, samples_dir: str | os.PathLike[str] | None = None, with_lpips: bool | None = None) -> None:
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        self.with_lpips = lpips_status() == "available" if with_lpips is None else with_lpips

    def __call__(self, recon: Reconstruction, snapshot: AuditSnapshot) -> Score:
        batch = snapshot.batch
        if not isinstance(batch, ImageBatch):
            raise TypeError(f"ImageScorer scores image batches, got {type(batch).__name__}")
        true = [int(y) for y in batch.labels.tolist()]
        if recon.images is None:  # labels only
            metrics = {"label_accuracy": label_accuracy(recon.labels, true)} if recon.labels is not None else {}
            return Score(metrics)
        lo, hi = batch.bounds
        target = batch.images.detach().float().cpu() - lo
        preds = recon.images.detach().float().cpu().clamp(lo, hi) - lo
        aligned = recon.labels if recon.labels is not None and recon.labels_aligned else None
        metrics = score_image_reconstruction(preds, target, hi - lo, labels=aligned, true_labels=true,
                                             with_lpips=self.with_lpips)
        info: dict[str, Any] = {}
        value = metrics.pop("lpips", math.nan)
        if not math.isnan(value):
            info["lpips"] = value
        else:
            info["lpips_status"] = lpips_status() if not self.with_lpips else "unavailable: LPIPS failed"
        if recon.labels is not None and aligned is None:
            metrics["label_accuracy"] = label_accuracy(recon.labels, true)
        samples = self._save(recon, snapshot, preds, target, lo) if self.samples_dir is not None else None
        return Score(metrics, samples, info)

    def _save(
        self, recon: Reconstruction, snapshot: AuditSnapshot, preds: torch.Tensor, target: torch.Tensor, lo: float
    ) -> list[dict[str, Any]]:
        """Write the matched pairs to one ``.npz`` in :attr:`samples_dir`; return the record's samples."""
        assert self.samples_dir is not None
        pairs = sorted(match_images(preds, target), key=lambda ij: ij[1])
        rec_idx = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        tgt_idx = torch.tensor([j for _, j in pairs], dtype=torch.long)
        batch = snapshot.batch
        assert isinstance(batch, ImageBatch)
        recovered = np.array([recon.labels[i] for i, _ in pairs] if recon.labels and recon.labels_aligned else [],
                             dtype=np.int64)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        audit = snapshot.audit
        path = self.samples_dir / f"audit{audit:05d}-step{snapshot.step:07d}-{recon.attack}.npz"
        np.savez_compressed(
            path,
            originals=(target[tgt_idx] + lo).cpu().numpy().astype(np.float32),
            reconstructions=(preds[rec_idx] + lo).cpu().numpy().astype(np.float32),
            labels=batch.labels[tgt_idx].cpu().numpy(),
            recovered_labels=recovered,
            psnr=psnr(preds[rec_idx], target[tgt_idx], float(batch.bounds[1] - batch.bounds[0])).cpu().numpy(),
            ssim=ssim(preds[rec_idx], target[tgt_idx], float(batch.bounds[1] - batch.bounds[0])).cpu().numpy(),
        )
        return [{"file": os.path.relpath(path, self.samples_dir.parent), "images": len(pairs)}]


def display_images(originals: np.ndarray, reconstructions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image samples (as :class:`ImageScorer` writes them) ready to show: ``[N, C, H, W]`` each, in any
    value range, to ``[N, H, W, C]`` in ``[0, 1]`` (``[N, H, W]`` for one channel).

    Both are scaled on the *originals'* range and clipped, so a noisy reconstruction is shown as it is,
    not stretched to full contrast (which would make it look better than it is).
    """
    lo, hi = float(originals.min()), float(originals.max())
    scale = hi - lo if hi > lo else 1.0

    def show(images: np.ndarray) -> np.ndarray:
        out = np.clip((images - lo) / scale, 0.0, 1.0).transpose(0, 2, 3, 1)
        return out[..., 0] if out.shape[-1] == 1 else out

    return show(originals), show(reconstructions)

