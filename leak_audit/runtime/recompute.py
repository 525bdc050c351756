"""Recompute an audited step's gradient with dropout off: the worst-case attacker.

The gradient a model releases in training mode carries dropout noise, which breaks exact span checks.
An attacker who controls the model (a malicious server) can ask for dropout-free gradients. With
``recompute="eval"`` the audit re-runs forward and backward on the snapshot in eval mode, on a private
copy of the Hugging Face model, with the snapshot's parameter values, and attacks that gradient instead.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from torch import Tensor

from leak_audit.capture.batch import TextBatch
from leak_audit.models.replica import ModelReplica

__all__ = ["EvalRecompute"]


class EvalRecompute:
    """Dropout-off gradients of a Hugging Face model on a snapshot.

    The loss is the model's own cross-entropy for ``labels`` (mean over the batch), as in
    ``AutoModelForSequenceClassification``.

    Args:
        replica: a :class:`~leak_audit.models.replica.ModelReplica` of the audited model.
    """

    def __init__(self, replica: ModelReplica) -> None:
        self.replica = replica
        self.trainable = replica.trainable

    def __call__(self, params: Mapping[str, Tensor], batch: TextBatch, names: Collection[str]) -> dict[str, Tensor]:
        """Gradients ``{name: grad}`` of ``names`` at parameter values ``params`` on ``batch``.

        Args:
            params: snapshot values of (at least) every trainable parameter of the model, by root name.
            batch: the audited batch; ``labels`` are required.
            names: root-relative parameter names to differentiate.

        Raises:
            ValueError: the batch has no labels, or a name is outside the Hugging Face model.
        """
        if batch.labels is None:
            raise ValueError("recompute='eval' needs the batch's labels to compute the loss")
        outside = [k for k in names if k not in self.replica.parameter_names]
        if outside:
            raise ValueError(f"cannot recompute gradients of parameters outside the Hugging Face model: {outside}")
        wanted = list(names)
        grads = self.replica.gradients(
            params,
            wanted,
            labels=batch.labels,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            token_type_ids=batch.token_type_ids,
        )
        return dict(zip(wanted, grads, strict=True))
