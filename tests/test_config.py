"""Config validation: every bad value fails before any work, in one line naming key and range."""
from __future__ import annotations

import pytest
import yaml

from fedpgp_ray.config import ConfigError, config_from_dict, load_config
from fedpgp_ray.run import main


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.rank=0"], "'algorithm.rank' = 0 is out of range: must be >= 1"),
    (["federation.client_fraction=0"], "'federation.client_fraction' = 0.0 is out of range: must be > 0.0 and <= 1.0"),
    (["federation.client_fraction=1.5"], "must be > 0.0 and <= 1.0"),
    (["data.shots=0"], "'data.shots' = 0 is out of range"),
    (["train.rounds=0"], "'train.rounds' = 0 is out of range"),
    (["train.lr=fast"], "'train.lr' must be of type float"),
    (["runtime.kind=spark"], "must be one of 'local', 'ray'"),
    (["train.epochs=3"], "unknown config key 'train.epochs': allowed keys under 'train' are"),
    (["federation.min_reporting_clients=50"], "must be <= federation.num_clients"),
    (["data.partition=iid"], "'data.partition' = 'iid' is out of range: must be one of"),
])
def test_bad_values_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bool_is_not_an_int_and_int_is_a_float():
    with pytest.raises(ConfigError, match="'train.rounds' must be of type int"):
        config_from_dict({"train": {"rounds": True}})
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_exponent_floats_that_pyyaml_reads_as_strings_are_numbers():
    assert yaml.safe_load("lr: 2e-3")["lr"] == "2e-3"  # YAML 1.1: no dot, no float
    assert config_from_dict(yaml.safe_load("train: {lr: 2e-3}")).train.lr == 0.002
    assert load_config(None, ["train.lr=5E-4"]).train.lr == 0.0005
    with pytest.raises(ConfigError, match="'train.lr' must be of type float"):
        config_from_dict({"train": {"lr": "fast"}})


def test_quickstart_loads_and_output_dir_is_absolute():
    cfg = load_config()
    assert cfg.output_dir.startswith("/")
    assert cfg.data.dataset == "world"


def test_cli_reports_config_errors_in_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  rounds: -1\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'train.rounds' = -1 is out of range") and "\n" not in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["--algorithms", "fedpgp,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
