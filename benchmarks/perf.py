"""Performance harness: the reference-style loop against our runtimes, in one process, same model/data/seed.

    python benchmarks/perf.py [--config FILE] [--set key=value ...] [--rounds R] [--threads N]
                              [--variants reference,local,ray1,ray2] [--json OUT]
    python benchmarks/perf.py --vitb16 [--classes 50] [--n-ctx 16] [--shots 16] [--steps 3]
    python benchmarks/perf.py --sweep
    python benchmarks/perf.py --profile

Default mode (the offline world; the quickstart config, with random weights if its shipped
checkpoint is missing): builds every variant, then runs rounds 1..R interleaved (round r of
each variant, in an order rotated every round, so load changes on a shared machine hit every
variant alike) and evaluates all clients at round 0 and after round R. Variants:

  reference  benchmarks/reference_loop.py: images re-encoded every step, four full 77-token text
             passes per step, fp32, clients one after another (REFERENCE-STYLE, a baseline only);
  local      our in-process runtime (fedpgp_ray.runtime.local, `--threads` torch threads);
  ray1       our Ray runtime, 1 client actor with `--threads` CPUs and threads;
  ray2       our Ray runtime, 2 client actors with `--threads / 2` CPUs and threads each.

Printed per variant: local steps/s, s/round (training), s per evaluation of all clients, start-up
(cold feature cache: every variant gets its own empty $FEDPGP_CACHE_DIR), peak RSS, final
Local/Base/Novel/HM3/HM2, the largest |sigma - sigma_reference| (the same math gives the same
prompt), and the ratios against the reference-style loop. Peak RSS of in-process variants is
the process's peak during that variant's phases (reset between phases through
/proc/self/clear_refs; the column "+work" subtracts the RSS at the start of the phase, since
all variants stay loaded in this one process); for Ray, each actor's own peak RSS.

--vitb16: the text-encoder-bound step on ViT-B-16 shapes with random weights (speed only):
`--classes` classes, `--n-ctx` context tokens, `--shots`-image batches. Times reference-style steps
(16 images re-encoded + 4 full text passes + backward) against our step (cached image features,
f0 cached, 2 truncated shared-prefix passes + backward), interleaved, plus the text encoder alone
(full 77 tokens / truncated / shared prefix, forward+backward) with the max feature difference.
On CUDA it adds our step under bf16 autocast (model.precision: amp) and CUDA peak memory.

--sweep: how cost grows with classes and batch size (step level, tiny model, ours vs reference)
and with clients (round level, our in-process runtime).

--profile: torch.profiler over our local steps (tiny world model, or ViT-B-16 shapes with
--vitb16): where the remaining time goes.
"""
from __future__ import annotations

import os

# Spinning OpenMP threads collapse on a loaded machine (measured here: 2 threads 25x slower than 1 at a
# load of 12 on 2 cores); passive waiting keeps them usable. It must be set before torch loads, and it
# reaches Ray actors through the environment. An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local Ray instance: no token in ~/.ray

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.reference_loop import FullTextEncoder, ReferenceRun  # noqa: E402
from fedpgp_ray.algorithms import FrozenEncoders, build_algorithm  # noqa: E402
from fedpgp_ray.clip.backbone import CheckpointError, FrozenClip, load_clip, resolve_pretrained  # noqa: E402
from fedpgp_ray.config import AlgorithmConfig, ExperimentConfig, ModelConfig, load_config  # noqa: E402

VARIANTS = ("reference", "local", "ray1", "ray2")


