"""privfl.preprocessing: public ranges (file and built-in), log1p, the DP estimate and its
event, the research-only per-site z-score, and one-line config errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from privfl.accounting import PrivacyAccountant
from privfl.clients.randomness import SecureRandom, SeededRandom
from privfl.config import DataSection, from_table
from privfl.data import load_builtin, split_sites
from privfl.errors import ConfigError, DataError
from privfl.preprocessing import (
    BREAST_CANCER_RANGES,
    PreprocessingEvent,
    PreprocessingSpec,
    check_deployable,
    fit_preprocessing,
    load_preprocessing,
    load_statistics,
    preprocess_site,
    save_preprocessing,
    spec_description,
)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def _stats_file(tmp_path, low, high, extra: str = "") -> str:
    p = tmp_path / "stats.toml"
    p.write_text(f'source = "consortium agreement"\nlow = {list(low)}\nhigh = {list(high)}\n{extra}')
    return str(p)


# ---- public ranges ------------------------------------------------------------------------
def test_public_ranges_from_a_file_map_to_minus_one_one_and_clip(tmp_path) -> None:
    path = _stats_file(tmp_path, [0.0, 10.0], [2.0, 20.0])
    pre = fit_preprocessing(PreprocessingSpec(statistics="stats.toml"), np.zeros((3, 2)), base_dir=tmp_path)
    x = np.array([[1.0, 15.0], [-5.0, 30.0], [2.0, 10.0]])
    np.testing.assert_allclose(pre.apply(x), [[0.0, 0.0], [-1.0, 1.0], [1.0, -1.0]])
    assert pre.apply(x).dtype == np.float32
    import torch  # the README's take-home recipe feeds a tensor straight to the model

    t = pre.apply(torch.as_tensor(x, dtype=torch.float64))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), pre.apply(x))
    assert torch.nn.Linear(2, 1)(t).shape == (3, 1)
    d = pre.describe()
    assert d["kind"] == "public" and d["low"] == [0.0, 10.0] and d["high"] == [2.0, 20.0]
    assert d["statistics"]["source"] == "consortium agreement"
    import hashlib
    assert d["statistics"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert pre.dp_event is None


def test_public_map_does_not_depend_on_the_records() -> None:
    data = load_builtin("breast_cancer")
    a = fit_preprocessing(PreprocessingSpec(), data.x[:50], dataset_name="breast_cancer")
    b = fit_preprocessing(PreprocessingSpec(), data.x[300:] * 3, dataset_name="breast_cancer")
    np.testing.assert_array_equal(a.apply(data.x), b.apply(data.x))
    assert a.describe() == b.describe()
    y = a.apply(data.x)
    assert y.min() >= -1 and y.max() <= 1 and y.max() > 0.99 and y.min() < -0.99


def test_builtin_breast_cancer_table_is_the_published_one() -> None:
    """The hard-coded table is scikit-learn's published DESCR table, in the loader's order."""
    from sklearn.datasets import load_breast_cancer

    b = load_breast_cancer()
    rows = re.findall(r"^([a-z ]+\((?:mean|standard error|worst)\)):\s+([\d.]+)\s+([\d.]+)\s*$", b.DESCR, re.M)
    assert len(rows) == 30
    assert [(float(lo), float(hi)) for _, lo, hi in rows] == list(BREAST_CANCER_RANGES)
    # published table rows follow the loader's features (mean radius ... worst fractal dimension)
    names = [n.replace("(standard error)", "error") for n, _, _ in rows]
    for published, feature in zip(names, b.feature_names):
        words = published.replace("(", "").replace(")", "").split()
        assert set(words) == set(feature.split()), (published, feature)
    # the ranges cover the data up to the published rounding
    assert (b.data.min(0) >= np.array([lo for lo, _ in BREAST_CANCER_RANGES]) - 1e-3).all()
    assert (b.data.max(0) <= np.array([hi for _, hi in BREAST_CANCER_RANGES]) + 2e-3).all()


def test_builtin_digits_and_synthetic() -> None:
    digits = load_builtin("digits")
    pre = fit_preprocessing(PreprocessingSpec(), digits.x, dataset_name="digits")
    np.testing.assert_allclose(pre.apply(digits.x), 2 * digits.x - 1, atol=1e-6)  # [0, 1] by definition → [−1, 1]
    assert pre.describe()["low"] == [0.0] * 64 and pre.describe()["feature_shape"] == [1, 8, 8]
    syn = load_builtin("synthetic")
    pre = fit_preprocessing(PreprocessingSpec(), syn.x, dataset_name="synthetic")
    np.testing.assert_array_equal(pre.apply(syn.x), syn.x)  # generated on a unit scale: as generated
    with pytest.raises(ConfigError, match=r"\[data\].statistics: .*public statistics file") as e:
        fit_preprocessing(PreprocessingSpec(), syn.x, dataset_name=None)  # a CSV/NPZ needs a file
    _one_line(e)


def test_log1p_transforms_records_and_public_ranges(tmp_path) -> None:
    _stats_file(tmp_path, [0.0, 1.0], [math.e - 1, math.e**2 - 1])
    pre = fit_preprocessing(PreprocessingSpec(transform="log1p", statistics="stats.toml"), np.zeros((1, 2)),
                            base_dir=tmp_path)
    x = np.array([[math.e - 1, 1.0], [0.0, 100.0]])
    np.testing.assert_allclose(pre.apply(x), [[1.0, -1.0], [-1.0, 1.0]], atol=1e-6)
    data = load_builtin("breast_cancer")
    y = fit_preprocessing(PreprocessingSpec(transform="log1p"), data.x, dataset_name="breast_cancer").apply(data.x)
    assert -1 <= y.min() and y.max() <= 1
    # log1p on negative features is refused, with the field named
    neg = _stats_file(tmp_path, [-1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ConfigError, match=r"\[data\].transform: 'log1p' needs non-negative") as e:
        fit_preprocessing(PreprocessingSpec(transform="log1p", statistics=neg), np.zeros((1, 2)))
    _one_line(e)
    with pytest.raises(DataError, match=r"\[data\].transform: 'log1p' needs non-negative"):
        fitted = fit_preprocessing(PreprocessingSpec(scaling="none", transform="log1p"), np.zeros((1, 1)))
        fitted.apply(np.array([[-2.0]]))


# ---- the DP estimate --------------------------------------------------------------------
def test_dp_estimate_is_near_the_truth_and_its_event_has_sensitivity_sqrt_1_plus_2d() -> None:
    rng = np.random.default_rng(0)
    n, d, bound, sigma = 200_000, 5, 10.0, 1.0
    loc = np.array([0.0, 1.0, -2.0, 3.0, 0.5])
    scale = np.array([1.0, 0.5, 2.0, 1.5, 0.1])
    x = rng.normal(loc, scale, size=(n, d))
    spec = PreprocessingSpec(scaling="dp", dp_noise_multiplier=sigma, dp_bound=bound)
    pre = fit_preprocessing(spec, x, source=SeededRandom(1))
    ev = pre.dp_event
    assert ev == PreprocessingEvent(sigma, math.sqrt(1 + 2 * d), "feature_moments")
    assert ev.sample_rate == 1.0 and ev.steps == 1
    clipped = np.clip(x, -bound, bound)
    # noise std on each sum is σ·Δ = 3.3, i.e. ≈ bound·σΔ/n on a mean: 1.7e-4 here; allow 6 of those
    # (and the same again for the delta-method error of the std)
    tol_mean = 6 * bound * sigma * ev.sensitivity / n
    np.testing.assert_allclose(pre.dp_mean, clipped.mean(0), atol=tol_mean)
    tol_std = 6 * bound**2 * sigma * ev.sensitivity / n / (2 * clipped.std(0)) + tol_mean
    assert (np.abs(pre.scale - clipped.std(0)) <= tol_std).all(), (pre.scale, clipped.std(0), tol_std)
    assert pre.offset is None  # not centred by default: only divided by the DP std
    np.testing.assert_allclose(pre.apply(x[:3]), (clipped[:3] / pre.scale).astype(np.float32), rtol=1e-6)
    assert abs(pre.dp_count - n) < 6 * sigma * ev.sensitivity
    # centring on request
    c = fit_preprocessing(PreprocessingSpec(scaling="dp", dp_noise_multiplier=sigma, dp_bound=bound, dp_centre=True),
                          x, source=SeededRandom(1))
    assert abs(c.apply(x).mean(0)).max() < 0.01
    # the event composes into an accountant as one Gaussian with q = 1
    acc = PrivacyAccountant("rdp")
    acc.step(ev.noise_multiplier, ev.sample_rate, ev.steps)
    assert 0 < acc.get_epsilon(1e-5) < 10


def test_dp_noise_is_calibrated_to_sigma_times_sensitivity() -> None:
    """Over many seeds the noisy count's spread is σ·√(1+2d): the noise really is there, at its scale."""
    x = np.random.default_rng(0).uniform(0, 1, size=(1000, 4))
    spec = PreprocessingSpec(scaling="dp", dp_noise_multiplier=2.0, dp_bound=1.0)
    counts = np.array([fit_preprocessing(spec, x, source=SeededRandom(s)).dp_count for s in range(300)])
    assert counts.std() == pytest.approx(2.0 * 3.0, rel=0.15)  # √(1 + 2·4) = 3
    assert abs(counts.mean() - 1000) < 1.5
    a = fit_preprocessing(spec, x, source=SeededRandom(7))
    b = fit_preprocessing(spec, x, source=SeededRandom(7))
    np.testing.assert_array_equal(a.scale, b.scale)  # seeded: reproducible
    s = fit_preprocessing(spec, x)  # default: a secure source
    assert s.randomness == "secure" and a.randomness == "seeded"
    assert fit_preprocessing(spec, x, source=SecureRandom()).describe()["randomness"] == "secure"


