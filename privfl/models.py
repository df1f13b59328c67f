"""Models built by name from config; all are DP-compatible (GroupNorm, never BatchNorm)."""

from __future__ import annotations

import math

import torch
from torch import nn

from privfl.errors import ConfigError

MODELS = ("logreg", "mlp", "cnn")


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected net with ReLU hidden layers, on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two conv blocks with GroupNorm, for small images (e.g. 1×8×8 digits)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ConfigError(f"model 'cnn' needs image inputs (C, H, W); got feature shape {in_shape}")
        c, h, w = in_shape
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.GroupNorm(min(4, c1), c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(min(4, c2), c2), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * (h // 2) * (w // 2), 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int, seed: int | None = None,
                hidden: tuple[int, ...] = (64, 32)) -> nn.Module:
    """The model ``name`` for inputs of shape ``in_shape`` (without the batch axis)."""
    if seed is not None:
        torch.manual_seed(seed)
    flat = math.prod(in_shape)
    if name == "logreg":
        return LogisticRegression(flat, num_classes)
    if name == "mlp":
        return MLP(flat, num_classes, hidden)
    if name == "cnn":
        return SmallCNN(tuple(in_shape), num_classes)
    raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(MODELS)}")
