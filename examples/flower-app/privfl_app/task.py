"""What the ClientApp and ServerApp share: run settings, site data, model, DP settings, node state.

Flower calls the ClientApp's ``train`` / ``evaluate`` once per message (and the Deployment
Engine starts a fresh process for each), so a ``DPClient`` object never lives from one
round to the next. Its
accountant and optimizer state are therefore kept in the node's ``context.state`` (a
``RecordDict`` that Flower keeps per node for the whole run) and restored on every
message: ε keeps accumulating across rounds instead of restarting at zero. Noise and
Poisson batches come from a fresh secure source in every rebuilt client (no seed: the
deployed path), so nothing in the run config or the state predicts them.

What a node releases (see the README): its noised model, a public FedAvg weight
(``num-examples`` = 1) and public fit metrics (ε, δ, steps, flags); an evaluation only as
a DP accuracy when the run config sets ``eval-noise-multiplier`` and ``eval-denominator``.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from flwr.app import ConfigRecord, Context
from torch import nn

from privfl.accounting.subspace import check_subspace_params
from privfl.clients import DPClient, DPConfig
from privfl.clients.plugins import is_import_path
from privfl.data import SiteInputs, load_dataset, load_factory_site, split_sites
from privfl.errors import ConfigError
from privfl.logs import drop_opacus_root_handler
from privfl.models import build_model
from privfl.preprocessing import PreprocessingSpec, preprocess_site
from privfl.strategies.compression.subspace import SubspaceK

# Opacus (imported with privfl.clients) adds a root log handler at import, and Flower's own logger also
# propagates to the root: without this every Flower line of the app's processes would print twice
drop_opacus_root_handler()

STATE_KEY = "privfl.dpclient"

#: preprocessing the app runs: public by declaration, so it costs no budget and needs no ledger
APP_SCALINGS = ("public", "none")

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "local-steps": 10,
    "fraction-fit": 1.0,
    "min-fit-clients": 2,
    "min-available-clients": 2,
    "dataset": "breast_cancer",
    "partitioning": "iid",
    # feature scaling from public statistics only: "public" (declared ranges: the published
    # ones of a shipped dataset, or the `statistics` file) or "none"
    "scaling": "public",
    "statistics": "",
    # a built-in model name, or the hospital's own factory "pkg.module:name" (no arguments)
    "model": "logreg",
    # the hospital's own data: "pkg.module:name" called as factory(site_index=, num_sites=, root=)
    # returning (train, test) torch Datasets; "" = the shipped `dataset` above
    "data-factory": "",
    "data-root": "",
    # the class count a built-in model needs with a data factory (0: unset)
    "num-classes": 0,
    # "cross_entropy" or "pkg.module:name"; "sgd", "adam", "adamw" or "pkg.module:name"
    "loss": "cross_entropy",
    "optimizer": "sgd",
    "seed": 0,
    "clipping": "psac",
    "max-grad-norm": 1.0,
    "noise-multiplier": 1.2,
    "target-epsilon": 8.0,
    "delta": 1e-5,
    "batch-size": 32,
    "lr": 2.0,
    # the public Poisson sampling rate q (declared, never derived from a site's record count)
    "sample-rate": 0.2,
    # a DP evaluation release: σ of the noisy correct count (0 = evaluation stays on the site)
    "eval-noise-multiplier": 0.0,
    # … and the public denominator of the released accuracy (a declared test-set size; 0 = off)
    "eval-denominator": 0,
    # subspace DP-SGD with subspace transfer both ways: the share of coordinates each DP step clips and
    # noises (a public random mask; 0.0 = off: dense DP-SGD and whole models on the wire) …
    "subspace-fraction": 0.0,
    # … the public seed every node and the server derive the masks from …
    "subspace-seed": 0,
    # … and DP steps per mask (0 = local-steps: one mask per round, so a round moves k coordinates)
    "subspace-period": 0,
}

#: the run-config keys of the subspace (read only with subspace-fraction > 0)
SUBSPACE_KEYS = ("subspace-fraction", "subspace-seed", "subspace-period")


def settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config over :data:`DEFAULTS`, each value checked against its default's type."""
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    out = dict(DEFAULTS)
    for key, value in run_config.items():
        want = type(DEFAULTS[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or isinstance(value, bool):
            raise ConfigError(f"run config: {key} must be {want.__name__}, got {value!r}")
        out[key] = value
    for key in ("num-server-rounds", "local-steps", "min-fit-clients", "min-available-clients", "batch-size"):
        if out[key] < 1:
            raise ConfigError(f"run config: {key} must be >= 1, got {out[key]}")
    if out["scaling"] not in APP_SCALINGS:
        raise ConfigError(f"run config: scaling must be one of {', '.join(APP_SCALINGS)}, got {out['scaling']!r} "
                          "(a DP estimate of the scale needs a node's ledger: use privfl's own node runtime)")
    if out["statistics"] and out["scaling"] != "public":
        raise ConfigError("run config: statistics is only read with scaling = 'public'")
    if not 0 < out["sample-rate"] <= 1:
        raise ConfigError(f"run config: sample-rate must be in (0, 1], got {out['sample-rate']}")
    for key in ("eval-noise-multiplier", "eval-denominator"):
        if out[key] < 0:
            raise ConfigError(f"run config: {key} must be >= 0 (0 = no evaluation release), got {out[key]}")
    if (out["eval-noise-multiplier"] > 0) != (out["eval-denominator"] > 0):
        missing = "eval-denominator" if out["eval-noise-multiplier"] > 0 else "eval-noise-multiplier"
        raise ConfigError(f"run config: {missing} must be set (> 0) too: a DP evaluation release needs both "
                          "eval-noise-multiplier and eval-denominator")
    _check_subspace(out)
    return out


def _check_subspace(out: Mapping[str, Any]) -> None:
    """Refuse bad subspace keys with one line naming the key (the checks of privfl's FedAvgConfig)."""
    if not 0 <= out["subspace-fraction"] <= 1:
        raise ConfigError(f"run config: subspace-fraction must be in [0, 1] (0 = off), got {out['subspace-fraction']}")
    if out["subspace-seed"] < 0:
        raise ConfigError(f"run config: subspace-seed must be >= 0 (a public integer every node shares), "
                          f"got {out['subspace-seed']}")
    if out["subspace-period"] < 0:
        raise ConfigError(f"run config: subspace-period must be >= 0 (DP steps per mask; 0 = local-steps), "
                          f"got {out['subspace-period']}")
    if not subspace_on(out):
        for key in SUBSPACE_KEYS[1:]:
            if out[key] != DEFAULTS[key]:
                raise ConfigError(f"run config: {key} is only read with subspace-fraction > 0")
        return
    if out["fraction-fit"] != 1:
        raise ConfigError(f"run config: fraction-fit must be 1.0 with subspace-fraction > 0 (every node trains "
                          f"every round, so all hold the same round's mask), got {out['fraction-fit']}")


def subspace_on(cfg: Mapping[str, Any]) -> bool:
    """Whether the run uses subspace DP-SGD with subspace transfer (``subspace-fraction`` > 0)."""
    return float(cfg["subspace-fraction"]) > 0


def subspace_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``DPConfig.mechanism_params`` of the subspace: {fraction, seed, period} (public), period resolved."""
    period = int(cfg["subspace-period"]) or int(cfg["local-steps"])
    try:
        return check_subspace_params({"fraction": float(cfg["subspace-fraction"]), "seed": int(cfg["subspace-seed"]),
                                      "period": period}, "run config: subspace")
    except ConfigError as exc:  # name the run-config key, not privfl's table
        raise ConfigError(re.sub(r"subspace\.(\w+)", r"subspace-\1", str(exc))) from None


def subspace_compressor(cfg: Mapping[str, Any]) -> SubspaceK:
    """The wire side of the subspace (one per end: it counts the rounds it framed): the round's k values.

    Its mask for round v is the union of the masks of that round's ``local-steps`` DP steps,
    which is what the node's subspace DP optimizer moved (``clients.subspace``).
    """
    p = subspace_params(cfg)
    return SubspaceK(fraction=p["fraction"], public_seed=p["seed"], period=p["period"],
                     local_steps=int(cfg["local-steps"]), whole=p["whole"])


def dp_evaluation(cfg: Mapping[str, Any]) -> bool:
    """Whether the sites release a DP accuracy (else evaluation stays on each site)."""
    return float(cfg["eval-noise-multiplier"]) > 0 and int(cfg["eval-denominator"]) > 0


@lru_cache(maxsize=8)
def load_site(dataset: str, partitioning: str, seed: int, partition_id: int, num_partitions: int,
              scaling: str = "public", statistics: str = "", data_factory: str = "", data_root: str = "",
              num_classes: int = 0) -> SiteInputs:
    """This node's train/test split, scaled from public statistics (cached: every message reuses it).

    ``scaling = "public"`` maps each feature by declared ranges (a shipped dataset's
    published ones, or the ``statistics`` file), never by the site's own mean or std.
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"node config: partition-id={partition_id} not in [0, num-partitions={num_partitions})")
    if data_factory:  # the hospital's own Datasets, used as they are (their transform is public code)
        fs = load_factory_site(data_factory, partition_id, num_partitions, data_root or None, {},
                               where="run config: data-factory")
        return SiteInputs.of_factory(fs, num_classes)
    raw = split_sites(load_dataset(dataset, seed=seed), num_partitions, partitioning, seed=seed)[partition_id]  # type: ignore[arg-type]
    spec = PreprocessingSpec(scaling=scaling, statistics=statistics)
    site, _ = preprocess_site(spec, raw, dataset_name=dataset if not statistics else None, where="run config")
    return SiteInputs.of_arrays(site)


def site_of(cfg: Mapping[str, Any], partition_id: int, num_partitions: int) -> SiteInputs:
    """:func:`load_site` with the run config's data keys."""
    return load_site(str(cfg["dataset"]), str(cfg["partitioning"]), int(cfg["seed"]), partition_id, num_partitions,
                     str(cfg["scaling"]), str(cfg["statistics"]), str(cfg["data-factory"]), str(cfg["data-root"]),
                     int(cfg["num-classes"]))


def make_model(cfg: Mapping[str, Any], site: SiteInputs | None = None) -> nn.Module:
    """The model every node and the server start from (same seed, so the same initial weights).

    A user factory (``model = "pkg.module:name"``) knows its own shape: no site data is read."""
    if is_import_path(str(cfg["model"])):
        return build_model(str(cfg["model"]), (), 0, seed=int(cfg["seed"]))
    if site is None:
        raise ConfigError("run config: model: a built-in model needs a site's input shape")
    return build_model(str(cfg["model"]), site.in_shape, site.num_classes, seed=int(cfg["seed"]))


def needs_site_for_model(cfg: Mapping[str, Any]) -> bool:
    """Whether building the model needs a site's data layout (built-in models only)."""
    return not is_import_path(str(cfg["model"]))


def dp_config(cfg: Mapping[str, Any]) -> DPConfig:
    """DP-SGD (and DP evaluation release) settings of every site, from the run config (all public)."""
    return DPConfig(
        clipping=str(cfg["clipping"]),
        max_grad_norm=float(cfg["max-grad-norm"]),
        noise_multiplier=float(cfg["noise-multiplier"]),
        target_epsilon=float(cfg["target-epsilon"]),
        delta=float(cfg["delta"]),
        batch_size=int(cfg["batch-size"]),
        sample_rate=float(cfg["sample-rate"]),
        lr=float(cfg["lr"]),
        optimizer=str(cfg["optimizer"]),
        eval_noise_multiplier=float(cfg["eval-noise-multiplier"]) if dp_evaluation(cfg) else None,
        eval_denominator=int(cfg["eval-denominator"]) if dp_evaluation(cfg) else None,
        # subspace DP-SGD: each step clips and noises the public mask's k coordinates only; the
        # accountant's event is the dense one (same σ, q, sensitivity C inside the mask)
        **({"mechanism": "subspace", "mechanism_params": subspace_params(cfg)} if subspace_on(cfg) else {}),
    )


def partition_of(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config Flower sets on each SuperNode."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ConfigError(
            f"node config: missing {exc.args[0]!r}; start each SuperNode with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        ) from None


def load_state(context: Context) -> tuple[dict[str, Any] | None, int]:
    """The DPClient state saved in ``context.state`` and the number of fits so far."""
    rec = context.state.config_records.get(STATE_KEY)
    if rec is None:
        return None, 0
    state: dict[str, Any] = {"accountant": json.loads(str(rec["accountant"])),
                             "training_steps": int(rec.get("training_steps", 0))}
    blob = rec.get("optimizer")
    if isinstance(blob, bytes) and blob:
        state["optimizer"] = torch.load(io.BytesIO(blob), weights_only=True)
    return state, int(rec["fits"])


def save_state(context: Context, client: DPClient, fits: int) -> None:
    """Write the client's accountant (JSON) and optimizer state (tensor bytes) into ``context.state``.

    Nothing of the secure noise stream is saved (there is nothing to save): a rebuilt
    client draws a fresh key.
    """
    state = client.state_dict()
    buf = io.BytesIO()
    torch.save(state["optimizer"], buf)
    context.state.config_records[STATE_KEY] = ConfigRecord({
        "accountant": json.dumps(state["accountant"]),
        "optimizer": buf.getvalue(),
        "fits": int(fits),
        "training_steps": int(state["training_steps"]),
        "epsilon": float(client.epsilon),
        "steps": int(client.accountant.steps),
    })


def epsilon_of(context: Context) -> float:
    """ε this node has spent so far, as recorded in its context (0 before its first fit)."""
    rec = context.state.config_records.get(STATE_KEY)
    return 0.0 if rec is None else float(rec["epsilon"])
