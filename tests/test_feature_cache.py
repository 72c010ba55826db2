"""The on-disk feature cache: reused across processes, one encoder per entry, rebuilt when broken,
invalidated by anything that changes a feature (precision, weights, image bytes)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedpgp_ray.cli import main as cli_main
from fedpgp_ray.clip.backbone import FrozenClip, load_clip
from fedpgp_ray.clip.features import (FeatureRequest, ImageFeatureCache, augmentation, cache_entries,
                                      describe_transform)
from fedpgp_ray.config import ModelConfig
from fedpgp_ray.data.base import ImageSplit

# Encodes 24 seeded images (2 augmented views each) into a cache directory and prints how many image
# passes it ran and a hash of the features. ENCODE_DELAY slows each batch down so that two processes
# started together really overlap.
SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, time
    import numpy as np
    from fedpgp_ray.clip.backbone import load_clip
    from fedpgp_ray.clip.features import ImageFeatureCache
    from fedpgp_ray.config import ModelConfig
    from fedpgp_ray.data.base import ImageSplit

    clip = load_clip(ModelConfig(name="fedpgp-tiny", pretrained=None))
    encode = clip.encode_images
    def slow(x):
        time.sleep(float(sys.argv[2]))
        return encode(x)
    clip.encode_images = slow
    images = np.random.default_rng(0).integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
    cache = ImageFeatureCache(clip, sys.argv[1], batch_size=8)
    feats = cache.features("toy", "train", ImageSplit(images, np.zeros(24, dtype=np.int64)), np.arange(24),
                           views=2, seed=3)
    print(json.dumps({"encoded": cache.encoded_images,
                      "sha": hashlib.sha256(feats.numpy().tobytes()).hexdigest()}))
""")


def _start(cache_dir: Path, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "FEDPGP_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(cache_dir), str(delay)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def clip():
    return load_clip(ModelConfig(name="fedpgp-tiny", pretrained=None))


def _split(n: int = 6) -> ImageSplit:
    rng = np.random.default_rng(0)
    return ImageSplit(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), np.zeros(n, dtype=np.int64))


def test_second_process_reads_what_the_first_encoded(tmp_path):
    first = _result(_start(tmp_path))
    second = _result(_start(tmp_path))
    assert first["encoded"] == 24 * 2  # 24 images x 2 views
    assert second["encoded"] == 0 and second["sha"] == first["sha"]


def test_two_processes_at_once_encode_each_entry_once(tmp_path):
    procs = [_start(tmp_path, delay=0.3) for _ in range(2)]
    a, b = (_result(p) for p in procs)
    assert sorted([a["encoded"], b["encoded"]]) == [0, 48]  # one encoded, the other waited and read
    assert a["sha"] == b["sha"]


def test_processes_split_several_entries_between_them(clip, tmp_path):
    """fetch(): entries nobody else is encoding are taken first, the rest are waited for and read."""
    split = _split(8)
    requests = [FeatureRequest("toy", "test", split, np.arange(i, i + 2)) for i in range(0, 8, 2)]
    mine = ImageFeatureCache(clip, tmp_path)
    theirs = ImageFeatureCache(clip, tmp_path)
    from filelock import FileLock
    busy = FileLock(str(tmp_path / f"{theirs.key(requests[0])}.lock"))
    busy.acquire()  # "another process" is encoding entry 0 ...
    try:
        out = [mine._get(r, wait=False) for r in requests]
        assert out[0] is None and all(o is not None for o in out[1:])  # ... so this one skipped it
    finally:
        busy.release()
    both = mine.fetch(requests)  # now free: encoded here
    assert mine.encoded_images == 8
    assert torch.allclose(torch.cat(both), mine.features("toy", "test", split, np.arange(8)), atol=1e-6)


