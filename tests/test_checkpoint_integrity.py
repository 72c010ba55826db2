"""Everything read back proves whose it is: client states carry run id, client id and round; a damaged
or foreign newest client state rolls server and clients back together (or stops in one line), never
mixing rounds; a resume never relabels a run with fewer rounds than it has done."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY
from fedpgp_ray.checkpoint import CheckpointStore, ClientStateDamaged
from fedpgp_ray.run import main

COMPARED = ("local", "base", "novel", "hm3", "hm2", "train_loss")


def write_config(tmp_path: Path, name: str, rounds: int) -> Path:
    data = {**TINY, "output_dir": str(tmp_path / name), "runtime": {"kind": "local", "threads_per_worker": 1},
            "train": {**TINY["train"], "rounds": rounds}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_same_run(doc: dict, reference: dict) -> None:
    assert [r["round"] for r in doc["rounds"]] == [r["round"] for r in reference["rounds"]]
    for a, b in zip(doc["rounds"], reference["rounds"]):
        for key in COMPARED:
            assert (key in a["metrics"]) == (key in b["metrics"]), (a["round"], key)
            if key in b["metrics"]:
                assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-6), (a["round"], key)
    assert doc["final"] == reference["final"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    """A finished 2-round in-process run (kept pristine; tests copy it) and the unfaulted 3-round results."""
    tmp = tmp_path_factory.mktemp("integrity")
    assert main(["--config", str(write_config(tmp, "two", 2)), "--no-progress"]) == 0
    assert main(["--config", str(write_config(tmp, "three", 3)), "--no-progress"]) == 0
    return tmp / "two", results(tmp / "three")


def copy_run(runs, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace(str(runs[0]), str(out)))
    return out


def damage_truncated(clients: Path) -> None:
    path = clients / "0" / "round_2.pt"
    path.write_bytes(path.read_bytes()[:100])


def damage_foreign_client(clients: Path) -> None:
    shutil.copy(clients / "1" / "round_2.pt", clients / "0" / "round_2.pt")  # client 1's state as client 0's


def damage_refused_pickle(clients: Path) -> None:
    torch.save({"personal": argparse.Namespace(evil=True)}, clients / "0" / "round_2.pt")  # weights_only refuses


@pytest.mark.parametrize("damage, why", [(damage_truncated, "cannot be read"),
                                         (damage_foreign_client, "belongs to client 1"),
                                         (damage_refused_pickle, "cannot be read")])
def test_a_damaged_or_foreign_newest_client_state_rolls_the_whole_run_back(runs, tmp_path, caplog, damage, why):
    out = copy_run(runs, tmp_path)
    damage(out / "checkpoints" / "clients")
    with caplog.at_level(logging.WARNING):
        assert main(["--resume", str(out), "--set", "train.rounds=3", "--no-progress"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(why in m and "goes back to round 1" in m for m in messages), messages
    assert (out / "checkpoints" / "clients" / "0" / "round_2.pt.unreadable").is_file()
    assert not (out / "checkpoints" / "rollback.json").exists()
    # round 2 was redone by server and clients alike: the run equals an unfaulted 3-round run
    assert_same_run(results(out), runs[1])


def test_a_damaged_state_the_server_cannot_roll_back_past_stops_in_one_line(runs, tmp_path, capsys):
    out = copy_run(runs, tmp_path)
    (out / "checkpoints" / "server" / "round_1.pt").unlink()  # only round 2 is kept
    damage_truncated(out / "checkpoints" / "clients")
    capsys.readouterr()
    assert main(["--resume", str(out), "--set", "train.rounds=3", "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert "cannot redo it from server round 1" in errors[0] and "restore the file" in errors[0]
    assert (out / "checkpoints" / "server" / "round_2.pt").is_file()  # nothing of the run is lost


def test_client_states_record_and_check_run_client_and_round(tmp_path):
    mine = CheckpointStore(tmp_path, run_id="run-a")
    mine.save_client(0, 1, {"personal": {"w": torch.ones(2)}})
    saved = torch.load(tmp_path / "clients" / "0" / "round_1.pt", weights_only=True)
    assert (saved["run_id"], saved["client_id"], saved["round"]) == ("run-a", 0, 1)
    assert torch.equal(mine.load_client(0, 1)["personal"]["w"], torch.ones(2))
    # another run's file, and a file renamed to another round: refused (no server round to go back to)
    with pytest.raises(ClientStateDamaged, match="belongs to another run"):
        CheckpointStore(tmp_path, run_id="run-b").load_client(0, 1)
    mine.save_client(1, 1, {"personal": {"w": torch.ones(2)}})
    (tmp_path / "clients" / "1" / "round_1.pt").rename(tmp_path / "clients" / "1" / "round_2.pt")
    with pytest.raises(ClientStateDamaged, match="holds round 1"):
        mine.load_client(1, 2)
    # states written before identities were recorded load as before
    (tmp_path / "clients" / "2").mkdir()
    torch.save({"round": 3, "personal": {"w": torch.zeros(2)}}, tmp_path / "clients" / "2" / "round_3.pt")
    assert mine.load_client(2, 5)["round"] == 3


def test_resume_with_fewer_rounds_than_done_is_refused_in_one_line(runs, tmp_path, capsys):
    out = copy_run(runs, tmp_path)
    before = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["--resume", str(out), "--set", "train.rounds=1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "train.rounds=1, fewer than the 2 rounds the run has done" in err
    assert (out / "config.yaml").read_text() == before  # nothing rewritten
    # the same number of rounds: nothing to train, and the results say what they hold
    assert main(["--resume", str(out), "--no-progress"]) == 0
    doc = results(out)
    assert doc["rounds_done"] == 2 == doc["config"]["train"]["rounds"] == doc["rounds"][-1]["round"]
