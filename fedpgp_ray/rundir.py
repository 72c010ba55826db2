"""A run directory (`output_dir`) belongs to one run.

Opening a run directory, before any work:

1. it must be writable (a probe file is written and removed), else `RunDirError`;
2. a lock file (`filelock`, held for the whole run) makes a second run into the same directory
   refuse at once (local and shared paths; object stores have no lock: see `RunDir._lock`);
3. a new run into a directory that holds another run (its `run.json` names a run id) refuses, unless
   `overwrite` (the old run's files, `RUN_FILES` and `RUN_FOLDERS`, are removed; other files stay) or
   `resume`; files a run writes (config.yaml, results.json, ...) present WITHOUT a run record are the
   user's, so a new run refuses there even with `overwrite`;
4. a resume request is compared with the saved config: keys that change state shapes or
   semantics are refused in one line listing every difference; the keys in `RESUME_SAFE` may
   change (logged); keys the saved config.yaml lacks (an earlier version wrote it, whose defaults
   may differ) are refused too;
5. only then are `config.yaml` and `run.json` (the run id) written.

So a refused request leaves the directory exactly as it was. The directory may be a path or a
URI: files go through the run storage (`fedpgp_ray.storage.RunStorage`).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import yaml
from filelock import FileLock, Timeout

from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.config import (ConfigError, ExperimentConfig, config_from_dict, config_to_dict, flatten,
                               read_config_text)
from fedpgp_ray.storage import RunStorage, StorageError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RECORD_FILE = "run.json"        # {"run_id", "created", "algorithm"}: who owns the directory
LOCK_FILE = ".fedpgp-run.lock"  # held (flock) by the process running in the directory
# Everything a run writes in its directory (run.py, plots.py, tracking.py's run file, compare.py's
# backbone record): `--overwrite` removes these and nothing else, since output_dir may be a folder that
# holds other things (even `.`). The default MLflow store (mlflow.db) lives in the parent folder.
RUN_FILES = (RECORD_FILE, CONFIG_FILE, "results.json", "results.csv", "results.md", "rounds.csv", "accuracy.png",
             "hm3_wall_time.png", "clients.png", "mlflow_run.json", "backbone.json")
RUN_FOLDERS = ("checkpoints",)
# Defaults that changed: what runs made before the key existed did (a hint when resuming such a run).
EARLIER_BEHAVIOUR = {"data.partition_seed": None, "data.local_test": "classes", "data.few_shot_pool": "train+val"}
# Keys a resume may change: how far and how the run goes on, not what it computes. Every other key
# (seed, model, data, partition, algorithm and its shapes, training and federation settings) would
# mix two experiments in one run, or not fit the saved state.
RESUME_SAFE = ("train.rounds", "evaluation.", "tracking.", "runtime.", "output_dir", "federation.allow_dropped_clients")


class RunDirError(ConfigError):
    """The run directory cannot be used for this request (not writable, busy, another run's)."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file via temp file + rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and prove a file can be written there (RunDirError otherwise)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirError(f"output_dir {directory} is not writable ({err.strerror or err}): choose a writable "
                          f"directory with --set output_dir=/path or fix its permissions") from None


def check_storage_writable(storage: RunStorage) -> None:
    """check_writable for any run storage: a local directory, or a probe object written and deleted."""
    local = storage.local_path()
    if local is not None:
        return check_writable(local)
    probe = f".write-probe-{uuid.uuid4().hex[:12]}"
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except StorageError as err:
        raise RunDirError(f"output_dir {storage.display()} is not writable ({err})") from None


