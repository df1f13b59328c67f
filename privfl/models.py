"""Models built from config: a built-in by name (all DP-compatible: GroupNorm, never
BatchNorm) or the hospital's own ``nn.Module`` factory by import path (``[model].factory``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from privfl.clients.plugins import is_import_path, resolve_import
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


ModelFactory = Callable[..., nn.Module]


def _logreg(in_shape: tuple[int, ...], num_classes: int, **_: Any) -> nn.Module:
    return LogisticRegression(math.prod(in_shape), num_classes)


def _mlp(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (64, 32), **_: Any) -> nn.Module:
    return MLP(math.prod(in_shape), num_classes, tuple(hidden))


def _cnn(in_shape: tuple[int, ...], num_classes: int, **_: Any) -> nn.Module:
    return SmallCNN(tuple(in_shape), num_classes)


#: built-in models by name; a user's model is a ``"pkg.module:name"`` import path instead
BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"logreg": _logreg, "mlp": _mlp, "cnn": _cnn}


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int, seed: int | None = None,
                hidden: tuple[int, ...] = (64, 32), args: Mapping[str, Any] | None = None) -> nn.Module:
    """The model ``name`` for inputs of shape ``in_shape`` (without the batch axis).

    ``name`` is a built-in (:data:`BUILTIN_MODELS`) or a user factory ``"pkg.module:name"``
    called with ``args`` as keyword arguments (it knows its own input shape). ``seed``
    fixes the initial weights (the same public model at every site).
    """
    if seed is not None:
        torch.manual_seed(seed)
    if is_import_path(name):
        factory = resolve_import(name, "[model].factory")
        try:
            model = factory(**dict(args or {}))
        except TypeError as exc:
            raise ConfigError(f"[model].args: {name} does not take these arguments ({exc})") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"[model].factory: {name} returned {type(model).__name__}, not a torch nn.Module")
        return model
    if name in BUILTIN_MODELS and num_classes < 1:
        raise ConfigError(f"[data].num_classes: the built-in model {name!r} needs the class count; declare it "
                          "in [data] (a data factory's labels are the site's own), or give [model].factory")
    if name not in BUILTIN_MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(MODELS)} "
                          "or give [model].factory = 'package.module:name'")
    return BUILTIN_MODELS[name](tuple(in_shape), num_classes, hidden=tuple(hidden), **dict(args or {}))
