"""Attacks by a curious Flower server: it records everything that reaches its FedAvg.

The server is honest-but-curious: it runs Flower's own (Message-API) ``FedAvg``
(subclassed only to keep a copy of every reply that reaches ``aggregate_train`` and
``aggregate_evaluate``) over real ``DPClient``s through :class:`FederatedAveraging`,
on sites that hold *different* numbers of records. The old code gave it each site's
realised record count (the FedAvg weight), its training loss and its un-noised test
loss/accuracy/count; a threshold on the reported loss found one outlier record with
TPR 0.93 at FPR 0.00 (issue 10, finding 4). Now everything but the noised model must be
public (declared weights, ε, δ, step counts, flags) or a DP release over a public
denominator whose cost is in the site's accountant.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from privfl.accounting.releases import PUBLIC_FIT_METRICS
from privfl.clients import DPClient, DPConfig
from privfl.models import build_model
from privfl.strategies.federated import FedAvgConfig, FederatedAveraging

pytestmark = pytest.mark.timeout(120)

D = 6
TRAIN_SIZES = (30, 60, 120)  # realised (private) record counts: all distinct, none equal to a weight
TEST_SIZES = (10, 20, 40)
PRIVATE_KEYS = {"loss", "accuracy", "n_train", "num_examples", "train_loss", "test_loss", "n_test"}
ROUNDS = 3
STEPS = 2


class CuriousFedAvg(FedAvg):
    """Flower's FedAvg that keeps everything its aggregation receives (what a curious server sees).

    Per reply: the sender (its Flower node id; :func:`_serve` names it), its weight
    (``num-examples``), and every other metric it carries (an evaluation's ``loss`` kept apart).
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.fit_seen: list[list[tuple[Any, int, dict[str, Any]]]] = []
        self.eval_seen: list[list[tuple[Any, int, float, dict[str, Any]]]] = []

    @staticmethod
    def _metrics(replies: list[Any]) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for msg in replies:
            if not msg.has_error():
                assert not msg.content.config_records  # nothing but the model and metrics comes back
                for rec in msg.content.metric_records.values():
                    out.append((msg.metadata.src_node_id, dict(rec)))
        return out

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        self.fit_seen.append([(cid, m.pop("num-examples"), m) for cid, m in self._metrics(replies)])
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        self.eval_seen.append([(cid, m.pop("num-examples"), float(m.pop("loss")), m)
                               for cid, m in self._metrics(replies)])
        return super().aggregate_evaluate(server_round, replies)


def _records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    return x, (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)


def _sites(outlier: bool = False) -> list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Three sites of different sizes; ``outlier`` adds one far-off, mislabelled record to site 0."""
    out = []
    for i, (n, m) in enumerate(zip(TRAIN_SIZES, TEST_SIZES)):
        train, test = _records(n, seed=10 + i), _records(m, seed=20 + i)
        if outlier and i == 0:
            x, y = train
            train = (np.vstack([x, np.full((1, D), 8.0, np.float32)]), np.append(y, 0))
        out.append((train, test))
    return out


def _clients(outlier: bool = False, declared: tuple[int | None, ...] = (None, None, None),
             events: dict[str, list[dict[str, Any]]] | None = None, **dp: Any) -> dict[str, DPClient]:
    """Real DPClients (secure noise, public q) on :func:`_sites`; DP events go to ``events[node]``."""
    clients = {}
    for i, ((train, test), size) in enumerate(zip(_sites(outlier), declared)):
        node = f"site{i}"
        hook = None
        if events is not None:
            events[node] = []
            hook = events[node].append
        cfg = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=10, sample_rate=0.2, lr=0.5,
                       target_epsilon=50.0, delta=1e-5, declared_size=size, **dp)
        clients[node] = DPClient(build_model("logreg", (D,), 2, seed=0), train, test, cfg, device="cpu",
                                 on_dp_event=hook)
    return clients


def _serve(clients: dict[str, DPClient], rounds: int = ROUNDS) -> tuple[CuriousFedAvg, FederatedAveraging]:
    """Run the FedAvg baseline for ``rounds`` with the curious server's strategy (evaluation asked for)."""
    curious = CuriousFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=3, min_evaluate_nodes=3,
                            min_available_nodes=3)
    fedavg = FederatedAveraging(FedAvgConfig(local_steps=STEPS, min_fit_clients=3, min_available_clients=3,
                                             evaluate=True), strategy=curious)
    init = next(iter(clients.values())).get_parameters({})
    params = {k: init for k in clients}
    for r in range(1, rounds + 1):
        params = fedavg.run_round(clients, params, r).params
    names = {i: n for n, i in fedavg.node_ids.items()}
    curious.fit_seen = [[(names[c], *rest) for c, *rest in seen] for seen in curious.fit_seen]
    curious.eval_seen = [[(names[c], *rest) for c, *rest in seen] for seen in curious.eval_seen]
    return curious, fedavg


