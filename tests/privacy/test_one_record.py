"""The one-record attack on preprocessing (issue 10, finding 3).

DP-SGD's guarantee rests on one fact: adding or removing one record changes the sum of
clipped per-sample gradients by at most C (``max_grad_norm``). That holds only if every
other record's features stay the same. A preprocessing fitted on the site's own records
(a z-score with the site's mean and std) moves *every* record when one is added, so the
sum moves by far more than C, and the noise calibrated for C protects nothing.

For a fixed model, each test computes Σ(D) and Σ(D′) — the clipped per-sample gradient
sums over D and over a neighbour D′ (one outlier added, or one record removed), each
after its own dataset's preprocessing fitted on that dataset — and checks
‖Σ(D′) − Σ(D)‖ ≤ C for the default (public) preprocessing. The same computation on the
old per-site z-score exceeds C: proof that the test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from privfl.clients.clipping import clipping_rule
from privfl.data import load_builtin, split_sites
from privfl.models import build_model
from privfl.preprocessing import PreprocessingSpec, fit_preprocessing

C = 1.0  # max_grad_norm
PSAC_R = 0.1


def _site() -> tuple[np.ndarray, np.ndarray]:
    """One hospital's raw training rows (breast_cancer, the example's Dirichlet split)."""
    site = split_sites(load_builtin("breast_cancer"), 4, "dirichlet", seed=0, alpha=0.5)[0]
    return site.train.x, site.train.y


def _outlier(x: np.ndarray) -> np.ndarray:
    """A record far outside every feature's range (50× the largest value seen)."""
    return (x.max(axis=0) * 50.0 + 1.0)[None].astype(np.float32)


def _clipped_sum(x: np.ndarray, y: np.ndarray, spec: PreprocessingSpec) -> torch.Tensor:
    """Σ of DP-PSAC-clipped per-sample gradients of a fixed logreg, after ``spec`` fitted on (x, y)."""
    pre = fit_preprocessing(spec, x, dataset_name="breast_cancer")
    xp = torch.as_tensor(pre.apply(x), dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.int64)
    model = build_model("logreg", (x.shape[1],), 2, seed=0).double()
    with torch.no_grad():  # a fixed, non-trivial model: every record has a sizeable gradient
        for p in model.parameters():
            p.copy_(torch.linspace(-1.0, 1.0, p.numel(), dtype=torch.float64).reshape(p.shape))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(prm: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, prm, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, xp, yt)
    flat = torch.cat([v.reshape(len(xp), -1) for v in g.values()], dim=1)
    norms = flat.norm(dim=1)
    w = clipping_rule("psac", psac_r=PSAC_R).weights(norms, C)
    assert (norms * w < C).all()  # every clipped per-sample gradient is below C
    return (flat * w[:, None]).sum(dim=0)


def _neighbour_gaps(spec: PreprocessingSpec) -> tuple[float, float]:
    """‖Σ(D ∪ {outlier}) − Σ(D)‖ and ‖Σ(D \\ {most extreme record}) − Σ(D)‖."""
    x, y = _site()
    base = _clipped_sum(x, y, spec)
    added = _clipped_sum(np.concatenate([x, _outlier(x)]), np.concatenate([y, [0]]), spec)
    i = int(np.argmax(x[:, 3]))  # the record with the largest area
    keep = np.arange(len(y)) != i
    removed = _clipped_sum(x[keep], y[keep], spec)
    return float((added - base).norm()), float((removed - base).norm())


@pytest.mark.parametrize("spec", [
    PreprocessingSpec(),  # the default: public published ranges
    PreprocessingSpec(transform="log1p"),
    PreprocessingSpec(scaling="none"),
], ids=["public", "public-log1p", "none"])
def test_one_record_moves_the_clipped_sum_by_at_most_C(spec: PreprocessingSpec) -> None:
    add, remove = _neighbour_gaps(spec)
    assert 0 < add <= C
    assert 0 < remove <= C


def test_the_default_is_public() -> None:
    assert PreprocessingSpec().scaling == "public"


def test_per_site_zscore_breaks_the_bound() -> None:
    """The old per-site z-score (research-only "site"): one record moves the sum by more than C
    (measured: ≈77·C for the outlier added, ≈3.2·C for the largest record removed)."""
    add, remove = _neighbour_gaps(PreprocessingSpec(scaling="site"))
    assert add > 10 * C, add
    assert remove > C, remove
