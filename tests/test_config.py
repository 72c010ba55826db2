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
    (["model.device=cuda", "runtime.kind=ray"], "runtime.num_gpus_per_actor is 0, so Ray gives the client actors no GPU"),
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


# -- strict reading (issue 27) ---------------------------------------------------------------------------
def test_a_repeated_key_is_an_error_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\ntrain:\n  local_epochs: 1\n  batch_size: 4\ntrain:\n  rounds: 2\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one section, at lines 2 and 5"):
        load_config(path)
    path.write_text("train:\n  rounds: 2\n  lr: 0.1\n  rounds: 3\n")  # inside a section too
    with pytest.raises(ConfigError, match=r"key 'rounds' appears twice in one section, at lines 2 and 4"):
        load_config(path)


def test_anchors_and_aliases_are_refused_before_anything_expands(tmp_path):
    lines = ["privacy:", "  enabled:", '    - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"    - &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join([*lines, "seed: *i"]) + "\n")  # 9^9 strings once expanded (grew past 3 GB)
    with pytest.raises(ConfigError, match=r"line 3: anchor &a \(YAML anchors and aliases are not allowed"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set seed: line 1: alias \*x"):
        config_from_dict({}, ["seed=*x"])


def test_a_config_over_the_size_limit_is_refused_unread(tmp_path):
    from fedpgp_ray.config import MAX_CONFIG_BYTES

    path = tmp_path / "big.yaml"
    path.write_text("data:\n  domains: [" + ",".join(['"a"'] * (MAX_CONFIG_BYTES // 4 + 1)) + "]\n")
    with pytest.raises(ConfigError, match=r"is [0-9,]+ bytes, more than a config's limit of 1,048,576"):
        load_config(path)


@pytest.mark.parametrize("value", ["''", "'  '"])
def test_output_dir_must_name_a_directory(value):
    with pytest.raises(ConfigError, match="config key 'output_dir' is empty"):
        config_from_dict({}, [f"output_dir={value}"])


@pytest.mark.parametrize("name", ["runs/a?b", "runs/a#b"])
def test_output_dir_with_uri_query_characters_is_refused(name):
    with pytest.raises(ConfigError, match=r"contains '[?#]', which a store URI reads as the start of a query"):
        config_from_dict({}, [f"output_dir={name}"])


def test_algorithm_names_known_without_torch_match_the_registry():
    from fedpgp_ray.algorithms import ALGORITHMS
    from fedpgp_ray.config import ALGORITHM_NAMES

    assert sorted(ALGORITHM_NAMES) == sorted(ALGORITHMS)


def test_refusing_a_config_imports_neither_torch_nor_ray_nor_mlflow(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from fedpgp_ray.cli import main; code = main(['run', '--config', 'quickstrat']); "
            "print(code, sorted(m for m in ('torch', 'open_clip', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "2 []", out
    assert out.stderr.strip().startswith("error: config file not found: quickstrat") and out.stderr.count("\n") == 1
