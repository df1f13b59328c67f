"""Flower ServerApp (Message API): Flower's own FedAvg over privfl DPClients.

Each site does record-level DP-SGD inside its ClientApp and accounts for it there. What
reaches this server is public or DP: noised models, a public FedAvg weight
(``num-examples`` = 1 per site: equal weights, never a site's record count) and public fit
metrics (ε, δ, steps, flags). The server asks for no evaluation (``fraction_evaluate =
0``) unless the run config sets a DP evaluation release (``eval-noise-multiplier``,
``eval-denominator``); then each site releases a noisy accuracy over the public
denominator, its cost in its own accountant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from privfl.errors import ConfigError
from privfl.strategies.compression import MalformedMessage
from privfl.strategies.compression.subspace import SubspaceK
from privfl.strategies.federated import WEIGHT_KEY, arrays_nbytes
from privfl.strategies.subspace_transfer import SubspaceModelTracker
from privfl_app.subspace import VERSION_KEY, from_wire, is_frame, to_wire
from privfl_app.task import (
    dp_evaluation,
    make_model,
    needs_site_for_model,
    settings,
    site_of,
    subspace_compressor,
    subspace_on,
)

log = logging.getLogger("privfl.flower_app")

app = ServerApp()


def _is_release(msg: Message) -> bool:
    """Whether an evaluation reply carries a DP release (``dp`` = 1 over a public denominator > 0)."""
    return any(int(rec.get("dp", 0)) == 1 and int(rec.get(WEIGHT_KEY, 0)) > 0  # type: ignore[call-overload]
               for rec in msg.content.metric_records.values())


class DPReleaseFedAvg(FedAvg):
    """Flower's FedAvg that aggregates DP evaluation releases only, and reports the largest ε.

    A site that releases nothing (an empty reply: no release configured, or its budget
    could not pay for one) is left out, so Flower's weighted mean never divides by zero;
    a round with no release gives no evaluation result. ``epsilon_max`` (the largest ε a
    site reports: public) is added to each round's training metrics. Aggregation itself
    is Flower's.
    """

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        eps = [float(rec["epsilon"]) for msg in replies if not msg.has_error()  # type: ignore[arg-type]
               for rec in msg.content.metric_records.values() if "epsilon" in rec]
        if metrics is not None and eps:
            metrics["epsilon_max"] = max(eps)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        released = [msg for msg in replies if msg.has_error() or _is_release(msg)]
        return super().aggregate_evaluate(server_round, released)


class SubspaceFedAvg(DPReleaseFedAvg):
    """:class:`DPReleaseFedAvg` with subspace transfer both ways: only the round's k values travel.

    The server's end of privfl's subspace FedAvg (``strategies.subspace_transfer``), kept
    in the ServerApp process for the whole run: its :class:`SubspaceModelTracker` holds
    the global model and its version (the round whose public mask the next frames use).
    ``configure_train`` / ``configure_evaluate`` replace the whole model in each
    instruction by what the tracker sends that node (the whole model the first time, then
    the k values of the aggregate's last change) and declare the version
    (``subspace-version``, public); ``aggregate_train`` rebuilds each node's model from
    its k values, lets Flower's FedAvg average the rebuilt models, and makes the average
    the next version (the k values of its change on the round's mask: what the nodes will
    rebuild). A node whose reply failed, or whose frame is not on the round's mask, is
    left out and gets the whole model next time, as does one that did not reply. Every
    node must train every round (``fraction_train`` = 1), as privfl's ``FedAvgConfig``
    requires with a subspace.

    ``bytes_up[round][node]`` / ``bytes_down[round][node]``: the lengths of the train
    frames (and of any whole model sent); ``eval_bytes_down`` those of evaluation
    instructions.
    """

    def __init__(self, upload: SubspaceK, downlink: SubspaceK, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.fraction_train != 1:
            raise ConfigError(f"run config: fraction-fit must be 1.0 with subspace-fraction > 0, "
                              f"got {self.fraction_train}")
        self._upload, self._downlink = upload, downlink
        self.tracker: SubspaceModelTracker | None = None
        self.keys: list[str] = []
        self.bytes_up: dict[int, dict[int, int]] = {}
        self.bytes_down: dict[int, dict[int, int]] = {}
        self.eval_bytes_down: dict[int, dict[int, int]] = {}
        self._awaiting: set[int] = set()  # nodes sent an instruction whose reply has not come yet

    def _start(self, arrays: ArrayRecord) -> SubspaceModelTracker:
        if self.tracker is None:
            self.keys = list(arrays.keys())
            self.tracker = SubspaceModelTracker(arrays.to_numpy_ndarrays(), self._upload, self._downlink)
        return self.tracker

    def _framed(self, messages: Iterable[Message], counts: dict[int, int]) -> list[Message]:
        """Each instruction with the tracker's downlink for its node instead of the whole model."""
        assert self.tracker is not None
        out = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            wire = to_wire(self.tracker.downlink(str(nid)))
            config = ConfigRecord({**dict(msg.content.config_records[self.configrecord_key]),
                                   VERSION_KEY: int(self.tracker.version)})
            counts[nid] = arrays_nbytes(wire)
            self._awaiting.add(nid)
            out.append(Message(RecordDict({self.arrayrecord_key: wire, self.configrecord_key: config}),
                               dst_node_id=nid, message_type=msg.metadata.message_type))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._start(arrays)
        return self._framed(super().configure_train(server_round, arrays, config, grid),
                            self.bytes_down.setdefault(server_round, {}))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._start(arrays)
        return self._framed(super().configure_evaluate(server_round, arrays, config, grid),
                            self.eval_bytes_down.setdefault(server_round, {}))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        tracker = self.tracker
        assert tracker is not None, "aggregate_train before configure_train"
        counts = self.bytes_up.setdefault(server_round, {})
        rebuilt: list[Message] = []
        replies = list(replies)
        self._forget_silent(replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                tracker.forget(str(node))  # it may not hold this version: the whole model next time
                rebuilt.append(msg)
                continue
            record = msg.content.array_records.get(self.arrayrecord_key)
            try:
                if record is None or not is_frame(record):
                    raise MalformedMessage("expected one framed tensor of the round's k values")
                counts[node] = arrays_nbytes(record)
                model = tracker.rebuild_upload(from_wire(record))
            except MalformedMessage as exc:
                log.warning("node %s: train reply left out: %s", node, exc)
                tracker.forget(str(node))
                continue
            msg.content[self.arrayrecord_key] = ArrayRecord({k: Array(a) for k, a in zip(self.keys, model)})
            rebuilt.append(msg)
        arrays, metrics = super().aggregate_train(server_round, rebuilt)
        if arrays is None:
            return None, metrics
        model = tracker.advance(arrays.to_numpy_ndarrays())
        return ArrayRecord({k: Array(a) for k, a in zip(self.keys, model)}), metrics

    def _forget_silent(self, replies: list[Message]) -> None:
        """Nodes that were sent a version but did not reply (timed out) get the whole model next time."""
        assert self.tracker is not None
        for nid in self._awaiting - {msg.metadata.src_node_id for msg in replies}:
            log.warning("node %s: no reply; it gets the whole model next time", nid)
            self.tracker.forget(str(nid))
        self._awaiting.clear()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if self.tracker is not None:
            self._forget_silent(replies)
            for msg in replies:
                if msg.has_error():
                    self.tracker.forget(str(msg.metadata.src_node_id))
        return super().aggregate_evaluate(server_round, replies)


def build_strategy(cfg: dict[str, Any]) -> FedAvg:
    """Flower's FedAvg configured from the run config (subspace transfer with ``subspace-fraction`` > 0)."""
    evaluate = dp_evaluation(cfg)
    kwargs: dict[str, Any] = dict(
        fraction_train=float(cfg["fraction-fit"]),
        fraction_evaluate=1.0 if evaluate else 0.0,  # evaluation stays on the sites unless released with DP
        min_train_nodes=int(cfg["min-fit-clients"]),
        min_evaluate_nodes=int(cfg["min-fit-clients"]),
        min_available_nodes=int(cfg["min-available-clients"]),
    )
    if subspace_on(cfg):
        return SubspaceFedAvg(subspace_compressor(cfg), subspace_compressor(cfg), **kwargs)
    return DPReleaseFedAvg(**kwargs)


def initial_arrays(cfg: dict[str, Any]) -> ArrayRecord:
    """The shared initial model (every node builds the same one from the same seed)."""
    # a built-in model's shape comes from the shipped dataset's layout; a user factory knows its own
    model = make_model(cfg, site_of(cfg, 0, 1) if needs_site_for_model(cfg) else None)
    return ArrayRecord(model.state_dict())


def run(grid: Grid, context: Context,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
    """FedAvg for ``num-server-rounds`` rounds of ``local-steps`` DP-SGD steps per site."""
    cfg = settings(context.run_config)
    strategy = build_strategy(cfg)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays(cfg),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"local_steps": int(cfg["local-steps"])}),
        evaluate_fn=evaluate_fn,
    )
    if isinstance(strategy, SubspaceFedAvg):
        for rnd in sorted(strategy.bytes_up):
            up, down = strategy.bytes_up[rnd], strategy.bytes_down.get(rnd, {})
            print(f"[privfl] round {rnd}: subspace bytes up {sum(up.values())} ({len(up)} nodes), "
                  f"down {sum(down.values())} ({len(down)} nodes)")
    for rnd, metrics in sorted(result.train_metrics_clientapp.items()):
        if "epsilon_max" in metrics:
            print(f"[privfl] round {rnd}: epsilon_max={float(metrics['epsilon_max']):.4f} "  # type: ignore[arg-type]
                  f"(delta={cfg['delta']})")
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point (``flwr run``)."""
    run(grid, context)