def resume_differences(saved: ExperimentConfig, requested: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(refused, allowed): `key: old -> new` for every key whose value differs."""
    old, new = flatten(config_to_dict(saved)), flatten(config_to_dict(requested))
    refused, allowed = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            (allowed if key.startswith(RESUME_SAFE) else refused).append(line)
    return refused, allowed


def missing_keys(saved_raw: dict[str, Any], requested: ExperimentConfig) -> list[str]:
    """`key: <missing> -> new` for every key outside RESUME_SAFE that the saved config.yaml lacks: it was
    written by an earlier version, and the current default may not be what that version did."""
    present = flatten(saved_raw)
    lines = []
    for key, value in sorted(flatten(config_to_dict(requested)).items()):
        if key not in present and not key.startswith(RESUME_SAFE):
            earlier = f" (earlier versions: {EARLIER_BEHAVIOUR[key]!r})" if key in EARLIER_BEHAVIOUR else ""
            lines.append(f"{key}: <missing> -> {value!r}{earlier}")
    return lines


def read_saved_config(storage: RunStorage) -> dict[str, Any]:
    """The mapping in a run's config.yaml (read strictly, `config.read_config_text`), or RunDirError
    (one line) if it is missing, unreadable or not a config mapping (a hand edit gone wrong)."""
    directory = storage.display()
    if not storage.exists(CONFIG_FILE):
        raise RunDirError(f"{directory}: no {CONFIG_FILE} there; pass the output_dir of an earlier run")
    try:
        data = read_config_text(storage.read_text(CONFIG_FILE), "it")
        if not data:
            raise ConfigError("it is empty")
    except UnicodeDecodeError as err:
        problem = f"it is not UTF-8 text: byte {err.start} cannot be decoded"
    except ConfigError as err:
        problem = str(err).removeprefix("it: ")
    else:
        return data
    raise RunDirError(f"the saved {storage.display(CONFIG_FILE)} cannot be read ({problem}): restore it, or start "
                      f"a new run in another output_dir")


def holds_run(storage: RunStorage) -> bool:
    """Only a run record (run.json with a run id) makes a directory a run: a config.yaml or results.json
    alone may be the user's own file (output_dir: . in a project folder)."""
    return bool(read_record(storage).get("run_id"))


def unclaimed_run_files(storage: RunStorage) -> list[str]:
    """Names a run writes that are present without a run record: not ours to overwrite or delete."""
    return [name for name in (*RUN_FILES, *RUN_FOLDERS) if name != RECORD_FILE and storage.exists(name)]


def read_record(storage: RunStorage) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(RECORD_FILE))
    except (OSError, ValueError, StorageError):
        return {}


