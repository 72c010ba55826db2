"""`fedpgp-ray compare`: algorithm specs, identical partitions per seed, mean ± std tables and files."""
from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from fedpgp_ray import cli
from fedpgp_ray.compare import (AlgorithmSpec, main, parse_algorithms, parse_seeds, run_config, summarize,
                                task_fingerprint)
from fedpgp_ray.config import ConfigError, config_from_dict

from conftest import TINY


def _config_file(tmp_path, **extra) -> str:
    data = {**TINY, "train": {**TINY["train"], "rounds": 1}, "federation": {"num_clients": 2},
            "runtime": {"threads_per_worker": 1}, "output_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_parse_algorithms_with_ablation_overrides():
    specs = parse_algorithms("clip, fedpgp, fedpgp:mu=0,fedpgp:rank=2:mu=0.1")
    assert [s.label for s in specs] == ["clip", "fedpgp", "fedpgp:mu=0", "fedpgp:rank=2:mu=0.1"]
    assert specs[3] == AlgorithmSpec("fedpgp:rank=2:mu=0.1", "fedpgp", (("rank", "2"), ("mu", "0.1")))
    assert specs[2].slug == "fedpgp_mu=0"
    for bad, message in [("nope", "unknown algorithm"), ("fedpgp:mu", "key=value"), ("clip,clip", "twice"),
                         ("fedpgp:name=clip", "name"), ("", "empty"), ("fedpgp:data.shots=2", "key=value")]:
        with pytest.raises(ConfigError, match=message):
            parse_algorithms(bad)
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("a", "-1", "1,1", ""):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def test_run_configs_share_the_task_and_differ_in_algorithm_only(tmp_path):
    base = config_from_dict({**TINY, "output_dir": str(tmp_path / "base")})
    runs = [run_config(base, spec, 1, tmp_path / "out") for spec in parse_algorithms("promptfl,fedprox:prox_mu=0.2")]
    assert runs[0].algorithm.prox_mu == 0.0 and runs[1].algorithm.prox_mu == 0.2
    assert runs[0].seed == runs[1].seed == 1 and runs[0].data == runs[1].data
    assert task_fingerprint(runs[0]) == task_fingerprint(runs[1])
    assert task_fingerprint(run_config(base, parse_algorithms("promptfl")[0], 2, tmp_path)) != task_fingerprint(runs[0])
    assert runs[1].output_dir == str(tmp_path / "out" / "fedprox_prox_mu=0.2" / "seed1")
    with pytest.raises(ConfigError, match="fedpgp:rank=0"):  # overrides are validated like any config key
        run_config(base, parse_algorithms("fedpgp:rank=0")[0], 0, tmp_path)


def test_summarize_mean_and_sample_std():
    runs = [{"label": "a", "seed": s, "final": {"local": v, "base": 50.0, "novel": None, "hm3": None, "hm2": None},
             "wall_seconds": 1.0} for s, v in enumerate([10.0, 20.0, 30.0])]
    stats = summarize(runs, ["a"])["a"]
    assert stats["local"]["mean"] == 20.0 and stats["local"]["std"] == pytest.approx(10.0)  # ddof = 1
    assert stats["base"]["std"] == 0.0 and stats["local"]["n"] == 3
    assert stats["novel"]["mean"] is None and stats["wall_seconds"]["total"] == 3.0
    single = summarize(runs[:1], ["a"])["a"]
    assert single["local"]["std"] == 0.0


def test_compare_two_algorithms_two_seeds(tmp_path, capsys):
    config = _config_file(tmp_path)
    out = tmp_path / "cmp"
    argv = ["--config", config, "--algorithms", "clip,promptfl", "--seeds", "0,1", "--output-dir", str(out),
            "--no-progress"]
    assert cli.main(["compare", *argv]) == 0
    printed = capsys.readouterr().out
    assert "±" in printed and "promptfl" in printed and "wall time" in printed

    doc = json.loads((out / "comparison.json").read_text())
    assert doc["algorithms"] == ["clip", "promptfl"] and doc["seeds"] == [0, 1]
    assert doc["command"].startswith("fedpgp-ray compare --config")
    assert len(doc["runs"]) == 4 and doc["machine"]["cpu_count"]
    for seed in (0, 1):  # identical task for every algorithm of a seed
        assert len({r["task"] for r in doc["runs"] if r["seed"] == seed}) == 1
    assert doc["runs"][0]["task"] != doc["runs"][2]["task"]
    for label in ("clip", "promptfl"):
        for metric in ("local", "base", "novel", "hm3", "hm2"):
            stat = doc["summary"][label][metric]
            assert stat["n"] == 2 and 0.0 <= stat["mean"] <= 100.0 and stat["std"] >= 0.0
    # the per-run results are the runs' own results.json
    run = json.loads((out / "promptfl" / "seed1" / "results.json").read_text())
    assert run["seed"] == 1 and run["algorithm"] == "promptfl"
    assert math.isclose(run["final"]["hm3"], doc["summary"]["promptfl"]["hm3"]["values"][1])

    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["algorithm"] for r in rows] == ["clip", "promptfl"] and "hm2_std" in rows[0]
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 4
    md = (out / "comparison.md").read_text()
    assert "| promptfl |" in md and "HM3" in md and doc["command"] in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    # --reuse: finished runs with the same config and backbone are not run again
    backbone = json.loads((out / "clip" / "seed0" / "backbone.json").read_text())
    assert backbone == doc["backbone"] and backbone["pretrained"] is None
    (out / "clip" / "seed1" / "backbone.json").write_text(json.dumps({**backbone, "sha256": "other"}))
    assert main([*argv, "--reuse"]) == 0
    printed = capsys.readouterr().out
    ran = [line for line in printed.splitlines() if "(ran," in line]
    assert printed.count("(reused,") == 3 and len(ran) == 1 and "clip seed 1:" in ran[0]


