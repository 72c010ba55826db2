"""Ray runtime: a pool of client actors (one frozen CLIP each, many logical clients) and a server actor.

Layout (config `runtime.kind: ray`):

* `runtime.num_actors` client actors, each a `ClientWorker` built once (frozen CLIP, partition,
  cached image features). Each actor is created inside a placement group with explicit
  `num_cpus` and a fractional `num_gpus`; start-up fails with `PlacementError` instead of
  hanging when the bundles cannot be placed within `runtime.placement_timeout_s`.
* Clients are sticky where it costs nothing and balanced always (`runtime.assign.balanced_slots`):
  a sampled client goes to its home slot `cid % num_actors` unless that actor already has its fair
  share of the phase's clients, then to the least-loaded actor. Each actor keeps a bounded LRU of
  personal states (`runtime.client_state_cache`) over the run's `CheckpointStore`, written after every
  turn; the driver sends each task the round that last trained the client, so a stale cached copy is
  read again from the store.
* A server actor hosts `fedpgp_ray.server.Server` (global parameters, sample-weighted
  aggregation, atomic per-round checkpoints); the driver talks to it through `ServerProxy`,
  which has the Server's methods.
* Every fit/evaluate phase puts the global parameters into the object store once (`ray.put`)
  and passes the reference as a top-level task argument (nested references are not resolved).
* Dispatch is a small `ray.wait` loop (not `ray.util.ActorPool`, whose dead-actor handling
  differs between Ray 2.55 and 2.60). When an actor dies (`RayActorError`) it is replaced in its
  slot, the client it was running is charged one attempt, its other queued clients are re-queued
  for free; a client that fails more than `runtime.max_client_retries` times is dropped from the
  phase and reported as a `ClientFailure` (the strategy counts it as `clients_failed` and
  enforces `federation.min_reporting_clients`). An actor whose running task exceeds
  `runtime.task_timeout_s` (default: max(600 s, 10 x the slowest task so far); `task_timeout`) is
  treated as hung: killed, then handled like a dead one. Actor replacements, retries and timeouts are
  added to the round metrics (`actor_restarts`, `client_retries`, `tasks_timed_out`, `eval_*` for the
  evaluation phase).

Ray itself: an already initialised Ray is reused; else `runtime.address` or `RAY_ADDRESS` is
attached to (never with num_cpus/num_gpus); else a running `ray start` cluster on this machine;
else a local instance sized for the pool is started, and only that one is shut down by `close()`.

Modules: `actors` (what runs inside Ray: ClientActor, ServerActor), `placement` (attach to or start
Ray, place the actors' bundles), `dispatch` (one fit/evaluate phase over the pool, with replacements,
retries and timeouts), `faults` (injected faults for tests and drills), `server_proxy` (the driver's
handle on the server actor), `runtime` (RayRuntime, which ties them together).
"""
from __future__ import annotations

from fedpgp_ray.runtime.ray.actors import ClientActor, ServerActor
from fedpgp_ray.runtime.ray.dispatch import task_timeout
from fedpgp_ray.runtime.ray.faults import FaultPlan
from fedpgp_ray.runtime.ray.placement import GpuFallbackWarning, PlacementError
from fedpgp_ray.runtime.ray.runtime import RayRuntime
from fedpgp_ray.runtime.ray.server_proxy import ServerProxy

__all__ = ["ClientActor", "FaultPlan", "GpuFallbackWarning", "PlacementError", "RayRuntime", "ServerActor",
           "ServerProxy", "task_timeout"]
