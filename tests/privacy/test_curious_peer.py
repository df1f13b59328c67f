"""Attacks by a curious peer who knows the whole consortium config, σ and every message.

Each test plays the attacker with what the old code gave away (a torch generator seeded
from ``data.seed * 1000 + site_index + 7919``) and checks that the attack now fails on the
node's default path, and — as a control that the test can fail — still succeeds when a
seed is asked for explicitly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privfl.clients import DPClient, DPConfig
from privfl.clients.randomness import SeededRandom
from privfl.models import build_model

D_FEATURES = 6
C = 1.0
SIGMA = 2.0
LR = 0.5
BATCH = 10.0  # the public divisor (batch_size)
Q = 0.2


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return x, y


def _config() -> DPConfig:
    return DPConfig(noise_multiplier=SIGMA, max_grad_norm=C, clipping="psac", batch_size=int(BATCH),
                    sample_rate=Q, lr=LR, target_epsilon=1e6, engine="opacus")


def _one_step(seed: int | None) -> tuple[DPClient, list[np.ndarray], list[np.ndarray], list[np.ndarray], list[int]]:
    """One DP step from a public start: (client, start, released, true clipped sum, sampled batch)."""
    x, y = _data(50)
    client = DPClient(build_model("logreg", (D_FEATURES,), 2, seed=0), (x, y), None, _config(), seed=seed,
                      device="cpu")
    start = client.get_parameters({})
    batches: list[list[int]] = []
    source = client.loader.batch_sampler.source  # type: ignore[union-attr]
    draw = source.bernoulli_mask

    def recording(n: int, p: float) -> torch.Tensor:
        mask = draw(n, p)
        batches.append(mask.nonzero().reshape(-1).tolist())
        return mask

    source.bernoulli_mask = recording  # type: ignore[method-assign]
    released, _, _ = client.fit(start, {"local_steps": 1})
    true_sum = [p.summed_grad.detach().numpy().copy() for p in client.optimizer.params]  # type: ignore[attr-defined]
    return client, start, released, true_sum, batches[0]


def _attacker_noise(seed: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The attacker regenerates the noise from a seed it can compute from the public config."""
    src = SeededRandom(seed)
    return [src.normal(SIGMA * C, s).numpy() for s in shapes]


def _recovered_error(start: list[np.ndarray], released: list[np.ndarray], true_sum: list[np.ndarray],
                     guess: list[np.ndarray]) -> float:
    # released = start − lr·(S + Z)/B  ⇒  S ≈ −(released − start)·B/lr − Ẑ
    err = [(-(r - s) * BATCH / LR - z) - t for s, r, t, z in zip(start, released, true_sum, guess)]
    return float(np.sqrt(sum(float((e ** 2).sum()) for e in err)))


def test_peer_cannot_recompute_noise_of_a_default_client() -> None:
    client, start, released, true_sum, _ = _one_step(seed=None)
    assert client.random_kind == "secure"
    d = sum(a.size for a in start)
    noise_norm = SIGMA * C * np.sqrt(d)
    # the attacker tries every seed the old code could have used for a small consortium
    shapes = [a.shape for a in start]
    errors = [_recovered_error(start, released, true_sum, _attacker_noise(s * 1000 + i + 7919, shapes))
              for s in range(3) for i in range(4)]
    # off by about the noise norm (√2 × it: the attacker's guess adds noise of its own), not by rounding
    assert min(errors) > 0.5 * noise_norm, (errors, noise_norm)


def test_control_seeded_client_noise_is_recomputable() -> None:
    """The same attack succeeds against a seeded client: the test above could fail."""
    seed = 7
    client, start, released, true_sum, _ = _one_step(seed=seed)
    assert client.random_kind == "seeded"
    err = _recovered_error(start, released, true_sum, _attacker_noise(seed + 7919, [a.shape for a in start]))
    assert err < 1e-3, err


def test_peer_cannot_predict_poisson_batches() -> None:
    """The old seed's batch guesses agree with a default client's batches only by chance.

    Chance is taken given the guess: a record the guess puts in the batch is in it with
    probability q, one it leaves out is out with probability 1 − q. Over independent
    steps the agreement rate is within 5 standard deviations of that (a fair client fails
    about once in 10⁶ runs); a predictable one agrees on every record.
    """
    trials = 16
    hits = 0
    guess = np.zeros(0, dtype=bool)
    for _ in range(trials):
        client, _, _, _, batch = _one_step(seed=None)
        actual = np.zeros(client.n_train, dtype=bool)
        actual[batch] = True
        guess = (torch.rand(client.n_train, generator=torch.Generator().manual_seed(0)) < Q).numpy()
        hits += int((actual == guess).sum())
    p_agree = np.where(guess, Q, 1 - Q)  # per record, given the guess
    n = trials * guess.size
    expected = float(p_agree.mean())
    sd = float(np.sqrt(trials * (p_agree * (1 - p_agree)).sum()) / n)
    rate = hits / n
    assert abs(rate - expected) < 5 * sd, (rate, expected, sd)
    # control: a seeded client's batches are predicted exactly
    client, _, _, _, batch = _one_step(seed=0)
    guess = (torch.rand(client.n_train, generator=torch.Generator().manual_seed(0)) < Q).nonzero().reshape(-1)
    assert batch == guess.tolist()


def test_two_fresh_runs_draw_different_noise() -> None:
    """Two runs of one config from the same start: releases differ by ≈ √2 × the noise scale.

    σ is large, so the difference is noise (the batches' gradients move it by at most
    2·C·B_max/B·lr, small beside it); identical noise would give a far smaller difference.
    """
    big = 40.0
    cfg = DPConfig(noise_multiplier=big, max_grad_norm=C, batch_size=int(BATCH), sample_rate=Q, lr=LR,
                   target_epsilon=1e6)
    x, y = _data(50)
    releases = []
    for _ in range(2):
        model = build_model("mlp", (D_FEATURES,), 2, seed=0, hidden=(64, 32))  # d = 2626: a sharp norm
        client = DPClient(model, (x, y), None, cfg, device="cpu")
        start = client.get_parameters({})
        out, _, _ = client.fit(start, {"local_steps": 1})
        releases.append(np.concatenate([(o - s).ravel() for o, s in zip(out, start)]))
    d = releases[0].size
    scale = LR * big * C / BATCH * np.sqrt(d)  # norm of one release's noise
    diff = float(np.linalg.norm(releases[0] - releases[1]))
    assert diff == pytest.approx(np.sqrt(2) * scale, rel=0.1), (diff, scale)


def test_sigma_and_q_do_not_depend_on_the_number_of_records() -> None:
    """Two sites that differ only in their number of records release identical σ and q."""
    cfg = DPConfig(noise_multiplier=None, planned_steps=200, target_epsilon=3.0, batch_size=16, sample_rate=0.14)
    small, large = _data(40), _data(400, seed=1)
    a = DPClient(build_model("logreg", (D_FEATURES,), 2, seed=0), small, None, cfg, device="cpu")
    b = DPClient(build_model("logreg", (D_FEATURES,), 2, seed=0), large, None, cfg, device="cpu")
    assert a.noise_multiplier == b.noise_multiplier
    assert a.sample_rate == b.sample_rate == 0.14
    assert a._expected_batch() == b._expected_batch() == 16
    events: list[dict] = []
    for c in (a, b):
        c.on_dp_event = events.append
        c.fit(c.get_parameters({}), {"local_steps": 3})
    public = ("noise_multiplier", "sample_rate", "steps", "epsilon", "sensitivity", "max_grad_norm")
    assert {k: events[0][k] for k in public} == {k: events[1][k] for k in public}