def test_compare_stops_when_the_checkpoint_changes_midway(tmp_path, capsys, monkeypatch):
    import fedpgp_ray.compare as compare_module

    hashes = iter(["a", "a", "b"])  # the start, before run 1, before run 2
    monkeypatch.setattr(compare_module, "backbone_identity", lambda cfg: {"sha256": next(hashes)})
    argv = ["--config", _config_file(tmp_path), "--algorithms", "clip", "--seeds", "0,1",
            "--output-dir", str(tmp_path / "cmp"), "--no-progress"]
    assert main(argv) == 2
    assert "checkpoint changed during the comparison (before clip seed 1)" in capsys.readouterr().err


def test_compare_user_errors_exit_2(tmp_path, capsys):
    config = _config_file(tmp_path)
    assert main(["--config", config, "--algorithms", "fedpgp:rank=0", "--seeds", "0"]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(["--config", config, "--algorithms", "clip", "--seeds", "x"]) == 2


@pytest.mark.parametrize("where", [["--output-dir", "s3://bucket/cmp"], ["--set", "output_dir=s3://bucket/runs"]])
def test_compare_refuses_a_uri_output_dir(tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    config = _config_file(tmp_path)
    assert main(["--config", config, "--algorithms", "clip", "--seeds", "0", *where]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "s3://bucket/" in err and "pass a local --output-dir" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no local `s3:` folder


@pytest.mark.slow
def test_compare_mlflow_parent_and_child_runs(tmp_path, capsys):
    from mlflow import MlflowClient

    config = _config_file(tmp_path, tracking={"mlflow": True, "experiment": "cmp-test"})
    out = tmp_path / "cmp"
    assert main(["--config", config, "--algorithms", "clip", "--seeds", "0,1", "--output-dir", str(out),
                 "--no-progress"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store: beside the output dir
    experiment = client.get_experiment_by_name("cmp-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fedpgp.compare") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["clip-seed0", "clip-seed1"]
    assert all(r.info.status == "FINISHED" and "hm3" in r.data.metrics for r in children)
    assert "clip/hm3_mean" in parent.data.metrics and parent.data.params["compare.seeds"] == "0,1"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {
        "comparison/comparison.csv", "comparison/comparison.png"}


def _seeded_checkpoint(path) -> str:
    """Random tiny-CLIP weights saved to a file, so every process (Ray actors too) loads the same model."""
    import open_clip
    import torch

    from fedpgp_ray.clip.backbone import register_project_models

    register_project_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        torch.save(open_clip.create_model("fedpgp-tiny").state_dict(), path)
    return str(path)


@pytest.mark.slow
def test_compare_on_the_ray_runtime_matches_local(tmp_path):
    model = {"name": "fedpgp-tiny", "pretrained": _seeded_checkpoint(tmp_path / "tiny.pt")}
    argv = ["--algorithms", "clip,promptfl", "--seeds", "0", "--no-progress"]
    ray_cfg = _config_file(tmp_path, model=model, runtime={"kind": "ray", "num_actors": 2, "num_cpus_per_actor": 0.5,
                                                           "threads_per_worker": 1})
    assert main(["--config", ray_cfg, "--output-dir", str(tmp_path / "ray"), *argv]) == 0
    local_cfg = _config_file(tmp_path, model=model)
    assert main(["--config", local_cfg, "--output-dir", str(tmp_path / "local"), *argv]) == 0
    on_ray, local = (json.loads((tmp_path / d / "comparison.json").read_text()) for d in ("ray", "local"))
    assert on_ray["runtime"] == "ray" and local["runtime"] == "local" and len(on_ray["runs"]) == 2
    for a, b in zip(on_ray["runs"], local["runs"]):  # both runtimes give the same numbers
        assert a["final"] == pytest.approx(b["final"], abs=1e-6)