def test_dp_estimate_on_few_records_stays_finite_and_positive() -> None:
    x = np.random.default_rng(0).normal(size=(5, 3))
    spec = PreprocessingSpec(scaling="dp", dp_noise_multiplier=5.0, dp_bound=3.0)
    for seed in range(20):
        pre = fit_preprocessing(spec, x, source=SeededRandom(seed))
        assert np.isfinite(pre.scale).all() and (pre.scale > 0).all() and pre.dp_count >= 1
        assert np.abs(pre.apply(x)).max() <= 3.0 / pre.scale.min() + 1e-6


def test_saved_dp_preprocessing_reloads_identically(tmp_path) -> None:
    data = load_builtin("breast_cancer")
    spec = PreprocessingSpec(scaling="dp", transform="log1p", dp_noise_multiplier=1.0, dp_bound=9.0)
    pre = fit_preprocessing(spec, data.x, source=SeededRandom(0))
    save_preprocessing(pre, tmp_path / "p.json")
    again = load_preprocessing(tmp_path / "p.json")
    assert again.describe() == pre.describe() and again.describe()["spec"] == spec_description(spec)
    np.testing.assert_array_equal(again.apply(data.x), pre.apply(data.x))
    assert again.dp_event == pre.dp_event


# ---- research only: per-site z-scores --------------------------------------------------------
def test_site_scaling_is_refused_by_check_deployable(caplog) -> None:
    spec = PreprocessingSpec(scaling="site")
    with pytest.raises(ConfigError, match=r"node\.toml: \[data\]\.scaling: 'site' .*private statistics") as e:
        check_deployable(spec, "node.toml: [data]")
    msg = _one_line(e)
    assert "'public'" in msg and "'dp'" in msg and "'none'" in msg  # it explains the choices
    for ok in (PreprocessingSpec(), PreprocessingSpec(scaling="none"),
               PreprocessingSpec(scaling="dp", dp_noise_multiplier=1.0, dp_bound=1.0)):
        check_deployable(ok)
    # still available to simulate/compare, with a warning
    site = split_sites(load_builtin("breast_cancer"), 2, "iid", seed=0)[0]
    with caplog.at_level("WARNING", logger="privfl.data"):
        scaled, pre = preprocess_site(spec, site)
    assert "private statistics outside DP" in caplog.text
    assert np.allclose(scaled.train.x.mean(0), 0, atol=1e-4)
    assert "mean" not in str(pre.describe())  # never describes the private values


