"""Config validation: every error names the file, section and field."""

from __future__ import annotations

import pytest

from privfl.config import DPSection, common_from, from_table, read_toml
from privfl.errors import ConfigError


@pytest.mark.parametrize("table,msg", [
    ({"lr": "fast"}, r"\[dp\]\.lr: expected a number, got 'fast'"),
    ({"clipin": "psac"}, r"\[dp\]: unknown key\(s\) clipin"),
    ({"clipping": "foo"}, r"\[dp\]\.clipping: must be one of flat, psac, autos"),
    ({"delta": 2.0}, r"\[dp\]\.delta: must be in \(0, 1\)"),
    ({"batch_size": 1.5}, r"\[dp\]\.batch_size: expected an integer"),
    ({"noise_multiplier": 0.0}, r"give noise_multiplier, or planned_steps"),
])
def test_dp_errors_name_the_field(table, msg):
    with pytest.raises(ConfigError, match=msg):
        from_table(DPSection, table, "node.toml: [dp]")


def test_common_sections_and_file_errors(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text('[data]\nsource = "digits"\nnum_sites = 0\n')
    with pytest.raises(ConfigError, match=r"\[data\]\.num_sites: must be >= 1"):
        common_from(read_toml(p), str(p))
    p.write_text('[model]\nname = "resnet"\n')
    with pytest.raises(ConfigError, match=r"\[model\]\.name: unknown model 'resnet'"):
        common_from(read_toml(p), str(p))
    p.write_text("[data\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        read_toml(p)
    with pytest.raises(ConfigError, match="not found"):
        read_toml(tmp_path / "nope.toml")
    p.write_text('[dp]\nclipping = "flat"\nnoise_multiplier = 1.2\nsample_rate = 0.1\n[strategy]\nlocal_steps = 3\n')
    cfg = common_from(read_toml(p), str(p))
    assert cfg.dp.to_dp_config().noise_multiplier == 1.2 and cfg.strategy.local_steps == 3


def test_a_config_without_dp_is_refused_at_load_naming_the_sampling_rate() -> None:
    """No [dp] table means DP with no public q: refused when the config is read (before any node
    or run starts), not by the first DP step."""
    with pytest.raises(ConfigError, match=r"^c\.toml: \[dp\]\.sample_rate: required"):
        common_from({"data": {"source": "breast_cancer"}}, "c.toml")
    assert common_from({"dp": {"sample_rate": 0.1}}, "c.toml").dp.sample_rate == 0.1
