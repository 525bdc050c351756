"""Reference image classifiers from the gradient-inversion literature, for tests, benchmarks and examples."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LeNet"]


class LeNet(nn.Module):
    """The LeNet variant of Deep Leakage from Gradients (Zhu et al. 2019, their ``models/vision.py``).

    Three 5×5 convolutions of 12 channels (strides 2, 2, 1) with sigmoid activations, then one linear
    layer. Sigmoids keep every gradient dense, which is why DLG recovers images from it nearly exactly.

    Args:
        num_classes: ``K`` outputs.
        channels: input channels ``C``.
        image_size: input side ``H = W`` (a multiple of 4).
        seed: when given, every weight and bias is drawn uniformly from ``[-0.5, 0.5]`` with this seed
            (DLG's initialisation); otherwise PyTorch's default initialisation.

    Shapes:
        ``[B, C, H, W]`` images to ``[B, K]`` logits.

    Raises:
        ValueError: ``image_size`` is not a positive multiple of 4, or ``num_classes < 2``.
    """

    def __init__(self, num_classes: int = 10, channels: int = 3, image_size: int = 32, seed: int | None = None) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {image_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(12 * (image_size // 4) ** 2, num_classes)
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.parameters():
                    p.uniform_(-0.5, 0.5, generator=gen)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x).flatten(1))