# -- memory -----------------------------------------------------------------------------------------
class PeakMemory:
    """Peak RSS of this process per phase: VmHWM, reset through /proc/self/clear_refs ('5')."""

    def __init__(self) -> None:
        self.resettable = self._reset()

    @staticmethod
    def _status(key: str) -> float:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def begin(self) -> float:
        gc.collect()
        _malloc_trim()  # hand freed heap back to the OS, so the RSS at a phase's start is what is live
        self._reset()
        return self._status("VmRSS")

    def peak(self) -> float:
        """ru_maxrss since the last reset (equal to VmHWM on Linux)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return (f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores, "
                f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    except OSError:
        return "n/a"


# -- variants ---------------------------------------------------------------------------------------
@dataclass
class VariantResult:
    name: str
    label: str
    setup_s: float = 0.0
    fit_s: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    work_mb: float = 0.0
    actor_peaks_mb: list[float] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    sigma_diff: float = float("nan")

    @property
    def steps_per_s(self) -> float:
        return sum(self.steps) / sum(self.fit_s) if self.fit_s else float("nan")

    @property
    def round_s(self) -> float:
        return statistics.mean(self.fit_s) if self.fit_s else float("nan")

    @property
    def eval_mean_s(self) -> float:
        return statistics.mean(self.eval_s) if self.eval_s else float("nan")


class Variant:
    """One way of running the experiment, advanced one round at a time by the harness."""

    def __init__(self, name: str, label: str, cfg: ExperimentConfig, memory: PeakMemory) -> None:
        self.cfg = cfg
        self.memory = memory
        self.result = VariantResult(name, label)

    def _phase(self, fn):
        before = self.memory.begin()
        out = fn()
        peak = self.memory.peak()
        self.result.peak_mb = max(self.result.peak_mb, peak)
        self.result.work_mb = max(self.result.work_mb, peak - before)
        return out

    def setup(self) -> None:
        t = time.perf_counter()
        self._phase(self._setup)
        self.result.setup_s = time.perf_counter() - t

    def fit(self, rnd: int) -> None:
        t = time.perf_counter()
        steps = self._phase(lambda: self._fit(rnd))
        self.result.fit_s.append(time.perf_counter() - t)
        self.result.steps.append(steps)

    def evaluate(self, rnd: int) -> None:
        t = time.perf_counter()
        metrics = self._phase(lambda: self._evaluate(rnd))
        self.result.eval_s.append(time.perf_counter() - t)
        self.result.final = {k: metrics[k] for k in ("local", "base", "novel", "hm3", "hm2") if k in metrics}

    def sigma(self) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ReferenceVariant(Variant):
    def _setup(self) -> None:
        self.run = ReferenceRun(self.cfg, device="cpu")

    def _fit(self, rnd: int) -> int:
        _, stats = self.run.fit_round(rnd)
        return stats.steps

    def _evaluate(self, rnd: int) -> dict[str, float]:
        metrics, _ = self.run.evaluate_all()
        return metrics

    def sigma(self) -> torch.Tensor:
        return self.run.sigma


class RuntimeVariant(Variant):
    """Our runtime (local or Ray) driven like `fedpgp_ray.federation.run_federation`, round by round."""

    def __init__(self, name: str, label: str, cfg: ExperimentConfig, memory: PeakMemory, cache_dir: str) -> None:
        super().__init__(name, label, cfg, memory)
        self.cache_dir = cache_dir

    def _setup(self) -> None:
        from fedpgp_ray.federation import build_strategy
        from fedpgp_ray.runtime import build_runtime
        self.runtime = build_runtime(self.cfg, None, self.cache_dir)
        self.strategy = build_strategy(self.cfg)
        self.server = self.runtime.make_server(self.strategy, None, False)

    def _fit(self, rnd: int) -> int:
        sampled = self.strategy.configure_train(rnd)
        results, failures = self.runtime.fit(rnd, sampled, self.server.global_params())
        self.server.aggregate_train(rnd, results, failures)
        return int(sum(r.metrics.get("steps", 0) for r in results))

    def _evaluate(self, rnd: int) -> dict[str, float]:
        ids = list(range(self.cfg.federation.num_clients))
        results, _ = self.runtime.evaluate(rnd, ids, self.server.global_params())
        return self.server.aggregate_evaluate(rnd, results)

    def sigma(self) -> torch.Tensor:
        return self.server.global_params()["sigma"]

    def close(self) -> None:
        report = getattr(self.runtime, "memory_report", None)
        if report is not None:
            try:
                self.result.actor_peaks_mb = [a["peak_rss_mb"] for a in report()["actors"]]
            except Exception as err:  # memory is a report column, never a reason to fail
                print(f"[perf] memory report of {self.result.name} failed: {err}", file=sys.stderr)
        self.runtime.close()


def bench_config(args: argparse.Namespace) -> tuple[ExperimentConfig, str]:
    """The quickstart (or --config) with the harness's overrides; random weights if the checkpoint is missing."""
    overrides = [*args.set, "tracking.mlflow=false", "runtime.threads_per_worker=0"]
    if args.rounds:
        overrides.append(f"train.rounds={args.rounds}")
    cfg = load_config(args.config, overrides)
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, every=cfg.train.rounds))
    note = f"{args.config or 'quickstart'} ({cfg.model.name} / {cfg.model.pretrained})"
    try:
        resolve_pretrained(cfg.model.name, cfg.model.pretrained)
    except CheckpointError as err:
        # Random weights, written once to a checkpoint file so that every variant, Ray actors included,
        # loads the very same weights (and the feature cache keys them by the file's sha256).
        path = random_weights_file(cfg.model.name, cfg.seed)
        note = (f"{args.config or 'quickstart'} with random {cfg.model.name} weights ({path.name}; "
                f"{str(err).split(':')[0]})")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=str(path)))
    return cfg, note


