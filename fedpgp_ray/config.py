"""Typed experiment configuration: YAML in, validated dataclasses out.

Every key is declared here with its type and allowed range. Unknown keys,
wrong types and out-of-range values raise `ConfigError` with one line that
names the key, the allowed values and the fix, before any work starts.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedpgp_ray.storage import is_uri

# The configs shipped in the package (fedpgp_ray/configs, a link to the repository's configs/):
# `--config quickstart` or `--config paper/caltech101_b2n_16shot` name one of them.
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
QUICKSTART = CONFIGS_DIR / "quickstart.yaml"


class ConfigError(ValueError):
    """A config value is unknown, mistyped or out of range."""


# A config is a few kilobytes (the shipped ones: under 2 KiB). The bound keeps a hostile or broken
# file from exhausting memory while it is parsed and validated (a 50 MB list grew past 4 GB).
MAX_CONFIG_BYTES = 1 << 20


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: a key repeated in one mapping is an error (YAML forbids it;
    PyYAML keeps the last, so a second `train:` section would silently replace the first), and
    anchors/aliases are refused (`*a` shares a node: nested aliases expand exponentially, the
    "billion laughs"; configs never need them)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: alias *{event.anchor} (YAML anchors and "
                              f"aliases are not allowed in configs): write the values out")
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise ConfigError(f"line {event.start_mark.line + 1}: anchor &{anchor} (YAML anchors and aliases "
                              f"are not allowed in configs): write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"key '{key}' appears twice in one section, at lines {seen[key]} and {line}: "
                                  f"keep one (YAML keys are unique; values are not merged)")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """Parse config YAML strictly (StrictLoader) within MAX_CONFIG_BYTES: ConfigError or yaml.YAMLError."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"holds {len(text):,} characters, more than a config's limit of {MAX_CONFIG_BYTES:,}: "
                          f"a config is a few kilobytes of settings")
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def read_config_text(text: str, where: str) -> dict[str, Any]:
    """The mapping in config YAML `text` (from `where`, e.g. "config file x.yaml"), or a one-line ConfigError."""
    try:
        data = parse_yaml(text)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at} ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} holds a {type(data).__name__}, not a mapping of sections "
                          f"(seed, model, data, ...): see configs/quickstart.yaml")
    return data


def read_config_file(path: Path, where: str | None = None) -> dict[str, Any]:
    """read_config_text of a file, refusing one over MAX_CONFIG_BYTES before reading it."""
    where = where or f"config file {path}"
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is {size:,} bytes, more than a config's limit of {MAX_CONFIG_BYTES:,}: "
                              f"a config is a few kilobytes of settings")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte {err.start} cannot be decoded): "
                          f"pass a YAML text file") from None
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror or err})") from None
    return read_config_text(text, where)


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           choices: tuple[Any, ...] | None = None) -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}


