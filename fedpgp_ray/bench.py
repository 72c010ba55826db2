"""`fedpgp-ray bench`: how fast a federated round runs in-process and on Ray actors.

    fedpgp-ray bench [--config FILE] [--set key=value ...] [--rounds 4] [--threads 2]
                     [--sections rounds,overhead] [--variants local,ray1,ray2] [--address ADDR] [--json OUT]
    fedpgp-ray bench --sections scale [--scale-clients 1000 --scale-fraction 0.05]

Sections (each a function `section_<name>(ctx) -> dict`, registered in SECTIONS):

  rounds    seconds per round of the quickstart world for each variant (VARIANTS; default: the
            in-process runtime with --threads torch threads, Ray with 1 actor x --threads threads,
            Ray with 2 actors x --threads/2 threads: the same total thread count everywhere).
            All variants are built first, then round r of every variant runs before round r+1 of
            any, in an order rotated every round, so load changes on a shared machine hit every
            variant alike. s/round is the training part of a round (client fits, aggregation,
            checkpoint), averaged over rounds 1..R; evaluating all clients is timed apart, and so
            is start-up (Ray, actors, CLIP, features). "CPU s/round" sums the CPU time of the
            runtime's processes (driver, actors) over a round; "idle-bound s" is the least wall time
            that CPU use allows on an idle machine with --threads cores (no process faster than its
            threads allow; assumes perfect multi-thread scaling, so it flatters multi-threaded
            variants). On a shared machine prefer OMP_WAIT_POLICY=PASSIVE: OpenMP threads that
            spin-wait make multi-threaded torch many times slower when other jobs hold the cores.
  overhead  Ray's per-client-task overhead: no-op task round trips on a client actor (passing the
            global params by reference, as a real task does), sequential and pipelined; plus the
            overhead inside the real 1-actor rounds (fit wall time minus in-actor compute, per task).
  scale     a run with --scale-clients simulated clients (tiny model, 2 shots, Dirichlet label
            skew, client fraction --scale-fraction) on 2 Ray actors, with its peak memory.

Memory: peak RSS of the driver (read before the in-process variant loads a CLIP into this
process), of every actor (its own peak), and PSS (shared pages such as torch's libraries split
between the processes that map them, so PSS sums do not double count).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fedpgp_ray.config import ExperimentConfig, config_from_dict, config_to_dict, load_config

if TYPE_CHECKING:  # torch-backed: imported when a benchmark runs, so `--help` is instant
    from fedpgp_ray.checkpoint import CheckpointStore
    from fedpgp_ray.runtime.base import Runtime


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mb(value: float) -> str:
    return f"{value:,.0f} MiB"


@dataclass
class BenchContext:
    """What sections share: the base config, options, a scratch directory and earlier results."""
    cfg: ExperimentConfig
    args: argparse.Namespace
    workdir: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep: dict[str, Any] = field(default_factory=dict)


# -- variants: a runtime driven round by round ----------------------------------------------------
class Variant:
    """One runtime stepped like `fedpgp_ray.federation.run_federation`, with each phase timed."""

    def __init__(self, name: str, label: str, cfg: ExperimentConfig, build: Callable[[CheckpointStore], Runtime]):
        self.name, self.label, self.cfg, self.build = name, label, cfg, build
        self.fit_s: dict[int, float] = {}
        self.fit_compute_s: dict[int, float] = {}
        self.fit_tasks: dict[int, int] = {}
        self.train_s: dict[int, float] = {}
        self.eval_s: dict[int, float] = {}
        self.cpu_s: dict[int, list[float]] = {}  # per round: CPU s of [driver, *actor processes]
        self.metrics: dict[str, float] = {}

    def setup(self) -> None:
        from fedpgp_ray.federation import build_strategy
        t = time.perf_counter()
        from fedpgp_ray.checkpoint import CheckpointStore

        self.store = CheckpointStore(Path(self.cfg.output_dir) / "checkpoints")
        self.runtime = self.build(self.store)
        self.strategy = build_strategy(self.cfg)
        self.server = self.runtime.make_server(self.strategy, self.store, False)
        self.startup_s = time.perf_counter() - t

    def _cpu(self) -> list[float]:
        remote = getattr(self.runtime, "cpu_seconds", None)
        return [time.process_time(), *(remote() if remote else [])]

    def round(self, rnd: int) -> None:
        report: dict[str, Any] = {"round": rnd, "metrics": {}, "clients": {}}
        if rnd > 0:
            cpu = self._cpu()
            t = time.perf_counter()
            sampled = self.strategy.configure_train(rnd)
            results, failures = self.runtime.fit(rnd, sampled, self.server.global_params())
            self.fit_s[rnd] = time.perf_counter() - t
            report["metrics"].update(self.server.aggregate_train(rnd, results, failures))
            self.train_s[rnd] = time.perf_counter() - t
            self.cpu_s[rnd] = [b - a for a, b in zip(cpu, self._cpu())]
            self.fit_compute_s[rnd] = sum(r.metrics.get("fit_seconds", 0.0) for r in results)
            self.fit_tasks[rnd] = len(sampled)
        ids = self.strategy.configure_evaluate(rnd)
        if ids is not None:
            t = time.perf_counter()
            results, _ = self.runtime.evaluate(rnd, ids, self.server.global_params())
            self.metrics = self.server.aggregate_evaluate(rnd, results)
            self.eval_s[rnd] = time.perf_counter() - t
        t = time.perf_counter()
        self.server.finish_round(rnd, report)  # the checkpoint belongs to the training round
        if rnd > 0:
            self.train_s[rnd] += time.perf_counter() - t

    def _idle_bound(self, cpu: list[float]) -> float:
        """Least wall time of a round on an idle machine with `threads` cores, from its CPU use: the
        cores must do all the work, and no process runs faster than its threads allow (optimistic
        for multi-threaded processes, which rarely scale perfectly on tiny ops)."""
        rc = self.cfg.runtime
        per_actor = rc.threads_per_worker or max(int(rc.num_cpus_per_actor), 1)
        threads = ([rc.threads_per_worker or 1] if rc.kind == "local"
                   else [1, *[per_actor] * rc.num_actors, 1])  # driver, client actors, server actor
        cores = max(sum(threads[1:-1]) if rc.kind == "ray" else threads[0], 1)
        return max(sum(cpu) / cores, *(c / t for c, t in zip(cpu, threads)))

    def summary(self) -> dict[str, Any]:
        workers = self.cfg.runtime.num_actors if self.cfg.runtime.kind == "ray" else 1
        per_task = [(self.fit_s[r] - self.fit_compute_s[r] / workers) / self.fit_tasks[r] for r in self.fit_s]
        out = {"label": self.label, "startup_s": self.startup_s,
               "round_s": statistics.mean(self.train_s.values()), "round_s_each": list(self.train_s.values()),
               "eval_pass_s": statistics.mean(self.eval_s.values()),
               "clients_per_round": statistics.mean(self.fit_tasks.values()),
               # CPU seconds per training round, summed over the runtime's processes, and of its
               # busiest process: on an otherwise idle machine a round cannot take less wall time
               # than the busiest process's CPU time (threads of one process add up in it)
               "cpu_s": statistics.mean(sum(c) for c in self.cpu_s.values()),
               "busiest_cpu_s": statistics.mean(max(c) for c in self.cpu_s.values()),
               "idle_bound_s": statistics.mean(self._idle_bound(c) for c in self.cpu_s.values()),
               # wall time of the fit phase that is not client compute, per task (exact with one
               # worker; with several it also counts load imbalance between them)
               "in_round_overhead_ms_per_task": 1000 * statistics.mean(per_task),
               "final": {k: self.metrics[k] for k in ("local", "base", "novel", "hm3", "hm2") if k in self.metrics}}
        report = getattr(self.runtime, "memory_report", None)
        out["memory"] = report() if report else None
        return out

    def close(self) -> None:
        self.runtime.close()


def _with_runtime(cfg: ExperimentConfig, output_dir: Path, **runtime: Any) -> ExperimentConfig:
    return dataclasses.replace(cfg, output_dir=str(output_dir), runtime=dataclasses.replace(cfg.runtime, **runtime))


def local_variant(ctx: BenchContext) -> Variant:
    from fedpgp_ray.run import feature_cache_dir
    from fedpgp_ray.runtime.local import LocalRuntime
    t = ctx.args.threads
    cfg = _with_runtime(ctx.cfg, ctx.workdir / "local", kind="local", threads_per_worker=t)
    return Variant("local", f"in-process ({t} threads)", cfg,
                   lambda store: LocalRuntime(cfg, store, feature_cache_dir()))


def ray_variant(ctx: BenchContext, actors: int) -> Variant:
    from fedpgp_ray.run import feature_cache_dir
    from fedpgp_ray.runtime.ray import RayRuntime
    per = max(ctx.args.threads // actors, 1)
    cfg = _with_runtime(ctx.cfg, ctx.workdir / f"ray{actors}", kind="ray", num_actors=actors,
                        num_cpus_per_actor=float(per), threads_per_worker=per, num_gpus_per_actor=0.0)
    label = f"Ray, {actors} actor{'s' * (actors > 1)} x {per} thread{'s' * (per > 1)}"
    return Variant(f"ray{actors}", label, cfg, lambda store: RayRuntime(cfg, store, feature_cache_dir()))


VARIANTS: dict[str, Callable[[BenchContext], Variant]] = {
    "local": local_variant,
    "ray1": lambda ctx: ray_variant(ctx, 1),
    "ray2": lambda ctx: ray_variant(ctx, 2),
}


# -- sections ---------------------------------------------------------------------------------------
def section_rounds(ctx: BenchContext) -> dict[str, Any]:
    import torch
    names = ctx.args.variants
    # Ray variants first: the driver's peak memory is read before a CLIP is loaded into this process.
    order = sorted(names, key=lambda n: n == "local")
    if any(n != "local" for n in names):
        _ensure_ray(ctx, cpus=2 * ctx.args.threads)  # both pools placed at once; one computes at a time
    before = torch.get_num_threads()
    variants: dict[str, Variant] = {}
    try:
        for name in order:
            if name == "local":
                ctx.keep["driver_peak_rss_mb"] = peak_rss_mb()
            _log(f"start {name}")
            variants[name] = VARIANTS[name](ctx)
            variants[name].setup()
            variants[name].round(0)
        rounds = ctx.cfg.train.rounds
        for rnd in range(1, rounds + 1):
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                variants[name].round(rnd)
            _log(f"round {rnd}/{rounds} done")
        out = {name: v.summary() for name, v in variants.items()}
        if "ray1" in variants:
            ctx.keep["ray1"] = variants.pop("ray1")  # the overhead section pings its actor
    finally:
        for v in variants.values():
            v.close()
        torch.set_num_threads(before)
    out["process_peak_rss_mb"] = peak_rss_mb()
    return out


def section_overhead(ctx: BenchContext) -> dict[str, Any]:
    import ray
    variant = ctx.keep.pop("ray1", None)
    if variant is None:
        _ensure_ray(ctx, cpus=ctx.args.threads)
        variant = ray_variant(ctx, 1)
        variant.setup()
    try:
        actor = variant.runtime.actors[0]
        ref = ray.put(variant.server.global_params())
        ray.get([actor.ping.remote(ref) for _ in range(20)])  # warm-up
        n = ctx.args.overhead_tasks
        t = time.perf_counter()
        for _ in range(n):
            ray.get(actor.ping.remote(ref))
        sequential = (time.perf_counter() - t) / n
        t = time.perf_counter()
        ray.get([actor.ping.remote(ref) for _ in range(n)])
        pipelined = (time.perf_counter() - t) / n
    finally:
        variant.close()
    out = {"noop_round_trip_ms": 1000 * sequential, "noop_pipelined_ms": 1000 * pipelined, "tasks": n}
    rounds = ctx.results.get("rounds", {})
    if "ray1" in rounds:
        out["in_round_ms_per_task_1_actor"] = rounds["ray1"]["in_round_overhead_ms_per_task"]
    return out


def section_scale(ctx: BenchContext) -> dict[str, Any]:
    """--scale-clients simulated clients: a Dirichlet (beta=100, near-uniform) split of a small world."""
    from fedpgp_ray.federation import run_federation
    from fedpgp_ray.run import feature_cache_dir
    from fedpgp_ray.runtime.ray import RayRuntime
    a = ctx.args
    _ensure_ray(ctx, cpus=a.threads)
    data = config_to_dict(ctx.cfg)
    data.update(output_dir=str(ctx.workdir / "scale"))
    data["data"].update(shots=2, partition="dirichlet", beta=100.0, augment_views=0)
    # ~1 training image per base class per client (8 base classes)
    data["data"]["world"].update(num_classes=16, train_per_class=max(1000, a.scale_clients), test_per_class=10)
    data["federation"].update(num_clients=a.scale_clients, client_fraction=a.scale_fraction, min_reporting_clients=1)
    data["train"].update(rounds=a.scale_rounds, local_epochs=1)
    data["evaluation"].update(every=10**6)  # all clients evaluated at round 0 and after the last round
    per = max(a.threads // 2, 1)
    data["runtime"].update(kind="ray", num_actors=2, num_cpus_per_actor=float(per), threads_per_worker=per,
                           num_gpus_per_actor=0.0)
    cfg = config_from_dict(data)
    from fedpgp_ray.checkpoint import CheckpointStore

    store = CheckpointStore(Path(cfg.output_dir) / "checkpoints")
    t = time.perf_counter()
    with RayRuntime(cfg, store, feature_cache_dir()) as runtime:
        startup = time.perf_counter() - t
        doc = run_federation(cfg, runtime, store)
        memory = runtime.memory_report()
    rounds = [r["metrics"] for r in doc["rounds"] if r["round"] > 0]
    return {"label": f"{a.scale_clients} clients, fraction {a.scale_fraction}, 2 actors x {per} thread(s)",
            "wall_s": time.perf_counter() - t, "startup_s": startup,
            "round_s_each": [m["round_seconds"] for m in rounds],
            "clients_per_round": rounds[0]["clients_sampled"],
            "clients_reported": [m["clients_reported"] for m in rounds],
            "eval_round_s": [r["metrics"]["round_seconds"] for r in doc["rounds"] if "local" in r["metrics"]],
            "final": doc["final"], "memory": memory, "driver_peak_rss_mb": peak_rss_mb()}


SECTIONS: dict[str, Callable[[BenchContext], dict[str, Any]]] = {
    "rounds": section_rounds,
    "overhead": section_overhead,
    "scale": section_scale,
}
DEFAULT_SECTIONS = "rounds,overhead"


def _ensure_ray(ctx: BenchContext, cpus: int) -> None:
    """One Ray instance for all sections: local with `cpus` logical CPUs, or --address."""
    import ray
    if ray.is_initialized():
        return
    if ctx.args.address:
        ray.init(address=ctx.args.address)
    else:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ctx.keep["owns_ray"] = True


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- report -----------------------------------------------------------------------------------------
def report(ctx: BenchContext) -> str:
    a, cfg = ctx.args, ctx.cfg
    lines = []
    r = ctx.results.get("rounds")
    if r:
        lines += [f"quickstart world: {cfg.federation.num_clients} clients x {cfg.train.local_epochs} local epochs, "
                  f"{cfg.data.shots} shots, {cfg.train.rounds} rounds; {a.threads} threads in total per runtime; "
                  f"{os.cpu_count()} cores; load average at start {ctx.keep.get('load', '?')}", "",
                  f"{'runtime':<26}{'s/round':>9}{'eval s':>8}{'start s':>9}{'vs in-process':>15}"
                  f"{'CPU s/round':>13}{'idle-bound s':>14}{'vs in-process':>15}"]
        base = r["local"]["round_s"] if "local" in r else None
        ibase = r["local"]["idle_bound_s"] if "local" in r else None
        for name in a.variants:
            x = r[name]
            rel = f"{base / x['round_s']:.2f}x" if base else "-"
            irel = f"{ibase / x['idle_bound_s']:.2f}x" if ibase else "-"
            lines.append(f"{x['label']:<26}{x['round_s']:>9.2f}{x['eval_pass_s']:>8.2f}{x['startup_s']:>9.1f}{rel:>15}"
                         f"{x['cpu_s']:>13.2f}{x['idle_bound_s']:>14.2f}{irel:>15}")
        if base and "ray1" in r:
            ratio = r["ray1"]["round_s"] / base
            lines.append(f"Ray 1 actor: {ratio:.2f}x the in-process time per round "
                         f"(target <= 1.30: {'met' if ratio <= 1.3 else 'MISSED'})")
        if base and "ray2" in r:
            speed = base / r["ray2"]["round_s"]
            lines.append(f"Ray 2 actors: {speed:.2f}x faster than in-process (target >= 1.50: "
                         f"{'met' if speed >= 1.5 else 'MISSED'})")
        lines += ["(s/round: measured wall time, sensitive to other load on the machine; idle-bound s: the least "
                  "wall time the\n measured CPU use allows on an idle machine with the same cores; "
                  "see `fedpgp-ray bench --help`)", ""]
    o = ctx.results.get("overhead")
    if o:
        extra = (f"; inside real rounds (1 actor): {o['in_round_ms_per_task_1_actor']:.1f} ms/task"
                 if "in_round_ms_per_task_1_actor" in o else "")
        lines += [f"Ray per-client-task overhead: {o['noop_round_trip_ms']:.2f} ms per no-op task round trip, "
                  f"{o['noop_pipelined_ms']:.2f} ms/task pipelined ({o['tasks']} tasks){extra}", ""]
    if r:
        lines.append("peak memory (RSS; PSS in brackets):")
        if "driver_peak_rss_mb" in ctx.keep:
            lines.append(f"  Ray driver (before the in-process variant): {_mb(ctx.keep['driver_peak_rss_mb'])}")
        for name in a.variants:
            m = r[name].get("memory")
            if m:
                actors = ", ".join(f"{_mb(x['peak_rss_mb'])} ({_mb(x['pss_mb'])})" for x in m["actors"])
                lines.append(f"  {r[name]['label']}: client actors {actors}; server actor "
                             f"{_mb(m['server']['peak_rss_mb'])} ({_mb(m['server']['pss_mb'])})")
        lines += [f"  whole bench process (incl. the in-process runtime): {_mb(r['process_peak_rss_mb'])}", ""]
    s = ctx.results.get("scale")
    if s:
        m = s["memory"]
        pss = sum(x["pss_mb"] for x in m["actors"]) + m["server"]["pss_mb"] + m["driver"]["pss_mb"]
        lines += [f"scale: {s['label']}: completed in {s['wall_s']:.0f} s (start-up {s['startup_s']:.0f} s; "
                  f"rounds {', '.join(f'{x:.1f}' for x in s['round_s_each'])} s, the last incl. evaluating all "
                  f"clients; round 0 (evaluating all clients) {s['eval_round_s'][0]:.1f} s; "
                  f"{s['clients_per_round']:.0f} clients/round, reported {s['clients_reported']})",
                  f"  peak RSS: driver {_mb(s['driver_peak_rss_mb'])}, client actors "
                  f"{', '.join(_mb(x['peak_rss_mb']) for x in m['actors'])}, server {_mb(m['server']['peak_rss_mb'])}; "
                  f"PSS of driver + actors at the end: {_mb(pss)}"]
    return "\n".join(lines).rstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpgp-ray bench", description="Time federated rounds in-process and "
                                "on Ray actors; Ray's per-task overhead; peak memory; a many-client run.",
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file, or the name of a packaged config (e.g. world_domains, "
                                   "paper/caltech101_b2n_16shot; `fedpgp-ray configs` lists them); "
                                   "default: quickstart")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--rounds", type=int, default=4, help="training rounds timed per variant (default 4)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="torch threads (= Ray CPUs) of every runtime in total (default: all cores)")
    p.add_argument("--sections", default=DEFAULT_SECTIONS,
                   help=f"comma-separated, in order (default {DEFAULT_SECTIONS}; also: scale)")
    p.add_argument("--variants", default="local,ray1,ray2", help="runtimes timed by the rounds section")
    p.add_argument("--address", help="use this Ray cluster instead of starting a local instance")
    p.add_argument("--overhead-tasks", type=int, default=300, help="no-op tasks timed by the overhead section")
    p.add_argument("--scale-clients", type=int, default=1000, help="simulated clients of the scale section")
    p.add_argument("--scale-fraction", type=float, default=0.05,
                   help="share of clients sampled per round in the scale section")
    p.add_argument("--scale-rounds", type=int, default=2, help="rounds of the scale section")
    p.add_argument("--json", help="also write every figure to this JSON file")
    return p


def _bench_config(args: argparse.Namespace) -> ExperimentConfig:
    from fedpgp_ray.clip.backbone import CheckpointError, resolve_pretrained
    cfg = load_config(args.config, [*args.set, f"train.rounds={args.rounds}", "tracking.mlflow=false"])
    # evaluate all clients at round 0 and after the last round only (timed apart from rounds)
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, every=10**6))
    try:
        resolve_pretrained(cfg.model.name, cfg.model.pretrained)
    except CheckpointError as err:  # timings do not depend on the weights' values
        _log(f"{str(err).split(':')[0]}: benchmarking with random weights (model.pretrained: null)")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [s for s in args.sections if s not in SECTIONS] + [v for v in args.variants if v not in VARIANTS]
    if bad:
        print(f"error: unknown section/variant {', '.join(bad)}: sections {', '.join(SECTIONS)}; "
              f"variants {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    cfg = _bench_config(args)
    with tempfile.TemporaryDirectory(prefix="fedpgp-bench-") as tmp:
        ctx = BenchContext(cfg, args, Path(tmp))
        ctx.keep["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        try:
            for name in args.sections:
                _log(f"section {name}")
                ctx.results[name] = SECTIONS[name](ctx)
        finally:
            leftover = ctx.keep.pop("ray1", None)
            if leftover is not None:
                leftover.close()
            if ctx.keep.get("owns_ray"):
                import ray
                ray.shutdown()
    print(report(ctx))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": ctx.results, "threads": args.threads, "rounds": args.rounds,
                                               "cores": os.cpu_count(), "load_at_start": ctx.keep.get("load"),
                                               "driver_peak_rss_mb": ctx.keep.get("driver_peak_rss_mb")},
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
