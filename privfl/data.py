"""Site datasets: shipped scikit-learn sets, a synthetic generator, CSV/NPZ files, and
partitioners that split one dataset across N sites deterministically for a seed.

The splits hold the records as they are: no scaling here. A site's preprocessing is
fitted and applied by :mod:`privfl.preprocessing` from public statistics or a DP
estimate whose cost is in the ledger, never from raw per-site statistics.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from privfl.clients.plugins import resolve_import
from privfl.errors import ConfigError, DataError, PrivflError, error_summary

log = logging.getLogger("privfl.data")

Partitioning = Literal["iid", "dirichlet", "shards", "quantity"]


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (float32, n × …) and integer labels ``y`` (int64, n)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Dataset:
        """The rows ``idx`` of this dataset."""
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.name)


@dataclass(frozen=True)
class SiteData:
    """One site's train and test split (raw records until :mod:`privfl.preprocessing` maps them)."""

    site: int
    train: Dataset
    test: Dataset


def _breast_cancer(seed: int, **_: Any) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets as skd

    b = skd.load_breast_cancer()
    return b.data, b.target


def _digits(seed: int, **_: Any) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets as skd

    b = skd.load_digits()
    return b.data.reshape(-1, 1, 8, 8) / 16.0, b.target


def _synthetic(seed: int, n_samples: int = 2000, n_features: int = 20, n_classes: int = 2,
               **_: Any) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets as skd

    return skd.make_classification(n_samples=n_samples, n_features=n_features,
                                   n_informative=max(2, n_features // 2), n_classes=n_classes, random_state=seed)


#: the shipped datasets by name (``[data].source``); a hospital's own data is a
#: ``[data].factory`` import path, a CSV or an NPZ file instead
DATASETS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "breast_cancer": _breast_cancer, "digits": _digits, "synthetic": _synthetic,
}


def load_builtin(name: str, seed: int = 0, n_samples: int = 2000, n_features: int = 20,
                 n_classes: int = 2) -> Dataset:
    """A dataset that ships with scikit-learn, or a synthetic classification task."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} or give a file")
    x, y = DATASETS[name](seed, n_samples=n_samples, n_features=n_features, n_classes=n_classes)
    return Dataset(np.asarray(x).astype(np.float32), np.asarray(y).astype(np.int64), int(np.max(y)) + 1, name)


def load_csv(path: str | Path, label_column: str) -> Dataset:
    """A CSV file with a header row; ``label_column`` names the label, every other column a numeric feature."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    with p.open(newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{p}: empty file, expected a header row") from None
        header = [h.strip() for h in header]
        if label_column not in header:
            raise DataError(f"{p}: no label column {label_column!r}; columns are {header}")
        li = header.index(label_column)
        feats, labels = [], []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{p}:{lineno}: {len(row)} fields, header has {len(header)}")
            labels.append(row[li].strip())
            vals = []
            for j, v in enumerate(row):
                if j == li:
                    continue
                try:
                    vals.append(float(v))
                except ValueError:
                    raise DataError(
                        f"{p}:{lineno}: column {header[j]!r} holds non-numeric value {v!r}"
                    ) from None
            feats.append(vals)
    if not labels:
        raise DataError(f"{p}: no data rows")
    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels], dtype=np.int64)
    x = np.asarray(feats, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{p}: features contain NaN or infinite values")
    return Dataset(x, y, len(classes), p.stem)


def load_npz(path: str | Path) -> Dataset:
    """An NPZ file holding arrays ``x`` (n × …) and ``y`` (n integer labels)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise DataError(f"{p}: missing array(s) {missing}; an NPZ needs 'x' and 'y'")
            x, y = z["x"], z["y"]
    except (ValueError, OSError) as e:
        raise DataError(f"{p}: not a readable NPZ file ({e})") from None
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{p}: 'x' must be numeric, got dtype {x.dtype}")
    if len(x) != len(y) or y.ndim != 1:
        raise DataError(f"{p}: 'x' has {len(x)} rows but 'y' has shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{p}: 'y' must hold integer labels, got dtype {y.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{p}: 'x' contains NaN or infinite values")
    _, y = np.unique(y, return_inverse=True)
    return Dataset(x.astype(np.float32), y.astype(np.int64), int(y.max()) + 1, p.stem)


def load_dataset(source: str, label_column: str | None = None, seed: int = 0) -> Dataset:
    """A built-in dataset by name, or a ``.csv``/``.npz`` file by path."""
    if source in DATASETS:
        return load_builtin(source, seed=seed)
    if source.endswith(".csv"):
        if not label_column:
            raise DataError(f"{source}: a CSV needs label_column naming the label")
        return load_csv(source, label_column)
    if source.endswith(".npz"):
        return load_npz(source)
    raise DataError(f"unknown data source {source!r}: a built-in name ({', '.join(DATASETS)}) or a .csv/.npz path")


def partition(
    y: np.ndarray,
    num_sites: int,
    method: Partitioning = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_site: int = 2,
    min_per_site: int = 2,
) -> list[np.ndarray]:
    """Indices of each site's rows: IID, Dirichlet(α) label skew, label shards or quantity skew."""
    n = len(y)
    if num_sites < 1:
        raise DataError(f"num_sites must be >= 1, got {num_sites}")
    if n < num_sites * min_per_site:
        raise DataError(
            f"too few samples ({n}) for {num_sites} sites: each site needs at least {min_per_site}"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(n), num_sites)
    elif method == "dirichlet":
        if not alpha > 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        parts = _dirichlet(y, num_sites, alpha, rng, min_per_site)
    elif method == "shards":
        total = num_sites * shards_per_site
        if total > n:
            raise DataError(f"{total} shards requested but only {n} samples")
        order = np.argsort(y, kind="stable")
        shards = np.array_split(order, total)
        ids = rng.permutation(total)
        parts = [np.concatenate([shards[s] for s in ids[i::num_sites]]) for i in range(num_sites)]
    elif method == "quantity":
        if not alpha > 0:
            raise DataError(f"quantity alpha must be > 0, got {alpha}")
        props = rng.dirichlet([alpha] * num_sites)
        counts = np.maximum(min_per_site, np.floor(props * (n - num_sites * min_per_site)).astype(int) + min_per_site)
        counts[-1] = n - counts[:-1].sum()
        if counts[-1] < min_per_site:
            counts = np.full(num_sites, n // num_sites)
            counts[-1] += n - counts.sum()
        perm = rng.permutation(n)
        parts = np.split(perm, np.cumsum(counts)[:-1])
    else:
        raise DataError(f"unknown partitioning {method!r}: use iid, dirichlet, shards or quantity")
    return [np.sort(p) for p in parts]


def _dirichlet(y: np.ndarray, k: int, alpha: float, rng: np.random.Generator, min_size: int) -> list[np.ndarray]:
    classes = np.unique(y)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet([alpha] * k)
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.array(p, dtype=np.int64) for p in parts]
    raise DataError(f"Dirichlet(alpha={alpha}) split left a site with fewer than {min_size} samples; raise alpha")


def split_sites(
    data: Dataset,
    num_sites: int,
    method: Partitioning = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    shards_per_site: int = 2,
) -> list[SiteData]:
    """Partition ``data`` across sites, then split each site into train/test (records unscaled:
    preprocess them with :func:`privfl.preprocessing.preprocess_site`)."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    parts = partition(data.y, num_sites, method, seed, alpha, shards_per_site, min_per_site=4)
    rng = np.random.default_rng(seed + 1)
    sites = []
    for i, idx in enumerate(parts):
        idx = rng.permutation(idx)
        n_test = max(1, int(round(len(idx) * test_fraction)))
        tr, te = data.subset(np.sort(idx[n_test:])), data.subset(np.sort(idx[:n_test]))
        sites.append(SiteData(i, tr, te))
    return sites


# ---- the hospital's own data: a dataset factory by import path ---------------------------


@dataclass(frozen=True)
class FactorySite:
    """One site's train and test torch Datasets from a user's ``[data].factory`` (records stay
    on the site: only their layout — the shape of one input — is read here)."""

    site: int
    train: Any  # torch.utils.data.Dataset yielding (input, label)
    test: Any
    in_shape: tuple[int, ...]


def load_factory_site(factory: str, site_index: int, num_sites: int, root: str | None,
                      args: Mapping[str, Any] | None, where: str = "[data]") -> FactorySite:
    """Call ``factory(site_index=, num_sites=, root=, **args)`` and check what it returns.

    It must return ``(train, test)``: map-style torch Datasets (with a length) of
    ``(input tensor, integer label)``, or DataLoaders over them (their Datasets are used).
    One-line ConfigError/DataError naming ``where`` otherwise; an exception inside the
    user's code is reported on one line too.
    """
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    fn = resolve_import(factory, f"{where}.factory")
    kwargs: dict[str, Any] = {"site_index": site_index, "num_sites": num_sites, **dict(args or {})}
    if root is not None:
        if not Path(root).exists():
            raise ConfigError(f"{where}.root: folder not found: {root}")
        kwargs["root"] = root
    try:
        out = fn(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}.factory: {factory} does not take these arguments ({exc}); it is called "
                          f"with {', '.join(sorted(kwargs))}") from None
    except PrivflError:
        raise
    except Exception as exc:  # noqa: BLE001 - the hospital's own code: one line naming it, traceback logged
        log.debug("%s.factory: %s failed for site %d", where, factory, site_index, exc_info=True)
        first = error_summary(exc) if str(exc).strip() else ""
        raise DataError(f"{where}.factory: {factory} failed for site {site_index}: {type(exc).__name__}: {first} "
                        "(its traceback is logged at level DEBUG)") from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ConfigError(f"{where}.factory: {factory} must return (train, test) Datasets, got "
                          f"{type(out).__name__}")
    # a Flower-quickstart load_data returns DataLoaders: their Datasets are the records (DP-SGD
    # draws its own Poisson batches, so the loaders' batching and shuffling are not used)
    train: Any = out[0].dataset if isinstance(out[0], DataLoader) else out[0]
    test: Any = out[1].dataset if isinstance(out[1], DataLoader) else out[1]
    for name, ds in (("train", train), ("test", test)):
        if not isinstance(ds, TorchDataset):
            raise ConfigError(f"{where}.factory: {factory} returned a {type(ds).__name__} as its {name} split, "
                              "not a torch.utils.data.Dataset")
        try:
            len(cast(Sized, ds))  # probed: a torch Dataset need not define __len__
        except TypeError:
            raise ConfigError(f"{where}.factory: the {name} Dataset has no length (Poisson sampling draws over "
                              "its indices)") from None
    if len(train) == 0:
        raise DataError(f"{where}.factory: site {site_index}'s train Dataset is empty")
    first = train[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise ConfigError(f"{where}.factory: a Dataset item must be (input, label), got {type(first).__name__}")
    shape = tuple(int(d) for d in getattr(first[0], "shape", np.shape(first[0])))
    return FactorySite(site_index, train, test, shape)


@dataclass(frozen=True)
class SiteInputs:
    """What a site's client trains and evaluates on, whatever the source: ``(x, y)`` arrays of a
    (preprocessed) :class:`SiteData`, or the torch Datasets of a user's factory."""

    site: int
    train: Any  # (x, y) numpy arrays or a torch Dataset of (input, label)
    test: Any
    in_shape: tuple[int, ...]
    num_classes: int  # 0: not declared (a user model factory knows its own)

    @classmethod
    def of_arrays(cls, site: SiteData) -> SiteInputs:
        """The inputs of a shipped set / CSV / NPZ partition."""
        return cls(site.site, (site.train.x, site.train.y), (site.test.x, site.test.y),
                   tuple(int(d) for d in site.train.x.shape[1:]), site.train.num_classes)

    @classmethod
    def of_factory(cls, fs: FactorySite, num_classes: int) -> SiteInputs:
        """The inputs of a user's ``[data].factory`` (``num_classes`` as ``[data]`` declares it)."""
        return cls(fs.site, fs.train, fs.test, fs.in_shape, int(num_classes))

    @property
    def train_size(self) -> int:
        """Training records (private: for the site's own logs only)."""
        return len(self.train[1]) if isinstance(self.train, tuple) else len(self.train)

    @property
    def test_size(self) -> int:
        """Test records (private: for the site's own logs only)."""
        return len(self.test[1]) if isinstance(self.test, tuple) else len(self.test)