class RunDir:
    """The run directory of one run, locked while open (`with RunDir.open(...) as rundir:`).

    run_id: this run's id (a resume keeps the saved one). changed: the safe keys a resume changed.
    """

    def __init__(self, storage: RunStorage, lock: FileLock | None, run_id: str, changed: list[str]) -> None:
        self.storage = storage
        self.lock = lock
        self.run_id = run_id
        self.changed = changed

    @classmethod
    def open(cls, cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False,
             preflight: Callable[[ExperimentConfig], None] | None = None) -> "RunDir":
        """Check, lock and claim cfg.output_dir for this run; RunDirError/ConfigError (one line) if not.

        preflight: the request's own checks (model, data, device), run before the directory is touched,
        so a refused request never deletes (--overwrite) or claims anything.
        """
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite exclude each other: resume continues the run, "
                              "overwrite deletes it")
        if preflight is not None:
            preflight(cfg)
        storage = RunStorage(cfg.output_dir)
        check_storage_writable(storage)
        lock = cls._lock(storage)
        try:
            run_id, changed = cls._claim(storage, cfg, resume, overwrite)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(storage, lock, run_id, changed)

    @staticmethod
    def _lock(storage: RunStorage) -> FileLock | None:
        """An exclusive lock on the directory, or RunDirError at once (no waiting).

        flock-based: released by the kernel when the process dies, so a crashed run never leaves a
        stale lock. On network filesystems it holds where the filesystem supports flock (NFSv4 and
        most cluster filesystems do). Object stores (s3://, gs://) have no lock: None, logged.
        """
        directory = storage.local_path()
        if directory is None:
            log.info("run storage %s is an object store: nothing stops a second run writing into it at once",
                     storage.display())
            return None
        lock = FileLock(str(directory / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunDirError(f"another run is writing into {directory} (it holds {LOCK_FILE}): wait for it to "
                              f"finish, or choose another output_dir") from None
        return lock

    @staticmethod
    def _claim(storage: RunStorage, cfg: ExperimentConfig, resume: bool, overwrite: bool) -> tuple[str, list[str]]:
        record = read_record(storage)
        directory = storage.display()
        changed: list[str] = []
        if resume:
            saved_raw = read_saved_config(storage)
            try:
                saved = config_from_dict(saved_raw, [f"output_dir={cfg.output_dir}"])
            except ConfigError as err:
                raise RunDirError(f"--resume {directory}: the saved {CONFIG_FILE} cannot be read "
                                  f"({str(err).splitlines()[0]}): the run cannot be resumed") from None
            missing = missing_keys(saved_raw, cfg)
            refused, changed = resume_differences(saved, cfg)
            absent = {line.split(":")[0] for line in missing}  # reported once, as missing
            refused = [line for line in refused if line.split(":")[0] not in absent]
            problems = []
            if refused:
                problems.append(f"cannot change {'; '.join(refused)} (the saved run used the old values: resume "
                                f"without those changes)")
            if missing:
                problems.append(f"finds no {'; '.join(missing)} in its {CONFIG_FILE} (written by an earlier "
                                f"version whose defaults may differ: add these keys to "
                                f"{storage.display(CONFIG_FILE)} with the values that run used)")
            done = CheckpointStore(storage.child("checkpoints")).completed_round()
            if cfg.train.rounds < done:  # a resume continues a run; relabelling 8 done rounds as 3 would lie
                problems.append(f"asks for train.rounds={cfg.train.rounds}, fewer than the {done} rounds the run "
                                f"has done (a resume never truncates a run: ask for train.rounds >= {done})")
            if problems:
                raise RunDirError(f"--resume {directory} {', and '.join(problems)}; or start a new run in "
                                  f"another output_dir")
            for line in changed:
                log.warning("resume of %s changes %s", directory, line)
            run_id = record.get("run_id") or uuid.uuid4().hex
        else:
            if holds_run(storage):
                if not overwrite:
                    who = f"run {record['run_id']}" if record.get("run_id") else "an earlier run"
                    raise RunDirError(f"output_dir {directory} holds {who}: continue it with --resume {directory}, "
                                      f"replace it with --overwrite, or choose another output_dir")
                clear(storage)
                log.warning("--overwrite: removed the earlier run in %s", storage.display())
            elif unclaimed := unclaimed_run_files(storage):
                raise RunDirError(f"output_dir {directory} holds {', '.join(unclaimed)} but no run record "
                                  f"({RECORD_FILE} with a run id), so they are not a fedpgp-ray run's files and a "
                                  f"run would overwrite them: choose another output_dir, or move them away")
            run_id = uuid.uuid4().hex
        # Validated: from here on the directory is this run's.
        storage.write_text(CONFIG_FILE, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        if record.get("run_id") != run_id:
            storage.write_text(RECORD_FILE, json.dumps(
                {"run_id": run_id, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "algorithm": cfg.algorithm.name}, indent=2) + "\n")
        return run_id, changed

    def release_if_unstarted(self) -> None:
        """Undo the claim of a new run that failed before its first checkpoint (round 0): remove what it
        wrote (config.yaml, run.json, ...), so the corrected retry is not refused as 'holds run'."""
        if CheckpointStore(self.storage.child("checkpoints")).completed_round() < 0:
            clear(self.storage)
            log.info("the run failed before its first checkpoint: removed its claim on %s", self.storage.display())

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def clear(storage: RunStorage) -> None:
    """Remove a run's files (RUN_FILES, RUN_FOLDERS) and nothing else (`--overwrite`, a failed start)."""
    local = storage.local_path()
    for name in RUN_FOLDERS:
        if local is None:
            _delete_tree(storage, name)
            storage.delete(name)
        elif (local / name).is_dir() and not (local / name).is_symlink():
            shutil.rmtree(local / name)
        elif (local / name).is_symlink() or (local / name).exists():
            (local / name).unlink()
    for name in RUN_FILES:
        storage.delete(name)


def _delete_tree(storage: RunStorage, prefix: str) -> None:
    """Delete every object under `prefix` of an object store (a name with entries below is a prefix)."""
    try:
        names = storage.list(prefix)
    except StorageError:  # a file, not a prefix
        return
    for name in names:
        rel = f"{prefix}/{name}" if prefix else name
        _delete_tree(storage, rel)
        storage.delete(rel)
