"""A site's feature preprocessing, fitted from public statistics or a DP estimate only.

The project rule: a value leaves a node only if it is DP output or public by
declaration. A preprocessing step fitted on the site's own records (say a z-score with
the site's mean and std) is a function of every record, so one added record moves
every other record's features, and DP-SGD's "one record changes the clipped-gradient sum
by at most C" no longer holds (measured: 8.5·C). So a site preprocesses with:

* ``public`` (the default): declared per-feature ranges ``low``/``high`` the consortium
  agrees on — a statistics file, or the published ranges of a shipped dataset. Each
  value is clipped to its declared range and mapped to ``[−1, 1]``:
  ``(x − (low + high)/2) / ((high − low)/2)``, so every record is bounded and the map
  does not depend on any record. The centre is the declared range's midpoint, the same
  at every site, so it cannot be pulled towards a site's majority class; zero-centred
  inputs train faster than [0, 1] ones (async gossip on breast_cancer at lr 0.5: 0.78
  with [0, 1], 0.90 with [−1, 1]).
* ``dp``: a Gaussian-mechanism estimate of each feature's location and scale. Values
  are clipped to ``[−dp_bound, dp_bound]`` (after the transform); each record adds the
  vector ``[1, u, u²]`` with ``u = clip(x) / dp_bound`` to one sum (count, sums, sums of
  squares in one query, L2 sensitivity ``√(1 + 2d)`` under add/remove one record), and
  ``N(0, (σ·√(1 + 2d))²)`` noise is added once. Mean and std are post-processing of the
  noisy sums. Features are divided by the DP std and *not centred* unless
  ``dp_centre``: under label skew a per-site centre is pulled towards the site's majority
  class, so the same value means different things at different sites (a central logreg
  drops from 0.94 to 0.78 on breast_cancer with Dirichlet α = 0.5). Its cost is a
  :class:`PreprocessingEvent` (a Poisson-sampled Gaussian with q = 1, one step), which
  the caller composes into the site's accountant and writes to its ledger before training.
* ``none``: features as they are (after the transform).
* ``site``: the old per-site z-score, for research in ``privfl simulate``/``compare`` only;
  it releases private statistics outside DP, and :func:`check_deployable` refuses it.

``transform = "log1p"`` applies ``log1p`` to each value first (non-negative features
only); public ranges are transformed with it.

Statistics file (TOML, like every privfl config)::

    source = "consortium agreement 2025-03, ranges from the lab's reference manual"
    low  = [0.0, 10.0, ...]     # one number per feature (flattened order)
    high = [1.0, 40.0, ...]     # each high > its low
    features = ["age", ...]     # optional names, one per feature

Built-in published statistics: ``breast_cancer`` — the min/max table published in
scikit-learn's dataset description (``load_breast_cancer().DESCR``, "Summary
Statistics"); ``digits`` — pixels are 0..16 by definition, [0, 1] after the loader's
division by 16; ``synthetic`` — no ranges: ``make_classification`` draws unit-variance
clusters around ±1 vertices (shift 0, scale 1), so its features are already on a common
unit scale and any declared range would be arbitrary; public scaling leaves them as
generated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from privfl.clients.randomness import RandomSource, SecureRandom
from privfl.data import Dataset, SiteData
from privfl.errors import ConfigError, DataError

__all__ = [
    "BREAST_CANCER_RANGES",
    "BUILTIN_STATISTICS",
    "DEPLOYABLE_SCALINGS",
    "FEATURE_MOMENTS",
    "RETIRED_SCALINGS",
    "SCALINGS",
    "TRANSFORMS",
    "Preprocessing",
    "PreprocessingEvent",
    "PreprocessingSpec",
    "PublicStatistics",
    "builtin_statistics",
    "check_deployable",
    "fit_preprocessing",
    "load_preprocessing",
    "load_statistics",
    "preprocess_site",
    "save_preprocessing",
    "spec_description",
]

log = logging.getLogger("privfl.data")

SCALINGS: tuple[str, ...] = ("public", "dp", "none", "site")
DEPLOYABLE_SCALINGS: tuple[str, ...] = ("public", "dp", "none")
TRANSFORMS: tuple[str, ...] = ("none", "log1p")
FEATURE_MOMENTS = "feature_moments"
#: names that meant per-site statistics outside DP, and what to write instead
RETIRED_SCALINGS: dict[str, str] = {
    "scale": "'scale' divided by the site's own std, a private statistic outside DP; use scaling = 'public' "
             "(declared ranges) or 'dp' (a DP estimate of the std, in the ledger); neither centres",
    "log": "'log' took log1p then divided by the site's own std, a private statistic outside DP; "
           "use transform = 'log1p' with scaling = 'public' (or 'dp')",
}
_CHOICES = ("'public' (declared ranges: a statistics file or a shipped dataset's published ranges), "
            "'dp' (a DP estimate whose cost is in the ledger) or 'none'")
_STAT_KEYS = ("low", "high", "source", "features")

#: the published min/max table of scikit-learn's breast-cancer description
#: (``sklearn.datasets.load_breast_cancer().DESCR``, "Summary Statistics"; UCI WDBC,
#: Wolberg, Street & Mangasarian 1995), in the loader's feature order. Documentation of
#: the dataset, not a statistic privfl computes; tests check it against the DESCR.
BREAST_CANCER_RANGES: tuple[tuple[float, float], ...] = (
    (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
    (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
    (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
    (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
    (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
    (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
)
#: datasets with built-in public statistics (synthetic: none needed, see module doc)
BUILTIN_STATISTICS: tuple[str, ...] = ("breast_cancer", "digits", "synthetic")


# ---- the spec ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PreprocessingSpec:
    """How a site preprocesses its features (all public: it is part of the config)."""

    scaling: str = "public"
    transform: str = "none"
    #: a public statistics file (TOML); "" = the built-in published statistics of a shipped dataset
    statistics: str = ""
    #: σ of the DP estimate (scaling "dp"): noise std σ·√(1 + 2d) on the [count, sums, sums of squares]
    dp_noise_multiplier: float = 0.0
    #: the public bound each feature value is clipped to after the transform (scaling "dp")
    dp_bound: float = 0.0
    #: subtract the DP mean too (scaling "dp"); off by default: per-site centring hurts under label skew
    dp_centre: bool = False

    def validate(self, where: str = "[data]") -> None:
        """Raise a one-line ConfigError naming ``<where>.<field>`` for the first bad value."""
        if self.scaling in RETIRED_SCALINGS:
            raise ConfigError(f"{where}.scaling: {RETIRED_SCALINGS[self.scaling]}")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"{where}.scaling: must be public, dp, none or site, got {self.scaling!r}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"{where}.transform: must be none or log1p, got {self.transform!r}")
        if self.scaling == "dp":
            for name in ("dp_noise_multiplier", "dp_bound"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                    raise ConfigError(f"{where}.{name}: scaling 'dp' needs a finite number > 0, got {v!r}")
        else:
            for name in ("dp_noise_multiplier", "dp_bound"):
                if getattr(self, name):
                    raise ConfigError(f"{where}.{name}: only used with scaling = 'dp' "
                                      f"(scaling is {self.scaling!r}); remove it")
            if self.dp_centre:
                raise ConfigError(f"{where}.dp_centre: only used with scaling = 'dp' (scaling is {self.scaling!r})")
        if self.statistics and self.scaling != "public":
            raise ConfigError(f"{where}.statistics: only read with scaling = 'public' (scaling is {self.scaling!r})")


def check_deployable(spec: PreprocessingSpec, where: str = "[data]") -> None:
    """Refuse preprocessing a deployed node must not run (``privfl node``/``launch``): ``site``."""
    spec.validate(where)
    if spec.scaling not in DEPLOYABLE_SCALINGS:
        raise ConfigError(f"{where}.scaling: {spec.scaling!r} z-scores with the site's own mean and std, private "
                          f"statistics outside DP, so a node refuses it (simulate/compare only); use {_CHOICES}")


def spec_description(spec: PreprocessingSpec) -> dict[str, Any]:
    """The spec as a JSON-safe dict (what a saved preprocessing was fitted from)."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


