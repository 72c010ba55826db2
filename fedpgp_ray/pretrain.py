"""`fedpgp-ray pretrain`: pretrain the project's tiny CLIP (`fedpgp-tiny`) on the procedural world.

    fedpgp-ray pretrain [--seed 0] [--steps 2500] [--out fedpgp-world.pt] [--force]

The work lives in `fedpgp_ray.clip.pretraining` (imported after argument parsing, so `--help`
is instant). The default output is a file in the working directory; writing over the checkpoint
shipped inside the package (fedpgp_ray/clip/weights/) needs `--force`, and then registers the
new file and its sha256 in shipped.json as `fedpgp-tiny/fedpgp-world`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

DEFAULT_OUT = Path("fedpgp-world.pt")
SHIPPED_DIR = Path(__file__).resolve().parent / "clip" / "weights"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpgp-ray pretrain",
                                     description="Pretrain the tiny CLIP (fedpgp-tiny) contrastively on captioned "
                                                 "images of the procedural world, save it as fp16 and report its "
                                                 "zero-shot accuracy per style.")
    parser.add_argument("--seed", type=int, default=0, help="random seed of weights and batches (default: 0)")
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps (default: 2500, the shipped run)")
    parser.add_argument("--batch-size", type=int, default=128, help="image-caption pairs per step (default: 128)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"checkpoint file to write (default: ./{DEFAULT_OUT}); use it with "
                             f"--set model.pretrained=PATH")
    parser.add_argument("--force", action="store_true",
                        help="allow --out inside the package's weights folder: replaces the shipped "
                             "checkpoint and re-registers it in shipped.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.resolve().parent == SHIPPED_DIR and not args.force:
        print(f"error: --out {args.out} is inside the installed package's weights folder and would replace "
              f"the shipped checkpoint: write elsewhere (e.g. --out fedpgp-world.pt) or add --force",
              file=sys.stderr)
        return 2
    if args.out.is_dir():
        print(f"error: --out {args.out} is a directory: pass a file path, e.g. {args.out / DEFAULT_OUT.name}",
              file=sys.stderr)
        return 2
    from fedpgp_ray.clip.backbone import SHIPPED_WEIGHTS_FILE, load_clip, sha256_of
    from fedpgp_ray.clip.pretraining import (EVAL_CLASSES, MODEL_NAME, TAG, ZERO_SHOT_TEMPLATE, pretrain,
                                             register_shipped, save_fp16, zero_shot_report)
    from fedpgp_ray.config import ModelConfig

    start, cpu_start = time.perf_counter(), time.process_time()
    model = pretrain(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, threads=args.threads)
    train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    n_params = sum(p.numel() for p in model.parameters())
    size = save_fp16(model, args.out)
    digest = register_shipped(args.out)
    print(f"saved {args.out} ({size} bytes, fp16, {n_params} parameters) after {train_s:.0f} s of training "
          f"({train_cpu:.0f} CPU-seconds on {args.threads} threads)")
    if digest:
        print(f"registered {MODEL_NAME}/{TAG} in {SHIPPED_WEIGHTS_FILE} (sha256 {digest})")
        clip = load_clip(ModelConfig(name=MODEL_NAME, pretrained=TAG, device="cpu"))
    else:
        print(f"use it with --set model.pretrained={args.out.resolve()} (sha256 {sha256_of(args.out)})")
        clip = load_clip(ModelConfig(name=MODEL_NAME, pretrained=str(args.out), device="cpu"))
    report = zero_shot_report(clip)
    print(f"zero-shot accuracy, '{ZERO_SHOT_TEMPLATE}', {EVAL_CLASSES} classes, 20 test images per class:")
    for key, acc in report.items():
        print(f"  {key:<11} {100 * acc:5.1f}%")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