def test_truncated_cache_file_is_logged_once_and_rebuilt(clip, tmp_path, caplog):
    split, idx = _split(), np.arange(6)
    feats = ImageFeatureCache(clip, tmp_path).features("toy", "test", split, idx)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])  # a crash mid-copy, a full disk...
    cache = ImageFeatureCache(clip, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedpgp_ray.clip.features"):
        again = cache.features("toy", "test", split, idx)
    assert torch.equal(again, feats) and cache.encoded_images == 6
    assert sum("rebuilding it" in r.message for r in caplog.records) == 1
    assert ImageFeatureCache(clip, tmp_path).features("toy", "test", split, idx).shape == feats.shape
    # a foreign file under the entry's name (another tensor) is rebuilt too
    torch.save(torch.zeros(3), path)
    cache = ImageFeatureCache(clip, tmp_path)
    assert torch.equal(cache.features("toy", "test", split, idx), feats) and cache.encoded_images == 6


def test_entry_rewritten_with_its_own_key_but_other_tensors_is_rebuilt(clip, tmp_path, caplog):
    split, idx = _split(), np.arange(6)
    feats = ImageFeatureCache(clip, tmp_path).features("toy", "test", split, idx)
    (path,) = tmp_path.glob("*.pt")
    entry = torch.load(path, weights_only=True)
    # same key, same shape, other features (another run's entry renamed, a tampered file): the checksum
    # no longer matches
    torch.save({**entry, "value": torch.flip(entry["value"], [0])}, path)
    cache = ImageFeatureCache(clip, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedpgp_ray.clip.features"):
        again = cache.features("toy", "test", split, idx)
    assert torch.equal(again, feats) and cache.encoded_images == 6
    assert any("does not match its checksum" in r.message for r in caplog.records)
    assert torch.equal(torch.load(path, weights_only=True)["value"], feats)  # the rebuilt entry is on disk
    # an entry without a checksum is rebuilt (an earlier version's entries have other keys: the format
    # version is a key field)
    torch.save({k: v for k, v in entry.items() if k != "sha256"}, path)
    cache = ImageFeatureCache(clip, tmp_path)
    assert torch.equal(cache.features("toy", "test", split, idx), feats) and cache.encoded_images == 6


def test_precision_and_weights_change_the_key(clip, tmp_path):
    request = FeatureRequest("toy", "test", _split(), np.arange(6))
    base = ImageFeatureCache(clip, tmp_path).key(request)
    amp = FrozenClip(clip.model, clip.tokenizer, clip.preprocess, clip.identity, clip.device, precision="amp")
    assert ImageFeatureCache(amp, tmp_path).key(request) != base
    other = load_clip(ModelConfig(name="fedpgp-tiny", pretrained=None))  # same name and tag ...
    with torch.no_grad():
        other.model.visual.proj.add_(1e-3)  # ... other weights
    assert other.identity == clip.identity and ImageFeatureCache(other, tmp_path).key(request) != base
    views = FeatureRequest("toy", "test", request.split, request.indices, views=2, seed=0)
    assert ImageFeatureCache(clip, tmp_path).key(views) != base
    assert ImageFeatureCache(clip, tmp_path).key(FeatureRequest("x", "y", request.split, request.indices)) == base


def test_image_content_change_is_caught_by_mtime_or_content_hash(clip, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(3):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    request = FeatureRequest("toy", "test", ImageSplit(paths, np.zeros(3, dtype=np.int64)), np.arange(3))
    stat_key = ImageFeatureCache(clip, tmp_path).key(request)
    content_key = ImageFeatureCache(clip, tmp_path, content_hash=True).key(request)
    st = os.stat(paths[1])
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(paths[1])  # same size (PNG of a flat colour)
    assert os.path.getsize(paths[1]) == st.st_size
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime: only content tells
    assert ImageFeatureCache(clip, tmp_path).key(request) == stat_key
    assert ImageFeatureCache(clip, tmp_path, content_hash=True).key(request) != content_key
    os.utime(paths[1])  # a new mtime is enough for the default identity
    assert ImageFeatureCache(clip, tmp_path).key(request) != stat_key


def test_transform_description_is_stable_and_names_parameters(clip):
    desc = describe_transform(augmentation(clip))
    assert desc == describe_transform(augmentation(clip))
    text = json.dumps(desc)
    assert "0x" not in text and "RandomResizedCrop" in text and "bicubic" in text and "_to_rgb" in text
    assert json.dumps(describe_transform(lambda im: im)) == json.dumps(describe_transform(lambda im: im))


def test_cache_command_lists_and_clears(clip, tmp_path, capsys):
    ImageFeatureCache(clip, tmp_path).features("toy-set", "test", _split(), np.arange(6))
    ImageFeatureCache(clip, tmp_path).patch_tokens("toy-set", "test", _split(), np.arange(6))
    rows = cache_entries(tmp_path)
    assert sorted(r["kind"] for r in rows) == ["patch_tokens", "pooled"] and all(r["bytes"] > 0 for r in rows)
    assert cli_main(["cache", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "toy-set" in out and "2 entries" in out
    assert cli_main(["cache", "--dir", str(tmp_path), "--clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert cache_entries(tmp_path) == [] and not list(tmp_path.iterdir())


def test_every_run_records_a_dataset_manifest_in_results_and_mlflow(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from fedpgp_ray import tracking
    from fedpgp_ray.config import config_from_dict
    from fedpgp_ray.run import run_experiment

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FEDPGP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = config_from_dict({
        "seed": 0, "output_dir": str(tmp_path / "run"), "model": {"pretrained": None}, "algorithm": {"n_ctx": 4},
        "data": {"dataset": "world", "shots": 2, "world": {"num_classes": 12, "train_per_class": 4,
                                                           "test_per_class": 3}},
        "train": {"rounds": 1, "local_epochs": 1}, "federation": {"num_clients": 3}})
    results = run_experiment(cfg, progress=False)
    manifest = json.loads((tmp_path / "run" / "results.json").read_text())["dataset_manifest"]
    assert manifest == results["dataset_manifest"]
    assert manifest["dataset"] == "world" and len(manifest["classnames"]) == 12
    assert manifest["base_classes"] == manifest["classnames"][:6] and manifest["novel_classes"] == manifest["classnames"][6:]
    assert manifest["images"] == {"train": 48, "test": 36, "base_test": 18, "novel_test": 18}
    assert sorted(manifest["clients"]) == ["0", "1", "2"]
    assert sum(c["train"] for c in manifest["clients"].values()) == 6 * 2  # 6 base classes x 2 shots
    assert sum(c["local_test"] for c in manifest["clients"].values()) == 18  # disjoint classes
    cache = manifest["feature_cache"]
    assert cache["directory"] == str(tmp_path / "cache")
    assert {"backbone", "weights_sha256", "precision", "transform", "views", "images_sha256"} <= set(cache["key_fields"])
    assert sorted(p.stem for p in (tmp_path / "cache").glob("*.pt")) == sorted(cache["entries"])  # 3 clients + test
    assert len(cache["entries"]) == 4
    saved = json.loads((tmp_path / "run" / tracking.RUN_FILE).read_text())
    client = MlflowClient(saved["tracking_uri"])
    path = client.download_artifacts(saved["run_id"], "dataset_manifest.json", str(tmp_path / "dl"))
    assert json.loads(Path(path).read_text()) == manifest


def test_progress_plain_lines_with_rate_or_nothing(monkeypatch, capsys):
    from fedpgp_ray import progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line at every update
    monkeypatch.setattr(progress, "QUIET_BELOW_S", 0.0)
    monkeypatch.setenv(progress.PROGRESS_ENV, "lines")  # what `fedpgp-ray run --no-progress` sets
    with progress.Progress(10, "encoding toy") as bar:
        bar.update(4)
        bar.update(6)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("encoding toy: 4/10 img in") and lines[-1].startswith("encoding toy: 10/10 img in")
    assert all(line.endswith("img/s)") for line in lines) and len(lines) == 2  # the last one is not repeated
    monkeypatch.setenv(progress.PROGRESS_ENV, "off")
    with progress.Progress(10, "encoding toy") as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""


def test_unwritable_cache_directory_runs_on_from_memory(clip, tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    cache = ImageFeatureCache(clip, blocked / "cache")  # cannot be created under a file
    with caplog.at_level(logging.WARNING, logger="fedpgp_ray.clip.features"):
        feats = cache.features("toy", "test", _split(), np.arange(6))
        cache.features("toy", "test", _split(), np.arange(3))
    assert feats.shape[0] == 6 and cache.encoded_images == 9
    assert sum("kept in memory only" in r.message for r in caplog.records) == 1


def test_failed_entry_write_runs_on_from_memory(clip, tmp_path, caplog):
    # The directory exists and is writable, but the entry's own file cannot be written: a non-empty
    # directory sits at `<key>.pt`, so the rename onto it fails with a real OSError (as a full disk
    # or a read-only mount would; chmod cannot stop root). The run goes on with the features in memory.
    split, idx = _split(), np.arange(6)
    cache = ImageFeatureCache(clip, tmp_path)
    key = cache.key(FeatureRequest("toy", "test", split, idx))
    (tmp_path / f"{key}.pt" / "occupied").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="fedpgp_ray.clip.features"):
        feats = cache.features("toy", "test", split, idx)
        again = cache.features("toy", "test", split, idx)
    assert feats.shape[0] == 6 and torch.equal(again, feats) and cache.encoded_images == 6
    warnings = [r.getMessage() for r in caplog.records if "cannot write to" in r.getMessage()]
    assert len(warnings) == 1 and "kept in memory only" in warnings[0] and "storage" not in warnings[0].lower()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.json"))  # no temp file left behind
    fresh = ImageFeatureCache(clip, tmp_path)  # nothing was cached on disk: a new process encodes again
    assert torch.equal(fresh.features("toy", "test", split, idx), feats) and fresh.encoded_images == 6


def test_read_only_cache_missing_an_entry_encodes_it_in_memory(tmp_path):
    """A shared cache mounted read-only (root ignores file modes: a read-only bind mount in a private
    mount namespace): the entry it lacks is encoded and kept in memory, one warning, no traceback."""
    cache_dir = tmp_path / "cache"
    full = _result(_start(cache_dir))
    entries = sorted(cache_dir.glob("*.pt"))
    entries[0].unlink()
    for lock in cache_dir.glob("*.lock"):
        lock.unlink()
    script = (f"mount --bind {cache_dir} {cache_dir} && mount -o remount,bind,ro {cache_dir} && "
              f"exec {sys.executable} -c '{SCRIPT}' {cache_dir} 0")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "FEDPGP_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "cannot write to" in proc.stderr
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert again["sha"] == full["sha"] and again["encoded"] == full["encoded"]  # its one entry, encoded again
    assert sorted(cache_dir.glob("*.pt")) == entries[1:]  # nothing written to the read-only folder
