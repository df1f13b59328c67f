"""Data loading and partitioning: determinism, skew, raw (unscaled) site splits, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from privfl.data import load_builtin, load_csv, load_dataset, load_npz, partition, split_sites
from privfl.errors import DataError
from privfl.models import build_model


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards", "quantity"])
def test_partitions_cover_all_rows_once_and_are_deterministic(method):
    y = load_builtin("digits").y
    a = partition(y, 8, method, seed=3, alpha=0.3)
    b = partition(y, 8, method, seed=3, alpha=0.3)
    allidx = np.concatenate(a)
    assert sorted(allidx.tolist()) == list(range(len(y)))
    assert all((x == z).all() for x, z in zip(a, b))
    assert min(len(p) for p in a) >= 2


def test_dirichlet_small_alpha_skews_labels():
    y = load_builtin("digits").y
    skewed = partition(y, 8, "dirichlet", seed=0, alpha=0.1)
    iid = partition(y, 8, "iid", seed=0)
    def max_share(parts):
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])
    assert max_share(skewed) > 2 * max_share(iid)


def test_split_sites_returns_raw_rows_and_the_same_split_as_before():
    """No scaling in split_sites (privfl.preprocessing does it); the partition is unchanged:
    the figures are those the old split_sites(..., scaling="none") gave for this seed."""
    data = load_builtin("breast_cancer")
    sites = split_sites(data, 4, "dirichlet", seed=0, alpha=0.5)
    got = [(len(s.train), len(s.test), int(s.train.y.sum()), round(float(s.train.x[:, 0].sum()), 3)) for s in sites]
    assert got == [(133, 33, 125, 1638.391), (168, 42, 42, 2736.368), (23, 6, 10, 358.77), (131, 33, 112, 1696.955)]
    rows = {r.tobytes() for r in data.x}
    for s in sites:  # every site row is a record of the dataset, bit for bit
        assert all(r.tobytes() in rows for r in np.concatenate([s.train.x, s.test.x]))
    assert max(float(s.train.x.max()) for s in sites) > 1000  # raw areas, not z-scores
    with pytest.raises(TypeError):
        split_sites(data, 4, scaling="site")  # type: ignore[call-arg]  # one way to preprocess


def test_csv_and_npz(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b,label\n1,2,yes\n3,4,no\n5,6,yes\n")
    d = load_csv(p, "label")
    assert d.x.shape == (3, 2) and d.num_classes == 2
    with pytest.raises(DataError, match="no label column 'target'"):
        load_csv(p, "target")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1,x\nfoo,y\n")
    with pytest.raises(DataError, match="column 'a' holds non-numeric value 'foo'"):
        load_csv(bad, "label")
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "missing.csv"), label_column="y")
    z = tmp_path / "d.npz"
    np.savez(z, x=np.random.rand(10, 3), y=np.arange(10) % 2)
    assert len(load_npz(z)) == 10
    np.savez(tmp_path / "nox.npz", y=np.arange(3))
    with pytest.raises(DataError, match="missing array"):
        load_npz(tmp_path / "nox.npz")


def test_too_few_samples_for_sites():
    with pytest.raises(DataError, match="too few samples"):
        partition(np.arange(10), 8, "iid")


@pytest.mark.parametrize("name,shape,classes", [("logreg", (30,), 2), ("mlp", (30,), 2), ("cnn", (1, 8, 8), 10)])
def test_models_by_name(name, shape, classes):
    import torch
    m = build_model(name, shape, classes, seed=0)
    assert m(torch.zeros(4, *shape)).shape == (4, classes)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
