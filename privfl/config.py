"""TOML configuration validated into typed objects; every error names the field.

One schema serves ``privfl node``, ``privfl simulate`` and ``privfl compare``: the
sections ``data``, ``model``, ``dp``, ``topology``, ``strategy`` and ``stop`` mean the
same thing everywhere, so a comparison really changes only what it says it changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import re
import sys
import tomllib
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import torch

from privfl.clients import CLIPPING_RULES, DPConfig
from privfl.clients.losses import LOSSES
from privfl.clients.plugins import is_import_path, resolve_import
from privfl.data import FactorySite, SiteData, load_dataset, load_factory_site, split_sites
from privfl.errors import ConfigError
from privfl.models import MODELS
from privfl.preprocessing import BUILTIN_STATISTICS, PreprocessingSpec
from privfl.strategies.topology import Topology, TopologyError, build_topology, canonical_kind

T = TypeVar("T")

DEVICE_CHOICES = '"auto", "cpu", "cuda" or "cuda:N"'
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(value: str, where: str) -> torch.device:
    """The torch device a ``device`` field asks for: "auto" (CUDA when present, else CPU),
    "cpu", "cuda" or "cuda:N". ConfigError naming ``where`` (e.g. ``node.toml: [node].device``)
    for another value, CUDA asked for on a machine without it, or N out of range, so a run
    never silently trains somewhere else than it said."""
    v = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(v, str) or not _DEVICE_RE.match(v):
        raise ConfigError(f"{where}: must be {DEVICE_CHOICES}, got {value!r}")
    if v == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if v == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}: {value!r} asked for, but CUDA is not available on this machine "
                          f"(torch {torch.__version__}); use \"auto\" or \"cpu\"")
    count = torch.cuda.device_count()
    index = int(v.split(":")[1]) if ":" in v else 0
    if index >= count:
        raise ConfigError(f"{where}: {value!r} asked for, but this machine has {count} CUDA device(s) "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device(v)


@dataclass
class DataSection:
    """Where the records come from, how they are split across sites, and how a site preprocesses them.

    Preprocessing (see :mod:`privfl.preprocessing`) uses public statistics or a DP estimate,
    never the site's raw statistics: ``scaling`` is ``public`` (declared ranges: the
    ``statistics`` file, or a shipped dataset's published ranges), ``dp`` (a Gaussian
    estimate with ``dp_noise_multiplier`` and ``dp_bound``, its cost in the ledger),
    ``none``, or ``site`` (per-site z-scores, simulate/compare only). ``transform`` =
    ``log1p`` is applied to each value first. Unset, scaling is ``public``, or ``none``
    with a ``factory``.

    ``factory = "pkg.module:name"`` brings the hospital's own data: it is called as
    ``factory(site_index=i, num_sites=n, root=<root>, **args)`` (``root`` only when set,
    as an absolute path relative to the file naming it) and returns the site's
    ``(train, test)`` torch Datasets of ``(input, label)``. privfl preprocesses nothing
    then (the Dataset's own transform is the hospital's public code); ``num_classes``
    declares the class count a built-in model needs.
    """

    source: str = "breast_cancer"
    factory: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    root: str = ""
    num_classes: int = 0
    label_column: str = ""
    num_sites: int = 4
    partitioning: str = "iid"
    alpha: float = 0.5
    shards_per_site: int = 2
    test_fraction: float = 0.2
    scaling: str = ""
    transform: str = "none"
    statistics: str = ""
    dp_noise_multiplier: float = 0.0
    dp_bound: float = 0.0
    dp_centre: bool = False
    seed: int = 0

    @property
    def resolved_scaling(self) -> str:
        """The scaling in force: as given, else ``none`` with a data factory, else ``public``."""
        return self.scaling or ("none" if self.factory else "public")

    def validate(self, where: str) -> None:
        if self.factory:
            if not is_import_path(self.factory):
                raise ConfigError(f"{where}.factory: expected 'package.module:name', got {self.factory!r}")
            resolve_import(self.factory, f"{where}.factory")
            if self.resolved_scaling != "none" or self.transform != "none" or self.statistics:
                raise ConfigError(f"{where}.scaling: a data factory's Datasets are used as they are (their own "
                                  "transform is the hospital's public preprocessing); remove scaling, transform "
                                  "and statistics")
        elif self.args:
            raise ConfigError(f"{where}.args: only a [data].factory takes args")
        elif self.root:
            raise ConfigError(f"{where}.root: only a [data].factory takes a root folder")
        if self.num_classes < 0:
            raise ConfigError(f"{where}.num_classes: must be >= 1 (0: unset), got {self.num_classes}")
        self.preprocessing_spec().validate(where)
        if self.factory:
            pass
        elif self.resolved_scaling == "public" and not self.statistics and self.source not in BUILTIN_STATISTICS:
            raise ConfigError(f"{where}.statistics: scaling 'public' needs the consortium's public statistics "
                              f"file for {self.source!r} (built-in ranges exist for "
                              f"{', '.join(BUILTIN_STATISTICS)} only); or use scaling = 'dp' or 'none'")
        if self.num_sites < 1:
            raise ConfigError(f"{where}.num_sites: must be >= 1, got {self.num_sites}")
        if self.partitioning not in ("iid", "dirichlet", "shards", "quantity"):
            raise ConfigError(f"{where}.partitioning: must be iid, dirichlet, shards or quantity, "
                              f"got {self.partitioning!r}")
        if not self.alpha > 0:
            raise ConfigError(f"{where}.alpha: must be > 0, got {self.alpha}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"{where}.test_fraction: must be in (0, 1), got {self.test_fraction}")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be an integer >= 0, got {self.seed}")

    def preprocessing_spec(self, base_dir: Path | None = None) -> PreprocessingSpec:
        """The preprocessing these settings describe; a relative ``statistics`` path is taken
        relative to ``base_dir`` (the config file's folder)."""
        stats = self.statistics
        if stats and base_dir is not None:
            stats = str(resolve_path(base_dir, stats))
        return PreprocessingSpec(scaling=self.resolved_scaling, transform=self.transform, statistics=stats,
                                 dp_noise_multiplier=self.dp_noise_multiplier, dp_bound=self.dp_bound,
                                 dp_centre=self.dp_centre)

    def builtin_name(self) -> str | None:
        """The shipped dataset whose published statistics ``public`` may use (None for a file)."""
        return None if self.factory else (self.source if self.source in BUILTIN_STATISTICS else None)

    def root_path(self, base_dir: Path | None) -> str | None:
        """``root`` as an absolute path (relative to ``base_dir``, the config file's folder); None if unset."""
        if not self.root:
            return None
        return str((resolve_path(base_dir, self.root) if base_dir is not None else Path(self.root)).resolve())

    def factory_site(self, site_index: int, base_dir: Path | None, where: str = "[data]") -> FactorySite:
        """Site ``site_index``'s Datasets from the user's ``factory`` (see :func:`privfl.data.load_factory_site`)."""
        return load_factory_site(self.factory, site_index, self.num_sites, self.root_path(base_dir), self.args,
                                 where)

    def sites(self, base_dir: Path | None = None) -> list[SiteData]:
        """Load the data and split it into ``num_sites`` raw (unscaled) sites (deterministic for ``seed``).

        A relative CSV/NPZ path is taken relative to ``base_dir`` (the config file's folder).
        Preprocess a site with :func:`privfl.preprocessing.preprocess_site` and
        :meth:`preprocessing_spec`.
        """
        source = self.source
        if base_dir is not None and source.endswith((".csv", ".npz")):
            source = str(resolve_path(base_dir, source))
        data = load_dataset(source, label_column=self.label_column or None, seed=self.seed)
        return split_sites(data, self.num_sites, self.partitioning, seed=self.seed,  # type: ignore[arg-type]
                           alpha=self.alpha, test_fraction=self.test_fraction,
                           shards_per_site=self.shards_per_site)


@dataclass
class ModelSection:
    """Which model every site trains: a built-in ``name``, or the hospital's own
    ``factory = "pkg.module:name"`` (a callable returning an ``nn.Module``) called with ``args``."""

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    seed: int = 0
    factory: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    loss: str = "cross_entropy"  # or the user's "pkg.module:name" (a loss with mean reduction)

    def validate(self, where: str) -> None:
        if self.loss not in LOSSES:
            if not is_import_path(self.loss):
                raise ConfigError(f"{where}.loss: unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)} "
                                  "or give 'package.module:name'")
            resolve_import(self.loss, f"{where}.loss")
        if self.factory:
            if not is_import_path(self.factory):
                raise ConfigError(f"{where}.factory: expected 'package.module:name', got {self.factory!r}")
            resolve_import(self.factory, f"{where}.factory")
        elif self.name not in MODELS:
            raise ConfigError(f"{where}.name: unknown model {self.name!r}; choose one of {', '.join(MODELS)} "
                              f"or give {where}.factory = 'package.module:name'")
        elif self.args:
            raise ConfigError(f"{where}.args: only a [model].factory takes args (built-in {self.name!r} "
                              "takes hidden)")

    @property
    def spec(self) -> str:
        """What :func:`privfl.models.build_model` builds: the factory's import path, else the name."""
        return self.factory or self.name


@dataclass
class DPSection:
    """Local DP-SGD settings and the site's privacy budget (all public).

    ``sample_rate`` (q) is declared, or derived from ``batch_size`` and the site's public
    ``declared_size``; 0 means unset. σ is calibrated from (q, planned_steps, ε, δ) alone.
    ``eval_noise_multiplier`` > 0 (with ``eval_denominator``, the public test-set size)
    lets a site release a DP accuracy; 0 keeps evaluation local.
    """

    enabled: bool = True
    mechanism: str = "gaussian"
    clipping: str = "psac"
    max_grad_norm: float = 1.0
    psac_r: float = 0.1
    autos_gamma: float = 0.01
    noise_multiplier: float = 1.0
    target_epsilon: float = 3.0
    delta: float = 1e-5
    planned_steps: int = 0
    batch_size: int = 32
    sample_rate: float = 0.0
    declared_size: int = 0
    lr: float = 0.5
    momentum: float = 0.0
    optimizer: str = "sgd"  # "sgd", "adam", "adamw" or "pkg.module:name"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    accountant: str = "rdp"
    topagg_k: int = 0
    topagg_threshold: float = 0.0
    topagg_bound: float = 0.0
    topagg_scale: float = 1.0
    #: subspace DP-SGD: { fraction = 0.01, seed = <public int>, period = 1 } (empty: off); each step
    #: clips and noises only a public random k-coordinate mask (clients.subspace)
    subspace: dict[str, Any] = field(default_factory=dict)
    engine: str = "auto"  # fast ghost engine where it supports every layer, else Opacus (TopAgg: Opacus)
    eval_noise_multiplier: float = 0.0
    eval_denominator: int = 0

    def validate(self, where: str) -> None:
        if self.clipping not in CLIPPING_RULES:
            raise ConfigError(f"{where}.clipping: must be one of {', '.join(CLIPPING_RULES)}, got {self.clipping!r}")
        if self.mechanism not in ("gaussian", "topagg"):
            raise ConfigError(f"{where}.mechanism: must be gaussian or topagg, got {self.mechanism!r}")
        if self.engine not in ("auto", "opacus", "fast"):
            raise ConfigError(f"{where}.engine: must be auto, opacus or fast, got {self.engine!r}")
        if self.mechanism == "topagg" and self.topagg_k < 1:
            raise ConfigError(f"{where}.topagg_k: mechanism 'topagg' needs topagg_k >= 1")
        if self.mechanism == "topagg" and self.engine == "fast":
            raise ConfigError(f"{where}.engine: the 'fast' engine implements the gaussian mechanism only")
        if self.subspace:
            from privfl.clients.subspace import check_subspace_params

            check_subspace_params(self.subspace, f"{where}.subspace")
            if self.mechanism != "gaussian":
                raise ConfigError(f"{where}.subspace: restricts the gaussian mechanism; not with "
                                  f"mechanism {self.mechanism!r}")
            if self.engine == "fast":
                raise ConfigError(f"{where}.engine: the 'fast' engine does not implement {where}.subspace; "
                                  "use engine = \"opacus\" or \"auto\"")
        if self.accountant not in ("rdp", "pld"):
            raise ConfigError(f"{where}.accountant: must be rdp or pld, got {self.accountant!r}")
        for name in ("noise_multiplier", "sample_rate", "eval_noise_multiplier", "topagg_threshold",
                     "topagg_bound", "topagg_scale"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{where}.{name}: must be a finite number >= 0, got {v}")
        for name in ("declared_size", "eval_denominator", "planned_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.enabled and self.noise_multiplier == 0 and self.planned_steps <= 0:
            raise ConfigError(f"{where}: give noise_multiplier, or planned_steps to calibrate σ from target_epsilon")
        self.to_dp_config().validate(where)

    def to_dp_config(self) -> DPConfig:
        """The client-side DPConfig these settings describe."""
        return DPConfig(
            enabled=self.enabled, clipping=self.clipping, max_grad_norm=self.max_grad_norm,
            psac_r=self.psac_r, autos_gamma=self.autos_gamma,
            noise_multiplier=self.noise_multiplier or None, target_epsilon=self.target_epsilon,
            delta=self.delta, planned_steps=self.planned_steps or None, batch_size=self.batch_size,
            sample_rate=self.sample_rate or None, declared_size=self.declared_size or None,
            lr=self.lr, momentum=self.momentum, optimizer=self.optimizer, optimizer_args=dict(self.optimizer_args),
            accountant=self.accountant, mechanism="subspace" if self.subspace else self.mechanism,
            mechanism_params=({"k": self.topagg_k, "threshold": self.topagg_threshold,
                               "bound": self.topagg_bound or None, "scale": self.topagg_scale}
                              if self.mechanism == "topagg" else dict(self.subspace)),
            engine=self.engine,
            eval_noise_multiplier=self.eval_noise_multiplier or None,
            eval_denominator=self.eval_denominator or None,
        )


@dataclass
class TopologySection:
    """How sites are linked (gossip strategies)."""

    kind: str = "ring"
    degree: int = 3
    rows: int = 0
    edges: list[list[str]] = field(default_factory=list)
    seed: int = 0

    def validate(self, where: str) -> None:
        try:
            canonical_kind(self.kind)
        except TopologyError as exc:
            raise ConfigError(f"{where}.kind: {exc}") from None
        if self.rows < 0:
            raise ConfigError(f"{where}.rows: must be >= 0 (0: the most square torus), got {self.rows}")

    @property
    def canonical_kind(self) -> str:
        """The registered name of :attr:`kind` (aliases such as ``grid`` resolved)."""
        return canonical_kind(self.kind)

    def params(self) -> dict[str, Any]:
        """The keyword arguments ``build_topology`` takes for this kind (and only those); one
        reading for ``privfl node``, ``launch``, ``simulate`` and ``compare``."""
        kind = self.canonical_kind
        if kind == "random_regular":
            return {"degree": self.degree, "seed": self.seed}
        if kind == "torus":
            return {"rows": self.rows} if self.rows > 0 else {}
        if kind == "explicit":
            return {"edges": [tuple(e) for e in self.edges]}
        return {}

    def build(self, node_ids: Sequence[str]) -> Topology:
        """The graph over ``node_ids`` (the same on every node and in the simulator)."""
        try:
            return build_topology(self.canonical_kind, list(node_ids), **self.params())
        except TopologyError as exc:
            raise ConfigError(f"[topology]: {exc}") from None


@dataclass
class StrategySection:
    """How models meet, how much local work between meetings, and strategy-specific ``params``.

    ``params`` is passed to the strategy as keyword arguments (e.g. ``fraction_fit`` for
    fedavg, ``period`` for periodic averaging, ``p_max`` for adaptive_period, a
    ``compressor`` for gossip); each strategy refuses keys it does not take.
    """

    name: str = "async_gossip"
    local_steps: int = 5
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.local_steps < 1:
            raise ConfigError(f"{where}.local_steps: must be >= 1, got {self.local_steps}")


@dataclass
class StopSection:
    """When a run ends (whichever comes first)."""

    max_steps: int = 500
    max_seconds: float = 600.0
    target_accuracy: float = 0.0

    def validate(self, where: str) -> None:
        """Refuse negative limits and a target accuracy outside [0, 1] (0: no target)."""
        if self.max_steps < 0:
            raise ConfigError(f"{where}.max_steps: must be >= 0, got {self.max_steps}")
        if not self.max_seconds >= 0:
            raise ConfigError(f"{where}.max_seconds: must be >= 0 seconds, got {self.max_seconds}")
        if not 0 <= self.target_accuracy <= 1:
            raise ConfigError(f"{where}.target_accuracy: must be in [0, 1] (0: no target), got {self.target_accuracy}")


@dataclass
class ClientSection:
    """Who trains at each site: privfl's own DPClient (no ``app``), or the hospital's own Flower
    client ``app = "pkg.module:client_fn"`` (a ``client_fn(context)`` or a ``ClientApp``),
    given ``run_config`` as ``context.run_config``. Its contract is in :mod:`privfl.clients.app_client`."""

    app: str = ""
    run_config: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.app:
            if not is_import_path(self.app):
                raise ConfigError(f"{where}.app: expected 'package.module:client_fn', got {self.app!r}")
            resolve_import(self.app, f"{where}.app")
        elif self.run_config:
            raise ConfigError(f"{where}.run_config: only read by a [client].app")
        for k, v in self.run_config.items():
            if isinstance(v, (dict, list)):
                raise ConfigError(f"{where}.run_config.{k}: Flower run config values are numbers, strings or "
                                  "booleans")


_SECTIONS: dict[str, type] = {
    "data": DataSection, "model": ModelSection, "dp": DPSection, "topology": TopologySection,
    "strategy": StrategySection, "stop": StopSection, "client": ClientSection,
}
#: the sections every config file (node, launch, simulate, compare) shares, in order
SHARED_SECTIONS: tuple[str, ...] = tuple(_SECTIONS)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg,) = get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_table(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def from_table(cls: type[T], table: Any, where: str) -> T:
    """Build dataclass ``cls`` from a TOML table, refusing unknown keys and bad types."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - names)
    if unknown:
        close = [difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.7) for k in unknown]
        said = ", ".join(f"{k} (did you mean {c[0]}?)" if c else k for k, c in zip(unknown, close))
        raise ConfigError(f"{where}: unknown key(s) {said}; allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in table.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; one-line ConfigError naming the file for a missing file, a folder,
    an unreadable file, bytes that are not UTF-8 (TOML is UTF-8; with the byte offset) or a
    syntax error."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory, not a TOML file")
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"config file {p} is not a regular file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{p}: not UTF-8 text (TOML must be UTF-8): byte 0x{data[e.start]:02x} at offset "
                          f"{e.start} (line {line}, column {col}: {e.reason})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e})") from None


PYTHON_PATH_KEY = "python_path"


def check_sections(table: dict[str, Any], allowed: Iterable[str], src: str) -> None:
    """Refuse top-level sections and keys a config file does not have (a typo must not pass
    silently); the closest allowed name is suggested. ``python_path`` (popped by
    :func:`apply_python_path` before this check) is always allowed."""
    names = sorted({*allowed, PYTHON_PATH_KEY})
    unknown = sorted(set(table) - set(names))
    if unknown:
        parts = []
        for name in unknown:
            what = "section" if isinstance(table[name], dict) else "key"
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            parts.append(f"unknown {what} {name}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(f"{src}: {'; '.join(parts)}; allowed at the top level: {', '.join(names)}")


def apply_python_path(table: dict[str, Any], base: Path, src: str) -> list[str]:
    """Pop the top-level ``python_path = [...]`` of a config file and put its folders (relative
    to the file) at the front of ``sys.path``, so ``[model].factory`` and the like can import a
    hospital's own package; returns them as absolute paths."""
    raw = table.pop(PYTHON_PATH_KEY, [])
    if isinstance(raw, str) or not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise ConfigError(f"{src}: python_path: expected a list of folder paths, got {raw!r}")
    out = []
    for value in raw:
        p = resolve_path(base, value).resolve()
        if not p.is_dir():
            raise ConfigError(f"{src}: python_path: folder not found: {p}")
        out.append(str(p))
    for folder in reversed(out):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    importlib.invalidate_caches()
    return out


def resolve_path(base: Path, value: str) -> Path:
    """A path from a config file, relative to that file's folder unless absolute."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


@dataclass
class CommonConfig:
    """The sections every run shares."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    dp: DPSection = field(default_factory=DPSection)
    topology: TopologySection = field(default_factory=TopologySection)
    strategy: StrategySection = field(default_factory=StrategySection)
    stop: StopSection = field(default_factory=StopSection)
    client: ClientSection = field(default_factory=ClientSection)


def common_from(table: dict[str, Any], source: str) -> CommonConfig:
    """The shared sections of a parsed config (missing sections take their defaults; a missing
    ``[dp]`` is checked as written empty, so a DP run without its public sampling rate is refused
    here, naming ``[dp].sample_rate``, not when a node or a run starts)."""
    kw: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in table or name == "dp":
            kw[name] = from_table(cls, table.get(name, {}), f"{source}: [{name}]")
    return CommonConfig(**kw)
