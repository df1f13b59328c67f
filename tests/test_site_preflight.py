"""Before any DP step, a site's model, loss and records go through one forward pass: a model that
does not fit the data, labels outside 0..C-1 or non-finite records fail as one line naming the
config section (ConfigError), never a traceback after budget was spent. A plain
``loss(logits, target)`` function is a loss, as the README says."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from privfl.accounting.errors import ConfigError
from privfl.clients import DPConfig
from privfl.clients.losses import build_loss
from privfl.data import SiteInputs
from privfl.site import ClientBuild, build_client

pytestmark = pytest.mark.timeout(60)


def focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A focal loss as a hospital would write it: a plain function of (logits, target)."""
    ce = nn.functional.cross_entropy(logits, target, reduction="none")
    return ((1 - torch.exp(-ce)) ** 2 * ce).mean()


def _site(features: int = 6, n: int = 64, classes: int = 2, labels: np.ndarray | None = None,
          x: np.ndarray | None = None) -> SiteInputs:
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(n, features)).astype(np.float32) if x is None else x
    ys = rng.integers(0, classes, size=n) if labels is None else labels
    return SiteInputs(0, (xs, ys), (xs[:8], ys[:8]), (features,), classes)


def _build(model: nn.Module, site: SiteInputs, loss: str = "cross_entropy") -> Any:
    dp = DPConfig(noise_multiplier=1.0, batch_size=8, sample_rate=0.125, lr=0.1, target_epsilon=8.0)
    return build_client(ClientBuild(dp=dp, site_index=0, num_sites=1, local_steps=1, model=model, site=site,
                                    loss=loss, where="h.toml: [client]"))


def test_a_model_that_fits_trains_and_a_loss_function_is_a_loss() -> None:
    client = _build(nn.Linear(6, 2), _site())
    assert client is not None
    assert build_loss("tests.test_site_preflight:focal") is focal
    assert _build(nn.Linear(6, 2), _site(), loss="tests.test_site_preflight:focal") is not None


@pytest.mark.parametrize(("model", "site", "needles"), [
    (nn.Linear(5, 2), _site(features=6), ["h.toml: [model]", "inputs (6,)", "RuntimeError", "mat1 and mat2"]),
    (nn.Linear(6, 1), _site(), ["h.toml: [model]", "IndexError", "out of bounds"]),
    (nn.Linear(6, 2), _site(labels=np.array([0, 1, 2, -1] * 16)), ["h.toml: [data]", "labels must be 0..1"]),
    # 3 classes declared, a 2-output model, and the first records' labels happen to be 0 and 1 only
    (nn.Linear(6, 2), _site(classes=3, labels=np.array([0, 1] * 32)),
     ["h.toml: [model]", "2 outputs per record", "[data].num_classes = 3"]),
    # and when they do include a 2, the same sentence (not the loss's IndexError)
    (nn.Linear(6, 2), _site(classes=3, labels=np.array([0, 1, 2] * 22)[:64]),
     ["h.toml: [model]", "2 outputs per record", "[data].num_classes = 3"]),
])
def test_a_model_or_data_that_does_not_fit_fails_in_one_line(model: nn.Module, site: SiteInputs,
                                                              needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        _build(model, site)
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_non_finite_records_of_a_data_factory_fail_before_training() -> None:
    """A factory's torch Dataset is not scanned at load: its first records are, here."""
    x = torch.randn(32, 6)
    x[0, 3] = float("nan")
    site = SiteInputs(0, TensorDataset(x, torch.zeros(32, dtype=torch.long)), None, (6,), 2)
    with pytest.raises(ConfigError, match=r"\[data\]: the training records contain NaN or infinite values"):
        _build(nn.Linear(6, 2), site)


def test_the_preflight_trains_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    _build(model, _site())
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert model.training
