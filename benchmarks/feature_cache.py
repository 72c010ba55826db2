"""Feature-cache benchmark: is the cache really reused, and shared by actors? (not a timed test)

    python benchmarks/feature_cache.py [--classes 100] [--per-class 20] [--views 8] [--shots 8]
                                       [--clients 10] [--skip-ray] [--keep DIR]

Generates a CoOp-layout tree (DTD layout: `dtd/images/<class>/*.jpg` + split file; per class
half train, a fifth val, the rest test) of `--classes` x `--per-class` JPEG images, then runs the
same experiment (shipped tiny CLIP with random weights, 1 round, CoOp augmentation with
`--views` cached views) three times on one feature-cache directory:

  1. local runtime, empty cache      -> every needed image view is encoded once
  2. local runtime, same config      -> nothing encoded (target 0)
  3. Ray, 2 client actors, after clearing the cache -> each image view encoded once in total

and prints per case: image passes encoded (per actor for Ray), what one pass of the experiment
needs, cache entries and size, seconds until the runtime is ready (dataset, partition, features)
and until the first training round has finished. It also times reading every entry of the cache
back (`torch.load`) against the checksum verified on each read (sha256 of the tensor).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_tree(root: Path, classes: int, per_class: int) -> None:
    """DTD's CoOp layout with procedurally coloured 96x96 JPEGs."""
    rng = np.random.default_rng(0)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    n_train, n_val = per_class // 2, per_class // 5
    for c in range(classes):
        name = f"class_{c:03d}"
        folder = root / "dtd" / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            noise = rng.integers(-60, 60, (96, 96, 3))
            Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=85)
            key = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            split[key].append([f"{name}/{i:03d}.jpg", c, name])
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))


def run_case(label: str, cfg, cache_dir: Path) -> dict:
    from fedpgp_ray.clip.features import cache_entries
    from fedpgp_ray.federation import run_federation
    from fedpgp_ray.runtime import build_runtime

    began = time.perf_counter()
    first_round: list[float] = []

    class FirstRound:
        def on_round(self, report, global_params) -> None:
            if report.round == 1 and not first_round:
                first_round.append(time.perf_counter() - began)

    with build_runtime(cfg, None, str(cache_dir)) as runtime:
        ready = time.perf_counter() - began
        if hasattr(runtime, "worker"):
            encoded = [runtime.worker.encoded_images]
        else:
            encoded = [info["encoded_images"] for info in runtime.actor_info]
        manifest = runtime.dataset_manifest()
        run_federation(cfg, runtime, None, [FirstRound()])
    entries = cache_entries(cache_dir)
    return {"case": label, "encoded": encoded, "ready_s": ready, "first_round_s": first_round[0],
            "entries": len(entries), "cache_mib": sum(e["bytes"] for e in entries) / 2**20, "manifest": manifest}


def read_cost(cache_dir: Path) -> dict:
    """Seconds to load every cache entry, and to verify their checksums on top (what each read costs)."""
    import torch

    from fedpgp_ray.clip.features import tensor_sha256

    load_s = verify_s = 0.0
    paths = sorted(cache_dir.glob("*.pt"))
    for path in paths:
        tick = time.perf_counter()
        entry = torch.load(path, weights_only=True, map_location="cpu")
        load_s += time.perf_counter() - tick
        tick = time.perf_counter()
        assert tensor_sha256(entry["value"]) == entry["sha256"], path
        verify_s += time.perf_counter() - tick
    return {"entries": len(paths), "mib": sum(p.stat().st_size for p in paths) / 2**20,
            "load_s": load_s, "verify_s": verify_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--skip-ray", action="store_true", help="only the two local cases")
    parser.add_argument("--keep", help="build the tree and cache here and keep them (default: a temp dir)")
    args = parser.parse_args(argv)

    if not os.environ.get("RAY_ADDRESS"):  # a new local Ray instance: token auth from the environment, so
        os.environ.setdefault("RAY_AUTH_TOKEN", os.urandom(16).hex())  # nothing is written to ~/.ray
    from fedpgp_ray.clip.features import clear_cache
    from fedpgp_ray.config import config_from_dict

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedpgp-cache-bench-"))
    try:
        tick = time.perf_counter()
        make_tree(work / "data", args.classes, args.per_class)
        print(f"tree: {args.classes} classes x {args.per_class} images under {work / 'data'} "
              f"({time.perf_counter() - tick:.1f} s)")
        cache_dir = work / "cache"
        base = {"seed": 0, "output_dir": str(work / "run"), "model": {"pretrained": None},
                "algorithm": {"n_ctx": 4},
                "data": {"dataset": "dtd", "root": str(work / "data"), "shots": args.shots,
                         "augment_views": args.views},
                "train": {"rounds": 1, "local_epochs": 1, "batch_size": args.shots},
                "federation": {"num_clients": args.clients}, "tracking": {"mlflow": False}}
        local = config_from_dict({**base, "runtime": {"kind": "local"}})
        ray2 = config_from_dict({**base, "runtime": {"kind": "ray", "num_actors": 2, "num_cpus_per_actor": 1}})
        clear_cache(cache_dir)
        cases = [run_case("local, empty cache", local, cache_dir), run_case("local, same config again", local, cache_dir)]
        reads = read_cost(cache_dir)
        if not args.skip_ray:
            clear_cache(cache_dir)
            cases.append(run_case("ray 2 actors, cache cleared", ray2, cache_dir))
        m = cases[0]["manifest"]
        train = sum(c["train"] for c in m["clients"].values())
        need = train * max(args.views, 1) + m["images"]["test"]
        print(f"one pass needs {need} image encodings: {train} training images x {max(args.views, 1)} views "
              f"+ {m['images']['test']} test images")
        print(f"{'case':<30}{'encoded':>16}{'entries':>9}{'MiB':>8}{'ready s':>9}{'1st round s':>13}")
        for c in cases:
            enc = "+".join(str(e) for e in c["encoded"]) if len(c["encoded"]) > 1 else str(c["encoded"][0])
            print(f"{c['case']:<30}{enc:>16}{c['entries']:>9}{c['cache_mib']:>8.2f}{c['ready_s']:>9.1f}"
                  f"{c['first_round_s']:>13.1f}")
        print("cache key fields:", ", ".join(m["feature_cache"]["key_fields"]))
        print(f"reading the {reads['entries']} entries back ({reads['mib']:.2f} MiB): load {reads['load_s'] * 1e3:.1f} ms, "
              f"checksum verification {reads['verify_s'] * 1e3:.1f} ms on top "
              f"(+{100 * reads['verify_s'] / max(reads['load_s'], 1e-9):.0f}%; "
              f"{reads['verify_s'] * 1e3 / max(reads['mib'], 1e-9):.2f} ms per MiB)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