def _f(default: Any, **check: Any) -> Any:
    """A field with a default and an optional range/choices check."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"check": _range(**check)})
    return field(default=default, metadata={"check": _range(**check)})


@dataclass
class ModelConfig:
    """Frozen CLIP backbone.

    name: open_clip model name (e.g. "ViT-B-16") or a project config ("fedpgp-tiny").
    pretrained: open_clip pretrained tag ("openai"), a local checkpoint path, or
        null for random weights (tests, speed benchmarks only).
    precision: "fp32" everywhere, or "amp" (bf16 autocast, on CUDA and on CPU).
    """
    name: str = _f("fedpgp-tiny")
    pretrained: str | None = _f("fedpgp-world")
    precision: str = _f("fp32", choices=("fp32", "amp"))
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))


@dataclass
class WorldConfig:
    """Procedural image world (the offline dataset; see docs/WORLD.md).

    num_classes: a fixed, colour-balanced subset of the 256 classes (8 colours x 8 shapes x 4 patterns).
    train_per_class / test_per_class: images per class in each split (per style when `domains` is set).
    image_size: pixels per side (the shipped CLIP sees 32; other sizes are resized by its preprocess).
    style: the style of a category-level dataset: "task" (the federated task's shifted style, never
        seen in pretraining) or a pretraining style ("clean", "sketch", "cluttered", "pixel").
    domains: domain level: render every split in each of these styles (one domain per style).
    """
    num_classes: int = _f(64, lo=4, hi=256)
    train_per_class: int = _f(32, lo=1)
    test_per_class: int = _f(20, lo=1)
    image_size: int = _f(32, lo=16, hi=128)
    style: str = _f("task", choices=("task", "clean", "sketch", "cluttered", "pixel"))
    domains: list[str] = _f([])


@dataclass
class DataConfig:
    """Dataset and its federated partition.

    partition: "pathological" (disjoint base classes per client, SPEC),
        "dirichlet" (label skew with Dir(beta)), "domain" (one domain per client) or "shared"
        (cross-device populations larger than the dataset: each client draws `classes_per_client` base
        classes and `shots` images of each; clients share images; docs/SCALE.md).
    classes_per_client: "shared" partition: base classes per client.
    base_novel: split sorted classes into base (first ceil(n/2)) and novel.
    root: folder holding the dataset's files (real datasets; `~` is expanded). See docs/DATASETS.md.
    skip_bad_images: drop unreadable/truncated images (logged with their paths) instead of stopping.
    download: let torchvision fetch a missing CoOp-layout dataset or CIFAR into `root` (needs
        internet; CoOp datasets then get a split built from the official split files, not CoOp's).
    class_order: "name" (labels = positions in the sorted cleaned class names) or "coop" (CoOp-layout
        datasets: keep the label ids of CoOp's split file, the reference's base/novel split; differs
        from "name" on Caltech101 and Flowers102 only; other datasets ignore it).
    domains: domain-level datasets: the domains to use (empty: all of the dataset's domains).
    partition_seed: seed of the pathological class shuffle, fixed by default (the reference's 2023) so
        experiment seeds vary training noise, not partitions; null: use the experiment seed.
    local_test: Dirichlet partitions: "split" (each client's local test set is split from the test set
        per class with the client's Dirichlet proportions, the reference's rule) or "classes" (every test
        image of every class the client holds; the sets overlap).
    few_shot_pool: CoOp-layout datasets: the split few-shot images are drawn from, "train" (CoOp and the
        reference) or "train+val".
    cache_content_hash: identify image files in feature-cache keys by the sha256 of their bytes (reads
        every file once per run) instead of path, size and modification time.
    """
    dataset: str = _f("world")
    root: str | None = _f(None)
    shots: int = _f(8, lo=1)
    partition: str = _f("pathological", choices=("pathological", "dirichlet", "domain", "shared"))
    classes_per_client: int = _f(2, lo=1)
    beta: float = _f(0.3, lo=0.0, lo_open=True)
    base_novel: bool = _f(True)
    held_out_domain: str | None = _f(None)
    augment_views: int = _f(0, lo=0)
    skip_bad_images: bool = _f(False)
    download: bool = _f(False)
    class_order: str = _f("name", choices=("name", "coop"))
    domains: list[str] = _f([])
    partition_seed: int | None = _f(2023, lo=0)
    local_test: str = _f("split", choices=("split", "classes"))
    few_shot_pool: str = _f("train", choices=("train", "train+val"))
    cache_content_hash: bool = _f(False)
    world: WorldConfig = field(default_factory=WorldConfig)


# The built-in algorithms (`fedpgp_ray.algorithms.ALGORITHMS`, which needs torch): named here so that a
# config is checked without importing torch (tests/test_config.py keeps the two lists equal).
ALGORITHM_NAMES = ("clip", "local", "promptfl", "fedprox", "fedkgcoop", "fedotp", "fedpgp")


@dataclass
class AlgorithmConfig:
    """Prompt-learning algorithm and its hyperparameters (SPEC defaults).

    name: one of the registered algorithms (see `fedpgp_ray.algorithms.ALGORITHMS`).
    n_ctx: number of learnable context tokens L.
    rank: rank r of FedPGP's personal term U V.
    mu: weight of FedPGP's contrastive loss (0 disables it).
    tau: temperature of the contrastive loss.
    init_std: std of the N(0, std^2) init of all prompt parameters.
    prox_mu: FedProx proximal weight for PromptFL (0 = plain PromptFL; the "fedprox" algorithm
        uses 0.01 when this is 0).
    kg_weight: weight W of FedKgCoOp's knowledge-guided term W * (1 - mean_c cos(f_c, f_c^clip)).
    ot_eps: entropic regularisation of FedOTP's optimal transport (Sinkhorn).
    ot_iters: Sinkhorn iterations of FedOTP's transport plan.
    ot_mass: share of the image patches' mass FedOTP transports to the prompts (1 = balanced OT).
    """
    name: str = _f("fedpgp")
    n_ctx: int = _f(16, lo=1, hi=64)
    rank: int = _f(8, lo=1)
    mu: float = _f(0.5, lo=0.0)
    tau: float = _f(0.5, lo=0.0, lo_open=True)
    init_std: float = _f(0.02, lo=0.0, lo_open=True)
    prox_mu: float = _f(0.0, lo=0.0)
    kg_weight: float = _f(8.0, lo=0.0)
    ot_eps: float = _f(0.01, lo=0.0, lo_open=True)
    ot_iters: int = _f(100, lo=1)
    ot_mass: float = _f(0.8, lo=0.0, hi=1.0, lo_open=True)


@dataclass
class TrainConfig:
    """Local training on each sampled client (SPEC: SGD 0.001, momentum 0.9, wd 5e-4)."""
    rounds: int = _f(25, lo=1)
    local_epochs: int = _f(2, lo=1)
    batch_size: int = _f(8, lo=1)
    lr: float = _f(0.001, lo=0.0, lo_open=True)
    momentum: float = _f(0.9, lo=0.0, hi=1.0)
    weight_decay: float = _f(5e-4, lo=0.0)


@dataclass
class FederationConfig:
    """Clients and sampling.

    num_clients: K. client_fraction: share of clients sampled per round, in (0, 1].
    min_reporting_clients: a round with fewer reporting clients fails loudly.
    allow_dropped_clients: a run in which the runtime dropped a client (it failed every attempt) still
        exits 0; by default such a run finishes, writes its results and exits 3 naming the clients.
    round_deadline_s: a training round stops waiting this many seconds after it started; results that
        arrive later are discarded and counted (`clients_late`), not dropped (null: wait for every client).
    over_selection: sample ceil((1 + over_selection) m) clients instead of m = floor(client_fraction K) and
        aggregate the first m to report (Bonawitz et al. 2019); the rest are discarded as late (0: off).
    mode: "sync" (rounds: sample, train, aggregate) or "async" (FedBuff: clients train continuously, the
        server steps every fedbuff.buffer_size updates; docs/ASYNC.md).
    """
    num_clients: int = _f(10, lo=1)
    client_fraction: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    min_reporting_clients: int = _f(1, lo=1)
    allow_dropped_clients: bool = _f(False)
    round_deadline_s: float | None = _f(None, lo=0.0, lo_open=True)
    over_selection: float = _f(0.0, lo=0.0, hi=10.0)
    mode: str = _f("sync", choices=("sync", "async"))


@dataclass
class ClientSpeedConfig:
    """Client speed model for tests and benchmarks (fedpgp_ray/client_speed.py; docs/ASYNC.md): a slow
    client's fit waits (k - 1) x its measured training time, so it takes k times as long. Seeded by `seed`.

    kind: "none" (off), "slow_fraction" (round(slow_fraction K) clients are `slowdown` times slower) or
        "lognormal" (k = max(1, exp(sigma z)), z ~ N(0, 1) per client).
    """
    kind: str = _f("none", choices=("none", "slow_fraction", "lognormal"))
    slow_fraction: float = _f(0.1, lo=0.0, hi=1.0)
    slowdown: float = _f(10.0, lo=1.0)
    sigma: float = _f(1.0, lo=0.0)


@dataclass
class EvaluationConfig:
    """every: evaluate every N rounds (and always at round 0 and after the last).

    client_fraction: share of the clients evaluated in an evaluation round, sampled with the seed from
        a stream of its own (training's sample does not change it); 1.0 = every client.
    num_clients: evaluate this many clients instead (null: use client_fraction).
    final: the last round's evaluation: "sample" (as every evaluation round) or "all" (every client).
    """
    every: int = _f(1, lo=1)
    batch_size: int = _f(256, lo=1)
    client_fraction: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    num_clients: int | None = _f(None, lo=1)
    final: str = _f("sample", choices=("sample", "all"))


@dataclass
class RuntimeConfig:
    """Where clients run.

    kind: "local" (in-process, sequential) or "ray" (client actors).
    num_actors: size of the Ray client-actor pool.
    num_cpus_per_actor / num_gpus_per_actor: Ray resources per actor (fractional GPUs); the CPUs of
        the in-process worker too (runtime.kind local).
    threads_per_worker: torch threads per worker (0: floor(num_cpus_per_actor), at least 1).
    address: Ray cluster to attach to (null: RAY_ADDRESS, a running cluster, or a new local one).
    max_client_retries: attempts for a client whose actor died, before it is dropped.
    placement_timeout_s: fail start-up (or the round, for an actor replacing one lost with its node) if
        the actors cannot be placed in this time.
    connect_timeout_s: fail start-up if nothing answers at `address` in this time.
    task_timeout_s: a client task running longer is treated as hung: its actor is killed and replaced,
        the client re-queued (counted as `tasks_timed_out`). null: max(600 s, 10 x the slowest task
        completed in the run) (see fedpgp_ray.runtime.ray.task_timeout).
    allow_state_reinit: a client that trained before but whose saved personal state cannot be found
        is an error (false); true starts it again from a fresh init, counted as `state_reinits`.
    client_state_cache: personal states each worker (in-process worker, Ray client actor) keeps in memory,
        least recently used dropped first; the others are read from the run storage when their client
        runs again (docs/SCALE.md).
    """
    kind: str = _f("local", choices=("local", "ray"))
    num_actors: int = _f(2, lo=1)
    num_cpus_per_actor: float = _f(1.0, lo=0.0, lo_open=True)
    num_gpus_per_actor: float = _f(0.0, lo=0.0, hi=1.0)
    address: str | None = _f(None)
    max_client_retries: int = _f(2, lo=0)
    placement_timeout_s: float = _f(60.0, lo=0.0, lo_open=True)
    connect_timeout_s: float = _f(60.0, lo=0.0, lo_open=True)
    task_timeout_s: float | None = _f(None, lo=0.0, lo_open=True)
    threads_per_worker: int = _f(0, lo=0)
    allow_state_reinit: bool = _f(False)
    client_state_cache: int = _f(1000, lo=1)


@dataclass
class TrackingConfig:
    """MLflow tracking from the driver. checkpoint_every: log sigma every N rounds.

    uri: tracking store when MLFLOW_TRACKING_URI is unset (null: sqlite:///<parent of output_dir>/mlflow.db).
        See docs/TRACKING.md for the rules.
    config_file: the config the experiment was loaded from (set by load_config; logged as a tag).
    log_models: at the end of the run, log the run's personalised model (the global prompt and every
        client's personal factors, one MLflow model) and register it as
        `<experiment>-<config>-<dataset>-<algorithm>` (docs/SERVING.md).
    log_client_models: also one registered model per client and a global one (O(clients) registry
        writes: for small federations).
    system_metrics: log the driver's CPU, memory, disk and network use as `system/*` metrics
        (MLflow's system metrics monitor, every 10 s); off unless asked for.
    """
    mlflow: bool = _f(True)
    experiment: str = _f("fedpgp-ray")
    checkpoint_every: int = _f(1, lo=1)
    uri: str | None = _f(None)
    config_file: str | None = _f(None)
    log_models: bool = _f(True)
    log_client_models: bool = _f(False)
    system_metrics: bool = _f(False)


@dataclass
class PrivacyConfig:
    """Client-level differential privacy of the global prompt (DP-FedAvg; see docs/PRIVACY.md).

    enabled: clip each client's update, Poisson-sample clients with rate federation.client_fraction,
        add Gaussian noise on the server, unweighted fixed-denominator average, epsilon every round.
    noise_multiplier: z; the noise on the sum of clipped updates has std z * clip_norm (0: no noise,
        no guarantee). clip_norm: C, L2 bound of each client's update over all global tensors (null:
        no clipping, only with noise_multiplier 0). target_delta: the delta epsilon is reported at.
    max_epsilon: stop the run after the last round whose epsilon stays within it (null: no limit).
    seeded: draw client sampling and noise from the config seed (reproducible; but anyone who knows
        the seed, which MLflow records, can undo the noise: for tests and experiments only), else
        from the operating system's entropy.
    """
    enabled: bool = _f(False)
    noise_multiplier: float = _f(1.0, lo=0.0)
    clip_norm: float | None = _f(0.1, lo=0.0, lo_open=True)
    target_delta: float = _f(1e-5, lo=0.0, lo_open=True)  # < 1: checked in config_from_dict
    max_epsilon: float | None = _f(None, lo=0.0, lo_open=True)
    seeded: bool = _f(False)


@dataclass
class SecAggConfig:
    """Secure aggregation of the global prompt (SecAgg+, Bell et al. 2020; see docs/PRIVACY.md).

    enabled: the server learns only the sum of the round's surviving clients' quantised updates.
    bits: the ring Z_{2^bits} the updates are summed in. clip_range: without privacy.enabled, each
        coordinate of an update is clipped to [-clip_range, clip_range] before quantisation (with DP,
        privacy.clip_norm bounds every coordinate and is used instead).
    threshold: a client's secrets are shared t-of-k among its k neighbours, t = floor(threshold k) + 1.
    degree: k, neighbours per client (null: 3 log2 n, rounded up to even, capped at n - 1).
    min_survivors: M, fewest clients whose masked inputs the server may unmask; fewer fail the round.
        With privacy.enabled each client adds 1/(M - 1) of the configured noise (distributed DP).
    """
    enabled: bool = _f(False)
    bits: int = _f(32, lo=16, hi=62)
    clip_range: float = _f(0.1, lo=0.0, lo_open=True)
    threshold: float = _f(0.5, lo=0.0, hi=1.0, lo_open=True)
    degree: int | None = _f(None, lo=2)
    min_survivors: int = _f(2, lo=2)


@dataclass
class FedBuffConfig:
    """Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022), used when federation.mode is
    "async" (docs/ASYNC.md).

    buffer_size: K, client updates per server step. concurrency: clients training at once (null:
        runtime.num_actors), at most federation.num_clients.
    max_staleness: an update trained from a global prompt more than this many server steps old is dropped.
    staleness: weight w(s) of an update of staleness s: "sqrt" 1/sqrt(1+s), "constant" 1, "polynomial"
        (1+s)^-staleness_exponent.
    server_lr: eta; a step sets global += eta * sum_i w(s_i) delta_i / K over the K buffered updates.
    server_steps: the run's length (null: ceil(train.rounds * m / K), m = clients sampled per synchronous
        round: as many applied client updates as the synchronous run of the same config trains).
    eval_every_steps: evaluate every N server steps, and at step 0 and the last (null: evaluation.every).
    """
    buffer_size: int = _f(5, lo=1)
    concurrency: int | None = _f(None, lo=1)
    max_staleness: int = _f(10, lo=0)
    staleness: str = _f("sqrt", choices=("sqrt", "constant", "polynomial"))
    staleness_exponent: float = _f(0.5, lo=0.0)
    server_lr: float = _f(1.0, lo=0.0, lo_open=True)
    server_steps: int | None = _f(None, lo=1)
    eval_every_steps: int | None = _f(None, lo=1)


@dataclass
class ExperimentConfig:
    """One federated experiment. output_dir is made absolute at load time."""
    seed: int = _f(0, lo=0)
    output_dir: str = _f("runs/quickstart")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    client_speed: ClientSpeedConfig = field(default_factory=ClientSpeedConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    fedbuff: FedBuffConfig = field(default_factory=FedBuffConfig)


def _describe(check: dict[str, Any]) -> str:
    if check["choices"]:
        return "one of " + ", ".join(repr(c) for c in check["choices"])
    lo, hi = check["lo"], check["hi"]
    left = f"> {lo}" if check["lo_open"] else f">= {lo}"
    if lo is not None and hi is not None:
        return f"{left} and <= {hi}"
    return left if lo is not None else f"<= {hi}"


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}: write it as [a, b, ...]")
        (inner,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads `1e-5`, without a dot, as a string
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' must be of type {tp.__name__}, got {value!r} "
                          f"({type(value).__name__}): fix the value in the YAML or --set")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}': allowed keys under "
                              f"'{prefix.rstrip('.') or 'root'}' are {', '.join(sorted(known))}")
    kwargs = {}
    for name, f in known.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data.get(name, {}) or {}, key + ".")
            continue
        value = _coerce(key, data[name], tp) if name in data else getattr(cls(), name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' = {value!r} is not a finite number: write a number "
                              f"(NaN and infinities are refused)")
        check = f.metadata.get("check")
        if check and value is not None and not _in_range(value, check):
            raise ConfigError(f"config key '{key}' = {value!r} is out of range: must be {_describe(check)}")
        kwargs[name] = value
    return cls(**kwargs)


def _in_range(value: Any, check: dict[str, Any]) -> bool:
    if check["choices"]:
        return value in check["choices"]
    lo, hi = check["lo"], check["hi"]
    if lo is not None and (value <= lo if check["lo_open"] else value < lo):
        return False
    return hi is None or value <= hi


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse `key.path=value`; the value is read as YAML (numbers, bools, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key.path=value, got {item!r}: e.g. --set train.rounds=5")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except ConfigError as err:
        raise ConfigError(f"--set {key.strip()}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key.strip()}: value {raw!r} is not valid YAML ({str(err).splitlines()[0]}): "
                          f"quote it, e.g. --set '{key.strip()}=\"...\"'") from None
    return key.strip().split("."), value


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a section")
    node[path[-1]] = value


def config_from_dict(data: dict[str, Any], overrides: list[str] = (), base_dir: Path | None = None
                     ) -> ExperimentConfig:
    """Validate a raw mapping (plus `key=value` overrides) into an ExperimentConfig."""
    data = copy.deepcopy(data or {})  # overrides must not change the caller's nested dicts
    for item in overrides:
        _apply(data, *parse_override(item))
    cfg = _build(ExperimentConfig, data, "")
    if cfg.federation.min_reporting_clients > cfg.federation.num_clients:
        raise ConfigError(f"config key 'federation.min_reporting_clients' = {cfg.federation.min_reporting_clients}"
                          f" is out of range: must be <= federation.num_clients ({cfg.federation.num_clients})")
    for section in ("privacy", "secagg"):  # a setting of a switched-off feature would silently do nothing
        values, default = getattr(cfg, section), type(getattr(cfg, section))()
        changed = [f.name for f in dataclasses.fields(values) if getattr(values, f.name) != getattr(default, f.name)]
        if not values.enabled and changed:
            raise ConfigError(f"config key '{section}.{changed[0]}' is set but {section}.enabled is false: it would "
                              f"have no effect; set {section}.enabled=true or remove it")
    if cfg.model.device == "cuda" and cfg.runtime.kind == "ray" and cfg.runtime.num_gpus_per_actor == 0:
        raise ConfigError("model.device is 'cuda' but runtime.num_gpus_per_actor is 0, so Ray gives the client "
                          "actors no GPU: set runtime.num_gpus_per_actor (e.g. 0.5) on a cluster with GPUs, or "
                          "model.device: auto")
    _check_speed_and_deadline(cfg)
    _check_async(cfg)
    per_round = max(int(math.floor(cfg.federation.client_fraction * cfg.federation.num_clients)), 1)
    if cfg.secagg.enabled and not cfg.privacy.enabled and cfg.secagg.min_survivors > per_round:
        raise ConfigError(f"config key 'secagg.min_survivors' = {cfg.secagg.min_survivors} is out of range: must be "
                          f"<= the clients sampled per round ({per_round}); lower it or raise federation.client_fraction")
    if cfg.secagg.enabled and cfg.secagg.min_survivors > cfg.federation.num_clients:
        raise ConfigError(f"config key 'secagg.min_survivors' = {cfg.secagg.min_survivors} is out of range: must be "
                          f"<= federation.num_clients ({cfg.federation.num_clients})")
    if cfg.privacy.target_delta >= 1:
        raise ConfigError(f"config key 'privacy.target_delta' = {cfg.privacy.target_delta!r} is out of range: "
                          f"must be > 0 and < 1 (e.g. 1e-5, below 1 / federation.num_clients)")
    if cfg.privacy.enabled and cfg.privacy.noise_multiplier > 0 and cfg.privacy.clip_norm is None:
        raise ConfigError("config key 'privacy.clip_norm' is null (no clipping) but privacy.noise_multiplier > 0: "
                          "noise only protects clipped updates; set a clip_norm (e.g. 0.1)")
    if not cfg.output_dir.strip():  # "" would silently mean the current directory
        raise ConfigError("config key 'output_dir' is empty: name the run's directory, e.g. "
                          "--set output_dir=runs/my_run")
    if not is_uri(cfg.output_dir):  # s3://, gs://, file:// run storage stays as written
        out = Path(cfg.output_dir).expanduser()
        cfg.output_dir = str(out if out.is_absolute() else (base_dir or Path.cwd()) / out)
        bad = sorted(set("?#") & set(cfg.output_dir))
        if bad:  # the default MLflow store is a sqlite:/// URI of this path, where '?' and '#' start other parts
            raise ConfigError(f"config key 'output_dir' = {cfg.output_dir!r} contains {' and '.join(map(repr, bad))}, "
                              f"which a store URI reads as the start of a query: choose a path without them")
    return cfg


def _check_speed_and_deadline(cfg: ExperimentConfig) -> None:
    speed, default = cfg.client_speed, ClientSpeedConfig()
    changed = [f.name for f in dataclasses.fields(speed) if getattr(speed, f.name) != getattr(default, f.name)]
    if speed.kind == "none" and changed:
        raise ConfigError(f"config key 'client_speed.{changed[0]}' is set but client_speed.kind is 'none': it would "
                          f"have no effect; set client_speed.kind (slow_fraction, lognormal) or remove it")
    fed = cfg.federation
    deadline = "federation.round_deadline_s" if fed.round_deadline_s is not None else (
        "federation.over_selection" if fed.over_selection > 0 else None)
    if deadline and (cfg.privacy.enabled or cfg.secagg.enabled):
        raise ConfigError(f"config key '{deadline}' cannot be used with privacy.enabled or secagg.enabled: keeping "
                          f"the first clients to report makes who is aggregated depend on speed, which the privacy "
                          f"accounting and the SecAgg round do not model (docs/PRIVACY.md); remove it")


def _check_async(cfg: ExperimentConfig) -> None:
    """federation.mode async: the fedbuff section applies, DP and SecAgg are refused (docs/PRIVACY.md)."""
    fb, fed = cfg.fedbuff, cfg.federation
    if fed.mode != "async":
        changed = [f.name for f in dataclasses.fields(fb) if getattr(fb, f.name) != getattr(FedBuffConfig(), f.name)]
        if changed:
            raise ConfigError(f"config key 'fedbuff.{changed[0]}' is set but federation.mode is 'sync': it would have "
                              f"no effect; set federation.mode=async or remove it")
        return
    if cfg.privacy.enabled:
        raise ConfigError("federation.mode async with privacy.enabled is refused: the DP accountant assumes every "
                          "round Poisson-samples clients independently, which asynchronous training does not do "
                          "(who trains next depends on who finished); use federation.mode: sync (docs/PRIVACY.md)")
    if cfg.secagg.enabled:
        raise ConfigError("federation.mode async with secagg.enabled is refused: SecAgg unmasks only the sum of a "
                          "cohort that runs the protocol together, and FedBuff's buffer takes updates one at a time "
                          "from clients of different global versions; use federation.mode: sync (docs/PRIVACY.md)")
    if fed.round_deadline_s is not None or fed.over_selection > 0:
        raise ConfigError("config keys 'federation.round_deadline_s' and 'federation.over_selection' are for "
                          "synchronous rounds: federation.mode async never waits for a round; remove them")
    if fb.concurrency is not None and fb.concurrency > fed.num_clients:
        raise ConfigError(f"config key 'fedbuff.concurrency' = {fb.concurrency} is out of range: must be <= "
                          f"federation.num_clients ({fed.num_clients}): a client trains one task at a time")
    if fb.staleness_exponent != FedBuffConfig().staleness_exponent and fb.staleness != "polynomial":
        raise ConfigError(f"config key 'fedbuff.staleness_exponent' is set but fedbuff.staleness is "
                          f"{fb.staleness!r}: it only applies to 'polynomial'; set fedbuff.staleness=polynomial")


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the package ("quickstart", "paper/caltech101_b2n_16shot", ...)."""
    return sorted(p.relative_to(CONFIGS_DIR).with_suffix("").as_posix() for p in CONFIGS_DIR.rglob("*.yaml"))


def resolve_config_path(path: str | Path | None) -> Path:
    """An existing file path wins; else a packaged config name (with or without .yaml, with or
    without a leading configs/); None is the quickstart."""
    if path is None:
        return QUICKSTART
    path = Path(path).expanduser()
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removeprefix("configs/")
    packaged = CONFIGS_DIR / f"{name}.yaml"
    if not path.is_absolute() and packaged.is_file():
        return packaged
    raise ConfigError(f"config file not found: {path} (pass an existing YAML file or a packaged config name "
                      f"to --config; `fedpgp-ray configs` lists the names)")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Load a YAML config (the quickstart when `path` is None) and apply overrides."""
    path = resolve_config_path(path)
    data = read_config_file(path)
    tracking = data.setdefault("tracking", {}) if isinstance(data.get("tracking", {}), dict) else {}
    if "config_file" not in tracking:  # provenance: a packaged config by its name, else the file's path
        packaged = path.resolve().is_relative_to(CONFIGS_DIR.resolve())
        tracking["config_file"] = (path.resolve().relative_to(CONFIGS_DIR.resolve()).as_posix() if packaged
                                   else str(path.resolve()))
    return config_from_dict(data, overrides)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for tracking params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