# ---- config errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("old,hint", [("scale", "scaling = 'public'"),
                                      ("log", "transform = 'log1p' with scaling = 'public'")])
def test_old_scaling_names_are_refused_with_guidance(old: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=r"cfg: \[data\]\.scaling: ") as e:
        from_table(DataSection, {"scaling": old}, "cfg: [data]")
    assert hint in _one_line(e)
    with pytest.raises(ConfigError, match=r"\[data\]\.scaling"):
        PreprocessingSpec(scaling=old).validate()


@pytest.mark.parametrize("table,field", [
    ({"scaling": "zscore"}, "scaling"),
    ({"transform": "log"}, "transform"),
    ({"scaling": "dp", "dp_bound": 1.0}, "dp_noise_multiplier"),
    ({"scaling": "dp", "dp_noise_multiplier": 1.0}, "dp_bound"),
    ({"scaling": "dp", "dp_noise_multiplier": 1.0, "dp_bound": float("inf")}, "dp_bound"),
    ({"dp_noise_multiplier": 1.0}, "dp_noise_multiplier"),
    ({"scaling": "none", "statistics": "s.toml"}, "statistics"),
    ({"source": "x.csv", "label_column": "y"}, "statistics"),
])
def test_bad_data_preprocessing_fields_name_the_field(table: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"cfg: \[data\]\.{field}: ") as e:
        from_table(DataSection, table, "cfg: [data]")
    _one_line(e)


