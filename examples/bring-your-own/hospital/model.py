"""The hospital's network: a small CNN for grey-scale digit images.

GroupNorm, never BatchNorm: BatchNorm mixes the records of a batch in the forward pass,
so one record's gradient would depend on the others and per-record clipping (what DP-SGD
rests on) would not bound its influence. privfl refuses a BatchNorm model naming the layer.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitNet(nn.Module):
    """Two 3×3 conv blocks (GroupNorm + ReLU), one 2×2 max-pool, one linear head.

    Input: ``(batch, 1, image_size, image_size)`` floats in [0, 1]; output: class logits.
    About 4k parameters at 8×8: few coordinates for the DP noise to land on.
    """

    def __init__(self, image_size: int = 8, num_classes: int = 10, channels: tuple[int, int] = (8, 16),
                 groups: int = 4) -> None:
        super().__init__()
        if image_size < 2 or image_size % 2:
            raise ValueError(f"image_size must be an even number >= 2, got {image_size}")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, padding=1), nn.GroupNorm(min(groups, c1), c1), nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.GroupNorm(min(groups, c2), c2), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * (image_size // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_net(image_size: int = 8, num_classes: int = 10, channels: list[int] | tuple[int, int] = (8, 16)) -> nn.Module:
    """``[model] factory = "hospital.model:make_net"``; ``[model].args`` are these keywords."""
    return DigitNet(image_size=image_size, num_classes=num_classes, channels=tuple(channels))  # type: ignore[arg-type]


def make_loss() -> nn.Module:
    """``[model] loss = "hospital.model:make_loss"``: cross-entropy averaged over the batch
    (mean reduction, as privfl expects), with a little label smoothing."""
    return nn.CrossEntropyLoss(label_smoothing=0.05)