def _realised(clients: dict[str, DPClient]) -> dict[str, int]:
    return {k: c.n_train for k, c in clients.items()}


def test_fit_results_carry_the_public_weight_never_the_record_count() -> None:
    clients = _clients()
    curious, fedavg = _serve(clients)
    realised = _realised(clients)
    assert sorted(realised.values()) == sorted(TRAIN_SIZES)
    assert len(curious.fit_seen) == ROUNDS
    for seen in curious.fit_seen:
        assert sorted(cid for cid, _, _ in seen) == sorted(clients)
        for cid, weight, metrics in seen:
            assert weight == 1  # no declared size: equal weights
            assert weight != realised[cid]
            assert set(metrics) <= set(PUBLIC_FIT_METRICS)
            assert not PRIVATE_KEYS & set(metrics)
            assert realised[cid] not in {v for k, v in metrics.items() if k not in ("steps", "total_steps")}
    # what the baseline hands back to the caller holds no private value either
    for server in fedavg.history:
        assert not PRIVATE_KEYS & set(server["fit"])


def test_declared_sizes_are_the_weights() -> None:
    declared = (50, 50, 100)
    clients = _clients(declared=declared)
    curious, _ = _serve(clients, rounds=2)
    realised = _realised(clients)
    want = dict(zip(sorted(clients), declared))
    for seen in curious.fit_seen:
        for cid, weight, _ in seen:
            assert weight == want[cid] != realised[cid]


def test_no_evaluation_reaches_the_server_by_default() -> None:
    events: dict[str, list[dict[str, Any]]] = {}
    clients = _clients(events=events)
    curious, fedavg = _serve(clients)
    assert curious.eval_seen == [[]] * ROUNDS  # asked every round, nothing released
    assert all(server["loss"] is None for server in fedavg.history)
    assert all(e["purpose"] == "training" for evs in events.values() for e in evs)


def test_a_dp_evaluation_release_is_a_noisy_accuracy_over_the_public_denominator() -> None:
    denominator = 50
    events: dict[str, list[dict[str, Any]]] = {}
    clients = _clients(events=events, eval_noise_multiplier=2.0, eval_denominator=denominator)
    twins = _clients()  # same training, no release: the ε a release must add to
    curious, fedavg = _serve(clients)
    _serve(twins)
    test_sizes = {k: len(c.test[1]) for k, c in clients.items()}  # type: ignore[index]
    assert len(curious.eval_seen) == ROUNDS
    for seen in curious.eval_seen:
        assert sorted(cid for cid, *_ in seen) == sorted(clients)
        for cid, count, loss, metrics in seen:
            assert count == denominator != test_sizes[cid]  # the public denominator, not the test-set size
            assert set(metrics) == {"accuracy", "dp"} and metrics["dp"] == 1
            assert 0.0 <= metrics["accuracy"] <= 1.0
            assert loss == pytest.approx(1.0 - metrics["accuracy"])  # post-processing of the release
    for k, c in clients.items():
        evals = [e for e in events[k] if e["purpose"] == "evaluation"]
        assert len(evals) == ROUNDS and all(e["noise_multiplier"] == 2.0 for e in evals)
        assert c.epsilon > twins[k].epsilon  # the release was paid for
    assert all(server["loss"] is not None for server in fedavg.history)


def test_sites_of_different_sizes_report_identical_public_values() -> None:
    clients = _clients()
    curious, _ = _serve(clients)
    assert len(set(_realised(clients).values())) == 3
    for seen in curious.fit_seen:
        weights = {w for _, w, _ in seen}
        assert weights == {1}
        # q, σ and the steps are public, so ε (and every other reported value) is the same for all sites
        first = seen[0][2]
        assert all(m == first for _, _, m in seen), seen


def test_one_outlier_record_changes_nothing_the_server_sees_but_the_noised_model() -> None:
    # the old attack: threshold the reported loss (or count) with/without one outlier record
    views = []
    for outlier in (False, True):
        clients = _clients(outlier=outlier)
        curious, fedavg = _serve(clients)
        views.append((curious.fit_seen, curious.eval_seen, [s["fit"] for s in fedavg.history]))
    assert views[0] == views[1]  # identical, so any threshold on them has TPR = FPR
