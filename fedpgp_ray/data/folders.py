"""Shared helpers of the file-based datasets (CoOp layouts, domain folders).

- `data_root`, `layout_error`: one-line errors that name the path and the expected layout.
- `list_images`, `class_folder_images`: sorted folder scans (never set or directory order).
- `read_split_file`: CoOp's `split_zhou_*.json` ({"train"|"val"|"test": [[relpath, label, classname]]}).
- `clean_classname`: CoOp's class-name cleaning (renames, underscores to spaces).
- `verify_images`: every image is opened and verified once at build time; bad ones raise
  `DataError` (path + fix) or, with `data.skip_bad_images`, are dropped and logged.
- `dataset_identity`: the dataset name used in feature-cache keys.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from fedpgp_ray.config import DataConfig
from fedpgp_ray.data.base import DataError
from fedpgp_ray.progress import Progress

log = logging.getLogger(__name__)

DOCS = "docs/DATASETS.md"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
CACHE_ENV = "FEDPGP_IMAGE_CHECK_DIR"
CHECK_VERSION = 2  # in the record key: records of an older, weaker check (2 = full decode) are not trusted
SplitEntry = tuple[str, int, str]


def layout_error(problem: str, expected: str) -> DataError:
    """`problem` (naming the path) plus the expected layout and where it is documented."""
    return DataError(f"{problem}; expected layout: {expected} (see {DOCS})")


def data_root(cfg: DataConfig, dataset: str, expected: str) -> Path:
    """`data.root` as an existing absolute folder, or a DataError naming it."""
    if cfg.root is None:
        raise DataError(f"{dataset}: data.root is not set: point it at the folder that holds the data "
                        f"(expected layout: {expected}; see {DOCS})")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise layout_error(f"{dataset}: data root not found: {root.absolute()}", expected)
    return root.absolute()


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (by extension, hidden files skipped), sorted by name."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if _is_image_name(e.name) and e.is_file()]
    return [folder / n for n in sorted(names)]


def list_subfolders(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of `folder`, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def class_folder_images(folder: Path, dataset: str, expected: str, what: str = "class") -> list[Path]:
    """The images of one class folder; a missing or empty folder is a DataError naming it."""
    if not folder.is_dir():
        raise layout_error(f"{dataset}: {what} folder not found: {folder}", expected)
    images = list_images(folder)
    if not images:
        raise layout_error(f"{dataset}: empty class folder {folder} (no image files with extension "
                           f"{', '.join(sorted(IMAGE_EXTENSIONS))})", expected)
    return images


def clean_classname(name: str, renames: dict[str, str] | None = None) -> str:
    """CoOp's cleaning: apply the dataset's renames, then underscores -> spaces, single spaces."""
    if renames:
        name = renames.get(name, name)
    return " ".join(name.replace("_", " ").split())


def read_split_file(path: Path, dataset: str, expected: str) -> dict[str, list[SplitEntry]]:
    """Read a CoOp split file: {"train": [...], "val": [...], "test": [...]} of [relpath, label, classname].

    "val" may be absent (treated as empty). Every malformed piece is a DataError naming the file.
    """
    if not path.is_file():
        raise layout_error(f"{dataset}: split file not found: {path}", expected)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{dataset}: split file {path} is not readable JSON ({err}): replace it with "
                        f"CoOp's original file (see {DOCS})") from None
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise DataError(f"{dataset}: split file {path} must be a JSON object with keys 'train', 'val' and "
                        f"'test' (CoOp's format), got {type(data).__name__} with keys "
                        f"{sorted(data) if isinstance(data, dict) else '-'}")
    out: dict[str, list[SplitEntry]] = {}
    for key in ("train", "val", "test"):
        rows = data.get(key, [])
        if not isinstance(rows, list):
            raise DataError(f"{dataset}: split file {path}: '{key}' must be a list of "
                            f"[relative_path, label, classname], got {type(rows).__name__}")
        entries = []
        for i, row in enumerate(rows):
            ok = (isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[0], str)
                  and isinstance(row[1], int) and not isinstance(row[1], bool) and isinstance(row[2], str))
            if not ok:
                raise DataError(f"{dataset}: split file {path}: entry {i} of '{key}' is {row!r}, expected "
                                f"[relative_path, label, classname]")
            entries.append((row[0], row[1], row[2]))
        out[key] = entries
    if not out["train"] and not out["val"] or not out["test"]:
        raise DataError(f"{dataset}: split file {path} has no training or no test entries")
    return out


# -- image check ---------------------------------------------------------------------------------------

def image_check_dir() -> Path:
    """Records of passed image checks: $FEDPGP_IMAGE_CHECK_DIR, else ~/.cache/fedpgp-ray/image-checks."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fedpgp-ray" / "image-checks"


