"""Image classifiers, and which modality a LightningModule is audited as.

Image classifiers are described by an :class:`ImageModelSpec`: which submodule maps images to logits
(:func:`find_image_network`), its parameter names and its last linear layer (the classifier, for label
recovery). :func:`model_modality` says whether a LightningModule is audited as text or images.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leak_audit.models.generic import has_token_embedding
from leak_audit.models.hf import UnsupportedModelError, find_hf_model, join_names, unwrap_linear

__all__ = ["MODALITIES", "ImageModelSpec", "find_image_network", "image_model_spec", "model_modality"]

MODALITIES: tuple[str, ...] = ("text", "image")
"""What the callback can audit; attacks are registered per modality."""


@dataclass(frozen=True)
class ImageModelSpec:
    """Names and constants of an image classifier, relative to the audited root module.

    Attributes:
        network: module name of the classifier inside the root, images ``[B, C, H, W]`` to logits
            ``[B, K]`` (``""``: the root itself, through its ``forward``).
        model_type: the network's class name.
        parameter_names: every parameter of the network (root-relative names).
        classifier_weight: weight ``[K, d]`` of the network's last ``nn.Linear`` (``None`` without one).
        classifier_bias: its bias ``[K]`` (``None`` without one).
        num_labels: ``K``, the last linear layer's outputs; 0 when unknown (attacks then read it from the
            logits of a forward pass).
    """

    network: str
    model_type: str
    parameter_names: frozenset[str]
    classifier_weight: str | None
    classifier_bias: str | None
    num_labels: int


def _find_hf(root: nn.Module) -> tuple[str, nn.Module] | None:
    try:
        return find_hf_model(root)
    except (UnsupportedModelError, ImportError):
        return None


def model_modality(root: nn.Module) -> str:
    """``"text"`` or ``"image"``: what ``root`` (a LightningModule) is audited as, from its model alone.

    A Hugging Face model inside decides by its ``main_input_name``: ``"input_ids"`` is text,
    ``"pixel_values"`` is images (ViT, ConvNeXt, ...). Without one, a module holding an ``nn.Embedding`` and no
    convolution is a plain language model (``"text"``, :func:`~leak_audit.models.generic.has_token_embedding`);
    any other ``nn.Module`` classifier is audited as an image model.

    Raises:
        UnsupportedModelError: a Hugging Face model whose main input is neither (audio, ...).
    """
    hf = _find_hf(root)
    if hf is None:
        return "text" if has_token_embedding(root) else "image"
    main = getattr(hf[1], "main_input_name", "input_ids")
    if main == "input_ids":
        return "text"
    if main == "pixel_values":
        return "image"
    raise UnsupportedModelError(
        f"{type(hf[1]).__name__} takes {main!r}; leak_audit audits text ('input_ids') and image ('pixel_values') "
        "models"
    )


def _overrides_forward(root: nn.Module) -> bool:
    forward = getattr(type(root), "forward", None)
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover - lightning is a dependency
        return forward is not nn.Module.forward
    return forward not in (nn.Module.forward, LightningModule.forward)


def find_image_network(root: nn.Module, network: str | None = None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the image classifier inside ``root``: the module that maps the training
    images ``[B, C, H, W]`` to logits ``[B, K]``.

    Args:
        root: the audited module (usually the LightningModule).
        network: the classifier's module name inside ``root`` (``""``: ``root`` itself, through its
            ``forward``); ``None`` finds it: (1) a Hugging Face image model (``main_input_name ==
            "pixel_values"``); else (2) the one direct child that holds every trainable parameter
            (``self.model``, ``self.net``, ...); else (3) ``root`` itself when it defines ``forward``.

    Raises:
        UnsupportedModelError: ``network`` names no submodule (with the closest names), or none of the
            rules above finds one (the message lists the children and asks for ``network=``).
    """
    modules = dict(root.named_modules())
    if network is not None:
        if network not in modules:
            import difflib

            close = difflib.get_close_matches(network, [n for n in modules if n], n=3, cutoff=0.4)
            raise UnsupportedModelError(
                f"network={network!r} names no submodule of {type(root).__name__}"
                + (f"; closest: {', '.join(close)}" if close else "")
                + " ('' is the LightningModule itself)"
            )
        return network, modules[network]
    hf = _find_hf(root)
    if hf is not None and getattr(hf[1], "main_input_name", None) == "pixel_values":
        return hf
    trainable = {n for n, p in root.named_parameters() if p.requires_grad}
    owners = [
        name for name, child in root.named_children()
        if trainable and trainable <= {f"{name}.{n}" for n, p in child.named_parameters() if p.requires_grad}
    ]
    if len(owners) == 1:
        return owners[0], modules[owners[0]]
    if _overrides_forward(root):
        return "", root
    children = [n for n, _ in root.named_children()]
    raise UnsupportedModelError(
        f"cannot tell which part of {type(root).__name__} maps images to logits: no direct child holds every "
        f"trainable parameter (children: {children}) and it defines no forward; pass LeakageAudit(network=NAME) "
        "with the module name of the classifier ('' for the LightningModule's own forward)"
    )


def image_model_spec(root: nn.Module, network: str | None = None) -> ImageModelSpec:
    """Build the :class:`ImageModelSpec` of the image classifier inside ``root`` (see :func:`find_image_network`).

    Raises:
        UnsupportedModelError: see :func:`find_image_network`.
    """
    name, net = find_image_network(root, network)
    last = None
    for mod_name, module in net.named_modules():
        lin = unwrap_linear(module)
        if isinstance(lin, nn.Linear):
            suffix = "base_layer." if lin is not module else ""
            last = (join_names(name, mod_name, suffix + "weight"),
                    join_names(name, mod_name, suffix + "bias") if lin.bias is not None else None,
                    int(lin.out_features))
    return ImageModelSpec(
        network=name,
        model_type=type(net).__name__,
        parameter_names=frozenset(join_names(name, n) for n, _ in net.named_parameters()),
        classifier_weight=last[0] if last else None,
        classifier_bias=last[1] if last else None,
        num_labels=last[2] if last else 0,
    )
