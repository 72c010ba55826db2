"""`fedpgp-ray cache [--dir DIR] [--clear]`: list the node's feature-cache entries with their sizes, or delete them.

The cache lives in $FEDPGP_CACHE_DIR, else ~/.cache/fedpgp-ray/features (docs/PERFORMANCE.md,
"Feature cache"). Deleting it is always safe: entries are rebuilt on the next run.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpgp-ray cache",
                                     description="List or clear the image-feature cache of this node.")
    parser.add_argument("--dir", help="cache directory (default: $FEDPGP_CACHE_DIR, else "
                                      "~/.cache/fedpgp-ray/features)")
    parser.add_argument("--clear", action="store_true", help="delete every entry")
    args = parser.parse_args(argv)
    from fedpgp_ray.clip.features import cache_entries, clear_cache, default_cache_dir

    directory = Path(args.dir).expanduser() if args.dir else default_cache_dir()
    if args.clear:
        entries, size = clear_cache(directory)
        print(f"removed {entries} entries ({size / 2**20:.1f} MiB) from {directory}")
        return 0
    rows = cache_entries(directory)
    print(f"feature cache: {directory}")
    if rows:
        print(f"{'key':<14}{'MiB':>9}  {'dataset':<28}{'split':<16}{'kind':<14}{'images':>7}{'views':>6}  precision")
    for r in rows:
        print(f"{r['key'][:12]:<14}{r['bytes'] / 2**20:>9.2f}  {str(r['dataset'])[:27]:<28}{str(r['split'])[:15]:<16}"
              f"{r['kind']:<14}{str(r['images']):>7}{str(r['views']):>6}  {r['precision']}")
    total = sum(r["bytes"] for r in rows)
    print(f"{len(rows)} entries, {total / 2**20:.1f} MiB")
    return 0