def check_image(path: str) -> str | None:
    """None if the image is readable, else the reason.

    PIL's verify() checks the header (and every chunk CRC of a PNG); the image is then decoded
    in full, which catches truncated files and data that does not decode behind an intact header
    (e.g. a broken PNG data stream with valid CRCs). A JPEG whose scan data libjpeg tolerates
    (it fills the gap with grey and only warns) decodes, and passes.
    """
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:  # verify() leaves the image unusable: open again to decode
            img.load()
    except FileNotFoundError:
        return "file not found"
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(err).__name__}: {err}"
    return None


def _stat_record(paths: Sequence[str]) -> tuple[list[tuple[str, int, int]], list[str]]:
    stats, missing = [], []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            missing.append(p)
            continue
        stats.append((p, st.st_size, st.st_mtime_ns))
    return stats, missing


def verify_images(paths: Sequence[str], *, skip_bad: bool, dataset: str) -> np.ndarray:
    """Open and verify every image once; returns a keep mask over `paths`.

    A passing check is recorded in `image_check_dir()`, keyed by (path, size, mtime) of
    every file, so an unchanged dataset is not re-read by later runs or other workers. Bad or
    missing files raise a DataError listing them, unless `skip_bad` (data.skip_bad_images), in
    which case they are dropped and logged (count and paths) at WARNING level.
    """
    stats, missing = _stat_record(paths)
    digest = hashlib.sha256(json.dumps([CHECK_VERSION, stats]).encode()).hexdigest()
    marker = image_check_dir() / f"{digest}.ok"
    if not missing and marker.is_file():
        return np.ones(len(paths), dtype=bool)
    bad: dict[str, str] = {p: "file not found" for p in missing}
    existing = [s[0] for s in stats]
    workers = min(16, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, Progress(len(existing), f"verifying {dataset} images") as bar:
        for p, reason in zip(existing, pool.map(check_image, existing, chunksize=64)):
            bar.update(1)
            if reason is not None:
                bad[p] = reason
    if not bad:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{dataset} {len(paths)} images ok\n")
        except OSError:
            pass  # a read-only cache only costs a re-check next time
        return np.ones(len(paths), dtype=bool)
    listed = sorted(bad)
    if not skip_bad:
        shown = "; ".join(f"{p} ({bad[p]})" for p in listed[:5])
        more = f"; and {len(listed) - 5} more" if len(listed) > 5 else ""
        raise DataError(f"{dataset}: {len(listed)} unreadable, truncated or missing image(s): {shown}{more}. "
                        f"Replace or delete these files, or set data.skip_bad_images: true to drop them")
    log.warning("%s: skipped %d bad image(s) (data.skip_bad_images: true):\n%s", dataset, len(listed),
                "\n".join(f"  {p}: {bad[p]}" for p in listed))
    return np.array([p not in bad for p in paths], dtype=bool)


def dataset_identity(prefix: str, classnames: Sequence[str], splits: Iterable[tuple[Sequence[str], np.ndarray]],
                     extra: str = "") -> str:
    """`prefix-<hash>` over class names, every (path, size, mtime, label) and `extra`: changes with the data."""
    h = hashlib.sha256(json.dumps([prefix, list(classnames), extra]).encode())
    for paths, labels in splits:
        stats, missing = _stat_record(list(paths))
        h.update(json.dumps([stats, missing, np.asarray(labels).tolist()]).encode())
    return f"{prefix}-{h.hexdigest()[:16]}"