def random_weights_file(name: str, seed: int) -> Path:
    """A state_dict of a randomly initialised open_clip `name` (seeded), saved under the temp dir."""
    import open_clip
    from fedpgp_ray.clip.backbone import register_project_models
    path = Path(tempfile.gettempdir()) / f"fedpgp-perf-random-{name}-seed{seed}.pt"
    if not path.is_file():
        register_project_models()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return path


def ray_cfg(cfg: ExperimentConfig, actors: int, threads: int) -> ExperimentConfig:
    per_actor = max(threads // actors, 1)
    return dataclasses.replace(cfg, runtime=dataclasses.replace(
        cfg.runtime, kind="ray", num_actors=actors, num_cpus_per_actor=float(per_actor),
        threads_per_worker=per_actor, num_gpus_per_actor=0.0))


def world_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    cfg, note = bench_config(args)
    torch.set_num_threads(args.threads)
    memory = PeakMemory()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    tmp = tempfile.mkdtemp(prefix="fedpgp-perf-")
    owns_ray = False
    if any(n.startswith("ray") for n in names):
        import ray
        if not ray.is_initialized():
            owns_ray = True
            # One local Ray instance for both Ray variants (logical CPUs: both pools placed at once;
            # only one variant computes at a time).
            ray.init(address="local", num_cpus=2 * args.threads, include_dashboard=False,
                     log_to_driver=False)
    variants: list[Variant] = []
    for n in names:
        if n == "reference":
            variants.append(ReferenceVariant(n, "reference-style loop (fp32, sequential)", cfg, memory))
        elif n == "local":
            # kind=local explicitly: the quickstart config says `ray`, which would place a third actor pool
            # and leave the Ray variants without CPUs (PlacementError on a 2-core machine)
            local = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, kind="local"))
            variants.append(RuntimeVariant(n, f"in-process runtime ({args.threads} threads)", local, memory,
                                           os.path.join(tmp, "cache-local")))
        else:
            actors = int(n[3:])
            per = max(args.threads // actors, 1)
            variants.append(RuntimeVariant(n, f"Ray {actors} actor{'s' * (actors > 1)} x {per} thread{'s' * (per > 1)}",
                                           ray_cfg(cfg, actors, args.threads), memory,
                                           os.path.join(tmp, f"cache-{n}")))
    print(f"[perf] config: {note}; {cfg.federation.num_clients} clients, {cfg.train.rounds} rounds x "
          f"{cfg.train.local_epochs} epochs, batch {cfg.train.batch_size}, {cfg.data.shots} shots; "
          f"load {load_average()}", file=sys.stderr, flush=True)
    loads = [os.getloadavg()[0]]
    try:
        for v in variants:
            print(f"[perf] setting up {v.result.label} ...", file=sys.stderr, flush=True)
            v.setup()
        for rnd in range(0, cfg.train.rounds + 1):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                if rnd > 0:
                    v.fit(rnd)
                if rnd in (0, cfg.train.rounds):
                    v.evaluate(rnd)
            loads.append(os.getloadavg()[0])
            print(f"[perf] round {rnd} done: " + ", ".join(
                f"{v.result.name} {v.result.fit_s[-1] if v.result.fit_s else 0:.1f}s" for v in variants)
                + f"; load {loads[-1]:.2f}", file=sys.stderr, flush=True)
        ref = next((v for v in variants if v.result.name == "reference"), None)
        for v in variants:
            if ref is not None:
                v.result.sigma_diff = float((v.sigma().float() - ref.sigma().float()).abs().max())
    finally:
        for v in variants:
            if hasattr(v, "runtime") or hasattr(v, "run"):
                v.close()
        if owns_ray:
            import ray
            ray.shutdown()
    results = [v.result for v in variants]
    print(world_table(results, cfg, note, args, loads))
    return {"mode": "world", "config": note, "threads": args.threads, "load_1min": loads,
            "variants": [dataclasses.asdict(r) | {"steps_per_s": r.steps_per_s, "round_s": r.round_s,
                                                  "eval_s_mean": r.eval_mean_s} for r in results]}


def _fmt(v: float, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def world_table(results: list[VariantResult], cfg: ExperimentConfig, note: str, args, loads) -> str:
    lines = [f"perf (world): {note}", f"  {cfg.federation.num_clients} clients, {cfg.train.rounds} rounds x "
             f"{cfg.train.local_epochs} local epochs, batch {cfg.train.batch_size}, {cfg.data.shots} shots, "
             f"n_ctx {cfg.algorithm.n_ctx}, {args.threads} threads per runtime; variants interleaved per round",
             f"  load average during the run (1 min): {min(loads):.2f} .. {max(loads):.2f}; now {load_average()}", ""]
    head = (f"{'variant':<40}{'steps/s':>9}{'s/round':>9}{'eval s':>8}{'setup s':>9}{'peak MiB':>10}{'+work':>7}"
            f"{'Local':>7}{'Base':>7}{'Novel':>7}{'HM3':>7}{'HM2':>7}{'|dsigma|':>10}")
    lines.append(head)
    for r in results:
        f = r.final
        peak = (f"{sum(r.actor_peaks_mb):.0f}*" if r.actor_peaks_mb else f"{r.peak_mb:.0f}")
        lines.append(f"{r.label:<40}{_fmt(r.steps_per_s):>9}{_fmt(r.round_s):>9}{_fmt(r.eval_mean_s):>8}"
                     f"{_fmt(r.setup_s, '.1f'):>9}{peak:>10}{_fmt(r.work_mb, '.0f'):>7}"
                     + "".join(f"{_fmt(f.get(k)):>7}" for k in ("local", "base", "novel", "hm3", "hm2"))
                     + f"{_fmt(r.sigma_diff, '.1e'):>10}")
    if any(r.actor_peaks_mb for r in results):
        lines.append("  * Ray: sum of the client actors' peak RSS ("
                     + "; ".join(f"{r.name}: " + ", ".join(f"{m:.0f}" for m in r.actor_peaks_mb)
                                 for r in results if r.actor_peaks_mb) + " MiB); the driver is the harness process")
    lines.append("  HM3 = harmonic mean of (Local, Base, Novel); HM2 = harmonic mean of (Base, Novel); "
                 "|dsigma| = max |sigma - sigma_reference| after the last round")
    ref = next((r for r in results if r.name == "reference"), None)
    if ref is not None:
        lines.append("")
        lines.append(f"{'ratios vs reference-style loop':<40}{'steps/s':>9}{'s/round':>9}{'eval':>8}{'dHM3':>8}"
                     f"{'dLocal':>8}{'dBase':>8}{'dNovel':>8}")
        for r in results:
            if r is ref:
                continue
            d = {k: r.final.get(k, float("nan")) - ref.final.get(k, float("nan")) for k in ("hm3", "local", "base", "novel")}
            lines.append(f"{r.label:<40}{_fmt(r.steps_per_s / ref.steps_per_s) + 'x':>9}"
                         f"{_fmt(ref.round_s / r.round_s) + 'x':>9}{_fmt(ref.eval_mean_s / r.eval_mean_s) + 'x':>8}"
                         + "".join(f"{_fmt(d[k], '+.2f'):>8}" for k in ("hm3", "local", "base", "novel")))
    by = {r.name: r for r in results}
    if "local" in by and ("ray1" in by or "ray2" in by):
        lines.append("")
        if "ray1" in by:
            q = by["ray1"].round_s / by["local"].round_s
            lines.append(f"  Ray 1 actor s/round / in-process s/round = {q:.2f} (Ray issue target <= 1.30: "
                         f"{'met' if q <= 1.3 else 'MISSED'})")
        if "ray2" in by:
            q = by["local"].round_s / by["ray2"].round_s
            lines.append(f"  in-process s/round / Ray 2 actors s/round = {q:.2f}x (Ray issue target >= 1.50: "
                         f"{'met' if q >= 1.5 else 'MISSED'})")
    return "\n".join(lines)


# -- ViT-B/16 shapes: step level --------------------------------------------------------------------
def world_classnames(n: int) -> list[str]:
    from fedpgp_ray.data.world import universe
    names = [c.name for c in universe()]
    return [names[(i * 37) % len(names)] for i in range(n)]  # a spread of 1- to 3-word names


def vitb16_clip(device: str, precision: str = "fp32") -> FrozenClip:
    torch.manual_seed(0)
    return load_clip(ModelConfig(name="ViT-B-16", pretrained=None, precision=precision, device="cpu"), device)


@dataclass
class StepBench:
    """A reference-style step and our step on the same model, prompt init, batch and labels."""
    clip: FrozenClip
    classnames: list[str]
    n_ctx: int
    shots: int
    ours_clip: FrozenClip | None = None

    def __post_init__(self) -> None:
        dev = self.clip.device
        size = self.clip.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(self.shots, 3, size, size, generator=g).to(dev)
        self.labels = torch.randint(len(self.classnames), (self.shots,), generator=g).to(dev)
        self.alg = build_algorithm(AlgorithmConfig(n_ctx=self.n_ctx))
        width = self.clip.model.token_embedding.weight.shape[1]
        init = {**self.alg.init_global(width, g), **self.alg.init_personal(width, g)}
        self.ref_params = {k: v.to(dev).clone().requires_grad_(True) for k, v in init.items()}
        self.our_params = {k: v.to(dev).clone().requires_grad_(True) for k, v in init.items()}
        opt = lambda ps: torch.optim.SGD(list(ps.values()), lr=0.002, momentum=0.9, weight_decay=5e-4)
        self.ref_opt, self.our_opt = opt(self.ref_params), opt(self.our_params)
        self.full = FullTextEncoder(self.clip, self.n_ctx, self.classnames)
        self.enc = FrozenEncoders(self.ours_clip or self.clip, self.n_ctx)
        # one-time work of our path: the image-feature cache and f0 (timed apart, as setup)
        t = time.perf_counter()
        self.features = (self.ours_clip or self.clip).encode_images(self.images)
        self.enc.placeholder_features(self.classnames)
        sync(dev)
        self.setup_s = time.perf_counter() - t

    def reference_step(self) -> float:
        p, ac = self.ref_params, self.alg.cfg
        x = self.clip.encode_images(self.images)                   # images re-encoded every step
        UV = p["U"] @ p["V"]
        fp = self.full(self.full.embed(p["sigma"] + UV))
        f0 = self.full(self.full.embedding)
        fs = self.full(self.full.embed(p["sigma"]))
        self.full(self.full.embed(UV))                             # the unused fourth pass
        logits = self.clip.logit_scale * x @ fp.t()
        con = torch.stack([F.cosine_similarity(f0, fs, dim=-1), F.cosine_similarity(fs, fp, dim=-1)], 1) / ac.tau
        loss = F.cross_entropy(logits, self.labels) + ac.mu * F.cross_entropy(
            con, torch.zeros(len(con), dtype=torch.long, device=con.device))
        self.ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.ref_opt.step()
        return float(loss.detach())

    def our_step(self, breakdown: dict[str, float] | None = None) -> float:
        clip = self.enc.clip
        dev = clip.device
        t0 = time.perf_counter()
        with clip.autocast():
            terms = self.alg.loss(self.enc, self.our_params, self.features, self.labels, self.classnames, {})
        sync(dev)
        t1 = time.perf_counter()
        self.our_opt.zero_grad(set_to_none=True)
        terms.total.backward()
        sync(dev)
        t2 = time.perf_counter()
        self.our_opt.step()
        sync(dev)
        t3 = time.perf_counter()
        if breakdown is not None:
            for k, v in (("forward (2 text passes + loss)", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
                breakdown[k] = breakdown.get(k, 0.0) + v
        return float(terms.total.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def text_encoder_comparison(clip: FrozenClip, classnames: list[str], n_ctx: int, reps: int) -> list[dict[str, Any]]:
    """One prompt, forward+backward of the text encoder alone: full 77 tokens / truncated / shared prefix."""
    from fedpgp_ray.clip.backbone import PromptTextEncoder
    dev = clip.device
    enc = PromptTextEncoder(clip, n_ctx)
    prompts = enc.prompts(classnames)
    full = FullTextEncoder(clip, n_ctx, classnames)
    ctx = (torch.randn(n_ctx, enc.width, generator=torch.Generator().manual_seed(1)) * 0.02).to(dev)
    ctx.requires_grad_(True)

    def run(kind: str):
        ctx.grad = None
        if kind == "full 77 tokens":
            f = full(full.embed(ctx))
        else:
            enc.shared_prefix = kind.startswith("shared")
            f = enc.encode(ctx, prompts)
        (f * torch.linspace(-1, 1, f.shape[-1], device=dev)).sum().backward()
        return f.detach(), ctx.grad.detach().clone()

    kinds = ["full 77 tokens", f"truncated at longest EOT ({prompts.length} tokens)",
             f"shared prefix ({1 + n_ctx} once + {len(classnames)} x {prompts.length - 1 - n_ctx})"]
    ref_f, ref_g = run(kinds[0])
    times: dict[str, list[float]] = {k: [] for k in kinds}
    diffs = {}
    for k in kinds:
        f, g = run(k)  # warm-up and equality check
        diffs[k] = (float((f - ref_f).abs().max()), float((g - ref_g).abs().max() / ref_g.abs().max()))
    for _ in range(reps):
        for k in kinds:
            times[k].append(timed(lambda: run(k), dev))
    enc.shared_prefix = True
    base = statistics.median(times[kinds[0]])
    return [{"path": k, "s": statistics.median(times[k]), "speedup": base / statistics.median(times[k]),
             "max_feature_diff": diffs[k][0], "max_rel_grad_diff": diffs[k][1]} for k in kinds]


def vitb16_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"mode": "vitb16", "threads": args.threads, "classes": args.classes, "n_ctx": args.n_ctx,
                           "shots": args.shots, "load_before": load_average()}
    names = world_classnames(args.classes)
    memory = PeakMemory()
    clip = vitb16_clip("cpu")
    lines = [f"perf (ViT-B-16 shapes, random weights, CPU, {args.threads} threads): {args.classes} classes, "
             f"n_ctx {args.n_ctx}, batch {args.shots}; load before: {out['load_before']}"]
    text = text_encoder_comparison(clip, names, args.n_ctx, args.text_reps)
    out["text_encoder"] = text
    lines.append("")
    lines.append(f"text encoder alone, one prompt, forward+backward (median of {args.text_reps}):")
    for row in text:
        lines.append(f"  {row['path']:<44}{row['s']:>8.3f} s{row['speedup']:>7.1f}x   max |f - f_full| "
                     f"{row['max_feature_diff']:.1e}, max rel. |grad - grad_full| {row['max_rel_grad_diff']:.1e}")
    bench = StepBench(clip, names, args.n_ctx, args.shots)
    rows = step_comparison(bench, args.steps, memory, torch.device("cpu"))
    out["steps_cpu"] = rows
    lines += ["", f"one local step (median of {args.steps}, interleaved; our one-time setup: image features + f0 "
                  f"{bench.setup_s:.2f} s):"]
    lines += format_steps(rows)
    lines.append("")
    lines.append("where our step's time goes (CPU): " + ", ".join(
        f"{k} {v:.0%}" for k, v in rows[1]["breakdown_share"].items()))
    out["efficiency"] = efficiency(bench, args.steps, torch.device("cpu"))
    lines += ["", *format_efficiency(out["efficiency"])]
    out["load_after"] = load_average()
    lines.append(f"load after: {out['load_after']}")
    if torch.cuda.is_available():
        lines += ["", *gpu_section(args, names, out)]
    print("\n".join(lines))
    return out


def counted_flops(fn) -> int:
    """FLOPs of one call, counted by torch.utils.flop_counter (matmuls, attention, convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def efficiency(bench: StepBench, steps: int, device: torch.device, reference: bool = True) -> dict[str, Any]:
    """Our step's achieved GFLOP/s (counted) against a same-process fp32 matmul of the text pass's main
    GEMM shape (all tokens of the batched sigma / sigma + U V pass x width -> 4 x width, the MLP's
    first layer), timed back to back so machine load hits both alike."""
    prompts = bench.enc.prompts(bench.classnames)
    n_cls, S, width = prompts.suffix.shape
    rows = 2 * (1 + bench.n_ctx + n_cls * S)
    a = torch.randn(rows, width, device=device)
    w = torch.randn(width, 4 * width, device=device)
    flops = counted_flops(bench.our_step)
    mm_flops = 2 * rows * width * 4 * width
    reps = max(int(flops / mm_flops), 1)  # about as many matmul FLOPs per timing as one step

    def matmuls() -> None:
        for _ in range(reps):
            a @ w
    step_t, mm_t = [], []
    for _ in range(max(steps, 3)):
        step_t.append(timed(bench.our_step, device))
        mm_t.append(timed(matmuls, device))
    step_rate = flops / statistics.median(step_t) / 1e9
    mm_rate = mm_flops * reps / statistics.median(mm_t) / 1e9
    return {"step_gflop": flops / 1e9, "step_s": statistics.median(step_t), "step_gflops": step_rate,
            "matmul_shape": [rows, width, 4 * width], "matmul_gflops": mm_rate, "fraction": step_rate / mm_rate,
            "reference_step_gflop": counted_flops(bench.reference_step) / 1e9 if reference else float("nan")}


def format_efficiency(e: dict[str, Any]) -> list[str]:
    m, k, n = e["matmul_shape"]
    return [f"machine efficiency (FLOPs counted by torch.utils.flop_counter): our step {e['step_gflop']:.1f} GFLOP "
            f"in {e['step_s']:.3f} s = {e['step_gflops']:.0f} GFLOP/s; fp32 matmul [{m} x {k}] @ [{k} x {n}] "
            f"{e['matmul_gflops']:.0f} GFLOP/s; fraction {e['fraction']:.2f} (target >= 0.7). "
            f"Reference-style step: {e['reference_step_gflop']:.1f} GFLOP."]


def step_comparison(bench: StepBench, steps: int, memory: PeakMemory, device: torch.device) -> list[dict[str, Any]]:
    bench.reference_step()
    bench.our_step()  # warm-up (lazy init, allocator)
    ref_t, our_t, ref_peak, our_peak = [], [], 0.0, 0.0
    breakdown: dict[str, float] = {}
    for _ in range(steps):
        before = memory.begin() if device.type == "cpu" else cuda_reset(device)
        ref_t.append(timed(bench.reference_step, device))
        ref_peak = max(ref_peak, peak_of(memory, device, before))
        before = memory.begin() if device.type == "cpu" else cuda_reset(device)
        our_t.append(timed(lambda: bench.our_step(breakdown), device))
        our_peak = max(our_peak, peak_of(memory, device, before))
    total = sum(breakdown.values())
    ref_s, our_s = statistics.median(ref_t), statistics.median(our_t)
    return [{"path": "reference-style step", "s": ref_s, "steps_per_s": 1 / ref_s, "speedup": 1.0,
             "peak_work_mb": ref_peak, "all_s": ref_t},
            {"path": "our step", "s": our_s, "steps_per_s": 1 / our_s, "speedup": ref_s / our_s,
             "peak_work_mb": our_peak, "all_s": our_t, "paired_speedups": [r / o for r, o in zip(ref_t, our_t)],
             "breakdown_share": {k: v / total for k, v in breakdown.items()}}]


def cuda_reset(device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def peak_of(memory: PeakMemory, device: torch.device, before: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - before
    return memory.peak() - before


def format_steps(rows: list[dict[str, Any]], mem_label: str = "peak RSS above phase start") -> list[str]:
    lines = []
    for r in rows:
        paired = r.get("paired_speedups")
        pairs = f" (back-to-back pairs {min(paired):.1f}x .. {max(paired):.1f}x)" if paired else ""
        lines.append(f"  {r['path']:<48}{r['s']:>8.3f} s/step{r['steps_per_s']:>8.2f} steps/s{r['speedup']:>7.1f}x   "
                     f"{mem_label} {r['peak_work_mb']:.0f} MiB{pairs}")
    return lines


def gpu_section(args: argparse.Namespace, names: list[str], out: dict[str, Any], device: str = "cuda",
                make_clip=None) -> list[str]:
    """CUDA: the reference-style step in fp32 against our step in fp32 and under bf16 autocast."""
    dev = torch.device(device)
    clip = (make_clip or vitb16_clip)(device, "fp32")
    amp = FrozenClip(clip.model, clip.tokenizer, clip.preprocess, clip.identity, dev, "amp")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    lines = [f"GPU ({name}), same shapes:"]
    rows = []
    for label, ours in (("our step, fp32", clip), ("our step, bf16 autocast (model.precision: amp)", amp)):
        bench = StepBench(clip, names, args.n_ctx, args.shots, ours_clip=ours)
        r = step_comparison(bench, max(args.steps, 10), PeakMemory(), dev)
        r[1]["path"] = label
        rows += r if not rows else r[1:]
    out["steps_cuda"] = rows
    lines += format_steps(rows, "CUDA peak allocated above phase start")
    return lines


# -- sweep ------------------------------------------------------------------------------------------
def tiny_clip() -> FrozenClip:
    torch.manual_seed(0)
    return load_clip(ModelConfig(name="fedpgp-tiny", pretrained=None, device="cpu"), "cpu")


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    memory = PeakMemory()
    clip = tiny_clip()
    out: dict[str, Any] = {"mode": "sweep", "threads": args.threads, "load_before": load_average(),
                           "classes": [], "batch": [], "clients": []}
    lines = [f"sweep (fedpgp-tiny, random weights, CPU, {args.threads} threads; load {out['load_before']})", "",
             "step time vs classes (batch 8, n_ctx 16):",
             f"  {'classes':>8}{'reference s':>13}{'ours s':>10}{'speedup':>9}"]
    for n_cls in (8, 32, 128):
        rows = step_comparison(StepBench(clip, world_classnames(n_cls), 16, 8), args.steps, memory, clip.device)
        out["classes"].append({"classes": n_cls, "reference_s": rows[0]["s"], "ours_s": rows[1]["s"]})
        lines.append(f"  {n_cls:>8}{rows[0]['s']:>13.4f}{rows[1]['s']:>10.4f}{rows[1]['speedup']:>8.1f}x")
    lines += ["", "step time vs batch size = shots (32 classes, n_ctx 16):",
              f"  {'batch':>8}{'reference s':>13}{'ours s':>10}{'speedup':>9}"]
    for batch in (4, 16, 64):
        rows = step_comparison(StepBench(clip, world_classnames(32), 16, batch), args.steps, memory, clip.device)
        out["batch"].append({"batch": batch, "reference_s": rows[0]["s"], "ours_s": rows[1]["s"]})
        lines.append(f"  {batch:>8}{rows[0]['s']:>13.4f}{rows[1]['s']:>10.4f}{rows[1]['speedup']:>8.1f}x")
    lines += ["", "round and evaluation time vs clients (our in-process runtime, quickstart world, 1 round x "
                  "1 epoch, fraction 1.0):", f"  {'clients':>8}{'steps':>7}{'fit s':>8}{'eval s':>8}"]
    from fedpgp_ray.federation import build_strategy
    from fedpgp_ray.runtime.local import LocalRuntime
    cache = tempfile.mkdtemp(prefix="fedpgp-sweep-")
    base, _ = bench_config(argparse.Namespace(config=args.config, set=args.set, rounds=1))
    for k in (5, 10, 20):
        cfg = dataclasses.replace(base, federation=dataclasses.replace(base.federation, num_clients=k),
                                  train=dataclasses.replace(base.train, local_epochs=1))
        rt = LocalRuntime(cfg, None, cache)
        strategy = build_strategy(cfg)
        server = rt.make_server(strategy, None, False)
        t = time.perf_counter()
        res, fails = rt.fit(1, strategy.configure_train(1), server.global_params())
        fit_s = time.perf_counter() - t
        server.aggregate_train(1, res, fails)
        t = time.perf_counter()
        rt.evaluate(1, list(range(k)), server.global_params())
        eval_s = time.perf_counter() - t
        steps = int(sum(r.metrics["steps"] for r in res))
        out["clients"].append({"clients": k, "steps": steps, "fit_s": fit_s, "eval_s": eval_s})
        lines.append(f"  {k:>8}{steps:>7}{fit_s:>8.2f}{eval_s:>8.2f}")
        rt.close()
    out["load_after"] = load_average()
    lines.append(f"load after: {out['load_after']}")
    print("\n".join(lines))
    return out


# -- profile ----------------------------------------------------------------------------------------
def profile(args: argparse.Namespace) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    torch.set_num_threads(args.threads)
    if args.vitb16:
        clip, names, shots, label = vitb16_clip("cpu"), world_classnames(args.classes), args.shots, "ViT-B-16 shapes"
    else:
        clip, names, shots, label = tiny_clip(), world_classnames(32), 8, "fedpgp-tiny (quickstart shapes)"
    bench = StepBench(clip, names, args.n_ctx, shots)
    for _ in range(2):
        bench.our_step()
    breakdown: dict[str, float] = {}
    n = max(args.steps, 3)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            bench.our_step(breakdown)
    total = sum(breakdown.values())
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    print(f"profile of our local step, {label}, {len(names)} classes, n_ctx {args.n_ctx}, batch {shots}, "
          f"{args.threads} threads, {n} steps (load {load_average()}):")
    print("  " + ", ".join(f"{k} {v / n * 1000:.1f} ms ({v / total:.0%})" for k, v in breakdown.items()))
    print(table)
    return {"mode": "profile", "breakdown_s_per_step": {k: v / n for k, v in breakdown.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: the quickstart)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--rounds", type=int, default=None, help="training rounds (default: the config's)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="torch threads of each runtime (Ray: split over its actors); default all cores")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--vitb16", action="store_true", help="step-level comparison on ViT-B-16 shapes (random weights)")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--shots", type=int, default=16, help="batch size of the --vitb16 step (16-shot batches)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per path (--vitb16, --sweep, --profile)")
    p.add_argument("--text-reps", type=int, default=3, help="repetitions of the text-encoder comparison")
    p.add_argument("--sweep", action="store_true", help="cost vs classes, batch size and clients")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of our local step")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        doc = profile(args)
    elif args.sweep:
        doc = sweep(args)
    elif args.vitb16:
        doc = vitb16_benchmark(args)
    else:
        doc = world_benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