# ---- public statistics ------------------------------------------------------------------
@dataclass(frozen=True)
class PublicStatistics:
    """Declared per-feature ranges (raw units, flattened feature order), and where they come from."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    source: str
    path: str = ""
    sha256: str = ""

    def describe(self) -> dict[str, Any]:
        """JSON-safe description (public)."""
        d: dict[str, Any] = {"source": self.source}
        if self.path:
            d.update(path=self.path, sha256=self.sha256)
        return d


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _numbers(value: Any, key: str, p: Path, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}.statistics: {p}: {key} must be a non-empty list of numbers")
    for j, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}.statistics: {p}: {key}[{j}] must be a number, got {v!r}")
        if not math.isfinite(v):
            raise ConfigError(f"{where}.statistics: {p}: {key}[{j}] must be finite, got {v!r}")
    return tuple(float(v) for v in value)


def load_statistics(path: str | Path, where: str = "[data]") -> PublicStatistics:
    """Read a public statistics file (TOML: ``low``, ``high``, optional ``source``/``features``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}.statistics: public statistics file not found: {p}")
    raw = p.read_bytes()
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{where}.statistics: {p}: not a valid TOML file ({_one_line(e)})") from None
    unknown = sorted(set(table) - set(_STAT_KEYS))
    if unknown:
        raise ConfigError(f"{where}.statistics: {p}: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(_STAT_KEYS)}")
    for key in ("low", "high"):
        if key not in table:
            raise ConfigError(f"{where}.statistics: {p}: missing {key} (one number per feature)")
    low = _numbers(table["low"], "low", p, where)
    high = _numbers(table["high"], "high", p, where)
    if len(low) != len(high):
        raise ConfigError(f"{where}.statistics: {p}: low has {len(low)} values but high has {len(high)}")
    bad = [j for j in range(len(low)) if not low[j] < high[j]]
    if bad:
        j = bad[0]
        raise ConfigError(f"{where}.statistics: {p}: feature {j}: low ({low[j]:g}) must be < high ({high[j]:g})")
    source = table.get("source", "")
    if not isinstance(source, str):
        raise ConfigError(f"{where}.statistics: {p}: source must be a string")
    names = table.get("features")
    if names is not None and (not isinstance(names, list) or len(names) != len(low)
                              or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{where}.statistics: {p}: features must be {len(low)} strings, one per feature")
    return PublicStatistics(low, high, source or f"statistics file {p.name}", str(p),
                            hashlib.sha256(raw).hexdigest())


def builtin_statistics(name: str | None, num_features: int, where: str = "[data]") -> PublicStatistics | None:
    """The published statistics of a shipped dataset (None for ``synthetic``: no scaling needed)."""
    if name == "breast_cancer":
        low, high = zip(*BREAST_CANCER_RANGES)
        stats = PublicStatistics(tuple(low), tuple(high), "breast_cancer: published min/max table of "
                                 "scikit-learn's dataset description (load_breast_cancer().DESCR)")
    elif name == "digits":
        stats = PublicStatistics((0.0,) * num_features, (1.0,) * num_features,
                                 "digits: pixels are 0..16 by definition, [0, 1] after the loader's division by 16")
    elif name == "synthetic":
        return None
    else:
        raise ConfigError(f"{where}.statistics: scaling 'public' needs the consortium's public statistics file "
                          f"for this data (built-in published ranges exist for {', '.join(BUILTIN_STATISTICS)} "
                          f"only); or use scaling = 'dp' or 'none'")
    if len(stats.low) != num_features:
        raise ConfigError(f"{where}.statistics: the published ranges of {name} have {len(stats.low)} features, "
                          f"the data has {num_features}")
    return stats


# ---- the DP estimate ----------------------------------------------------------------------
@dataclass(frozen=True)
class PreprocessingEvent:
    """The DP event of a preprocessing estimate: one Gaussian mechanism, accounted as q = 1, one step.

    ``noise_multiplier`` σ is relative to ``sensitivity`` Δ (noise std σ·Δ), so its privacy
    is dp-accounting's ``GaussianDpEvent(σ)`` — a Poisson-sampled Gaussian with q = 1.
    """

    noise_multiplier: float
    sensitivity: float
    query: str = FEATURE_MOMENTS

    @property
    def sample_rate(self) -> float:
        """Every record takes part: q = 1."""
        return 1.0

    @property
    def steps(self) -> int:
        """One release."""
        return 1

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe description for the ledger (public)."""
        return {"purpose": "preprocessing", "query": self.query, "mechanism": "gaussian",
                "noise_multiplier": float(self.noise_multiplier), "sensitivity": float(self.sensitivity),
                "sample_rate": self.sample_rate, "steps": self.steps,
                "neighboring_relation": "add_or_remove_one"}


def _dp_moments(t: np.ndarray, bound: float, sigma: float, source: RandomSource
                ) -> tuple[np.ndarray, np.ndarray, float, PreprocessingEvent]:
    """DP (mean, std, count) of the columns of ``t`` clipped to [−bound, bound] (one Gaussian query)."""
    n, d = t.shape
    u = np.clip(t, -bound, bound) / bound
    exact = np.concatenate([[float(n)], u.sum(axis=0), (u * u).sum(axis=0)])
    sensitivity = math.sqrt(1.0 + 2.0 * d)  # ‖[1, u, u²]‖₂ with |u| ≤ 1
    noise = source.normal(sigma * sensitivity, (1 + 2 * d,), dtype=torch.float64).cpu().numpy()
    noisy = exact + noise.astype(np.float64)
    # post-processing only: clamp to what the clipped values allow
    count = max(float(noisy[0]), 1.0)
    m1 = np.clip(noisy[1:1 + d] / count, -1.0, 1.0)
    m2 = np.clip(noisy[1 + d:] / count, 0.0, 1.0)
    # a variance below its own noise level (≈ σΔ/count on m2) carries no information: floor it there
    floor = min(1.0, max(sigma * sensitivity / count, 1e-12))
    var = np.clip(m2 - m1 * m1, floor, 1.0)
    return bound * m1, bound * np.sqrt(var), count, PreprocessingEvent(float(sigma), sensitivity)


# ---- the fitted preprocessing ----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Preprocessing:
    """A fitted preprocessing: ``apply`` maps records one by one, ``describe`` says what it is.

    Applied as: clip to the declared raw range (public) → transform → clip to ±bound (dp)
    → subtract ``offset`` → divide by ``scale``. Every piece is public or DP output,
    except for kind ``site`` (research only, never described with its values).
    """

    kind: str
    transform: str
    feature_shape: tuple[int, ...]
    clip_low: np.ndarray | None = None
    clip_high: np.ndarray | None = None
    bound: float | None = None
    offset: np.ndarray | None = None
    scale: np.ndarray | None = None
    statistics: PublicStatistics | None = None
    dp_event: PreprocessingEvent | None = None
    dp_count: float | None = None
    dp_mean: np.ndarray | None = None
    randomness: str | None = None
    spec: PreprocessingSpec | None = None

    @property
    def num_features(self) -> int:
        """Features per record (flattened)."""
        return int(np.prod(self.feature_shape)) if self.feature_shape else 1

    @overload
    def apply(self, x: torch.Tensor) -> torch.Tensor: ...

    @overload
    def apply(self, x: np.ndarray) -> np.ndarray: ...

    def apply(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """The preprocessed records (float32, same shape); each row depends only on itself. A
        torch tensor comes back as a float32 tensor on its device, ready for the model."""
        if isinstance(x, torch.Tensor):
            return torch.from_numpy(self.apply(x.detach().cpu().numpy())).to(x.device)
        a = np.asarray(x, dtype=np.float64)
        if tuple(a.shape[1:]) != self.feature_shape:
            raise DataError(f"preprocessing was fitted on features of shape {self.feature_shape}, "
                            f"got {tuple(a.shape[1:])}")
        flat = a.reshape(len(a), -1)
        if self.clip_low is not None and self.clip_high is not None:
            flat = np.clip(flat, self.clip_low, self.clip_high)
        flat = _transform(flat, self.transform)
        if self.bound is not None:
            flat = np.clip(flat, -self.bound, self.bound)
        if self.offset is not None:
            flat = flat - self.offset
        if self.scale is not None:
            flat = flat / self.scale
        return flat.reshape(a.shape).astype(np.float32)

    def apply_dataset(self, data: Dataset) -> Dataset:
        """``data`` with preprocessed features."""
        return Dataset(self.apply(data.x), data.y, data.num_classes, data.name)

    def describe(self) -> dict[str, Any]:
        """JSON-safe public description (fit for a ledger header): no private value in it."""
        d: dict[str, Any] = {"kind": self.kind, "transform": self.transform, "features": self.num_features,
                             "feature_shape": list(self.feature_shape)}
        if self.spec is not None:
            d["spec"] = spec_description(self.spec)
        if self.kind == "public":
            if self.statistics is None:
                d["statistics"] = {"source": "synthetic: generated on a unit scale; no ranges, features as generated"}
            else:
                d["statistics"] = self.statistics.describe()
                d["low"], d["high"] = list(self.statistics.low), list(self.statistics.high)
        elif self.kind == "dp":
            assert self.dp_event is not None and self.scale is not None and self.dp_mean is not None
            d.update(bound=self.bound, centre=self.offset is not None, randomness=self.randomness,
                     event=self.dp_event.as_dict(),
                     estimate={"count": self.dp_count, "mean": [float(v) for v in self.dp_mean],
                               "scale": [float(v) for v in self.scale]})
        elif self.kind == "site":
            d["warning"] = "per-site z-score from private statistics outside DP (research only)"
        return d


def _transform(flat: np.ndarray, transform: str, where: str = "[data]") -> np.ndarray:
    if transform == "log1p":
        if (flat < 0).any():
            raise DataError(f"{where}.transform: 'log1p' needs non-negative features, and these have negative "
                            "values; use transform = 'none'")
        return np.log1p(flat)
    return flat


def _public_map(low: np.ndarray, high: np.ndarray, transform: str) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) mapping the declared range, after the transform, onto [−1, 1]."""
    tlow, thigh = _transform(low[None], transform)[0], _transform(high[None], transform)[0]
    return (tlow + thigh) / 2, (thigh - tlow) / 2


def fit_preprocessing(spec: PreprocessingSpec, train_x: np.ndarray, *, source: RandomSource | None = None,
                      base_dir: Path | None = None, dataset_name: str | None = None,
                      where: str = "[data]") -> Preprocessing:
    """Fit ``spec`` on one site's training rows (only ``dp`` and ``site`` look at them).

    ``source``: the noise of a ``dp`` estimate (a fresh :class:`SecureRandom` by default;
    a ``SeededRandom`` in simulations and tests). ``base_dir``: the folder a relative
    ``statistics`` path is read from. ``dataset_name``: a shipped dataset whose published
    statistics ``public`` uses when no file is given (never a file's name).
    """
    pre = _fit(spec, train_x, source, base_dir, dataset_name, where)
    return dataclasses.replace(pre, spec=spec)


def _fit(spec: PreprocessingSpec, train_x: np.ndarray, source: RandomSource | None, base_dir: Path | None,
         dataset_name: str | None, where: str) -> Preprocessing:
    spec.validate(where)
    a = np.asarray(train_x, dtype=np.float64)
    if a.ndim < 2:
        raise DataError(f"preprocessing needs records as rows (n × features), got shape {a.shape}")
    shape = tuple(int(s) for s in a.shape[1:])
    d = int(np.prod(shape))
    if spec.scaling == "none":
        return Preprocessing("none", spec.transform, shape)
    if spec.scaling == "public":
        if spec.statistics:
            path = Path(spec.statistics).expanduser()
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            stats: PublicStatistics | None = load_statistics(path, where)
        else:
            stats = builtin_statistics(dataset_name, d, where)
        if stats is None:
            if spec.transform == "log1p":
                raise ConfigError(f"{where}.transform: 'log1p' needs non-negative features; {dataset_name} "
                                  "has negative values (use transform = 'none')")
            return Preprocessing("public", spec.transform, shape)
        if len(stats.low) != d:
            raise ConfigError(f"{where}.statistics: {stats.path or stats.source}: {len(stats.low)} ranges, "
                              f"the data has {d} features")
        low, high = np.asarray(stats.low), np.asarray(stats.high)
        if spec.transform == "log1p" and (low < 0).any():
            j = int(np.flatnonzero(low < 0)[0])
            raise ConfigError(f"{where}.transform: 'log1p' needs non-negative features; the public statistics "
                              f"declare low = {low[j]:g} for feature {j}")
        offset, scale = _public_map(low, high, spec.transform)
        return Preprocessing("public", spec.transform, shape, clip_low=low, clip_high=high,
                             offset=offset, scale=scale, statistics=stats)
    t = _transform(a.reshape(len(a), -1), spec.transform, where)
    if spec.scaling == "dp":
        src = source if source is not None else SecureRandom()
        mean, std, count, event = _dp_moments(t, float(spec.dp_bound), float(spec.dp_noise_multiplier), src)
        log.info("preprocessing dp: feature moments of %d features, sigma=%.4g, sensitivity=%.4g, bound=%g, "
                 "randomness=%s", d, event.noise_multiplier, event.sensitivity, spec.dp_bound, src.kind)
        return Preprocessing("dp", spec.transform, shape, bound=float(spec.dp_bound),
                             offset=mean if spec.dp_centre else None, scale=std, dp_event=event,
                             dp_count=count, dp_mean=mean, randomness=src.kind)
    # "site": research only
    if len(t) == 0:
        raise DataError("scaling 'site' needs at least one training record")
    log.warning("preprocessing site: z-score with this site's own mean and std, private statistics outside DP "
                "(research only: simulate/compare; a node refuses it)")
    mean = t.mean(axis=0)
    std = t.std(axis=0)
    std = np.where(std < 1e-8, 1.0, std)
    return Preprocessing("site", spec.transform, shape, offset=mean, scale=std)


def preprocess_site(spec: PreprocessingSpec, site: SiteData, *, source: RandomSource | None = None,
                    base_dir: Path | None = None, dataset_name: str | None = None,
                    where: str = "[data]") -> tuple[SiteData, Preprocessing]:
    """Fit ``spec`` on ``site``'s training rows and apply it to its train and test splits."""
    pre = fit_preprocessing(spec, site.train.x, source=source, base_dir=base_dir, dataset_name=dataset_name,
                            where=where)
    return SiteData(site.site, pre.apply_dataset(site.train), pre.apply_dataset(site.test)), pre


# ---- saving a fitted preprocessing (a node never pays for a DP estimate twice) ----------
SAVE_FORMAT = 1


def save_preprocessing(pre: Preprocessing, path: str | Path) -> None:
    """Write ``pre``'s public description to ``path`` (JSON, atomically); :func:`load_preprocessing` reads it."""
    if pre.kind == "site":
        raise ConfigError("[data].scaling: a per-site z-score is private and is never saved")
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"format": SAVE_FORMAT, **pre.describe()}, indent=2) + "\n")
    os.replace(tmp, p)