@pytest.mark.parametrize("body,match", [
    ("low = [0.0]\nhigh = [1.0, 2.0]\n", "low has 1 values but high has 2"),
    ("low = [0.0, 3.0]\nhigh = [1.0, 2.0]\n", r"feature 1: low \(3\) must be < high \(2\)"),
    ("low = [0.0, 2.0]\nhigh = [1.0, 2.0]\n", r"feature 1: low \(2\) must be < high \(2\)"),
    ("low = [0.0, nan]\nhigh = [1.0, 2.0]\n", r"low\[1\] must be finite"),
    ("low = [0.0, 1.0]\nhigh = [1.0, inf]\n", r"high\[1\] must be finite"),
    ("low = [0.0, 1.0]\n", "missing high"),
    ("low = [0.0, 1.0]\nhigh = [1.0, 2.0]\nlwo = 3\n", "unknown key"),
    ("low = [0.0, 'a']\nhigh = [1.0, 2.0]\n", r"low\[1\] must be a number"),
    ("low = [0.0, \n", "not a valid TOML file"),
])
def test_bad_statistics_files_give_one_line_errors(tmp_path, body: str, match: str) -> None:
    p = tmp_path / "stats.toml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=r"\[data\]\.statistics: .*" + match) as e:
        load_statistics(p)
    _one_line(e)


def test_statistics_file_of_the_wrong_width_or_missing(tmp_path) -> None:
    _stats_file(tmp_path, [0.0, 0.0], [1.0, 1.0])
    spec = DataSection(statistics="stats.toml").preprocessing_spec(tmp_path)  # relative to the config folder
    assert spec.statistics == str(tmp_path / "stats.toml")
    with pytest.raises(ConfigError, match=r"\[data\]\.statistics: .*2 ranges, the data has 3 features") as e:
        fit_preprocessing(spec, np.zeros((4, 3)))
    _one_line(e)
    with pytest.raises(ConfigError, match=r"\[data\]\.statistics: public statistics file not found") as e:
        fit_preprocessing(PreprocessingSpec(statistics=str(tmp_path / "nope.toml")), np.zeros((4, 2)))
    _one_line(e)