def _floats(d: dict[str, Any], key: str, n: int) -> np.ndarray:
    v = d.get(key)
    if not isinstance(v, list) or len(v) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                           and math.isfinite(x) for x in v):
        raise ValueError(f"{key} must be {n} finite numbers")
    return np.asarray(v, dtype=np.float64)


def load_preprocessing(path: str | Path) -> Preprocessing:
    """The preprocessing saved by :func:`save_preprocessing` (ValueError/ConfigError when malformed)."""
    p = Path(path)
    d = json.loads(p.read_text())
    if not isinstance(d, dict) or d.get("format") != SAVE_FORMAT:
        raise ValueError(f"{p}: not a saved privfl preprocessing (format {SAVE_FORMAT})")
    spec_d = d.get("spec")
    if not isinstance(spec_d, dict):
        raise ValueError(f"{p}: no spec")
    try:
        spec = PreprocessingSpec(**spec_d)
    except TypeError as e:
        raise ValueError(f"{p}: bad spec ({e})") from None
    spec.validate()
    shape = tuple(int(s) for s in d.get("feature_shape", []))
    n = int(np.prod(shape)) if shape else 1
    kind, transform = d.get("kind"), d.get("transform")
    if kind != spec.scaling or transform != spec.transform:
        raise ValueError(f"{p}: kind/transform do not match the saved spec")
    if kind == "none":
        return Preprocessing("none", transform, shape, spec=spec)
    if kind == "public":
        st = d.get("statistics") or {}
        if "low" not in d:
            return Preprocessing("public", transform, shape, spec=spec)
        low, high = _floats(d, "low", n), _floats(d, "high", n)
        if not (low < high).all():
            raise ValueError(f"{p}: low must be < high")
        stats = PublicStatistics(tuple(map(float, low)), tuple(map(float, high)), str(st.get("source", "")),
                                 str(st.get("path", "")), str(st.get("sha256", "")))
        offset, scale = _public_map(low, high, transform)
        return Preprocessing("public", transform, shape, clip_low=low, clip_high=high, offset=offset,
                             scale=scale, statistics=stats, spec=spec)
    if kind == "dp":
        est, ev = d.get("estimate") or {}, d.get("event") or {}
        mean, scale = _floats(est, "mean", n), _floats(est, "scale", n)
        if not (scale > 0).all():
            raise ValueError(f"{p}: estimate.scale must be > 0")
        event = PreprocessingEvent(float(ev["noise_multiplier"]), float(ev["sensitivity"]),
                                   str(ev.get("query", FEATURE_MOMENTS)))
        return Preprocessing("dp", transform, shape, bound=float(d["bound"]),
                             offset=mean if d.get("centre") else None, scale=scale, dp_event=event,
                             dp_count=float(est["count"]), dp_mean=mean, randomness=d.get("randomness"), spec=spec)
    raise ValueError(f"{p}: unknown preprocessing kind {kind!r}")
