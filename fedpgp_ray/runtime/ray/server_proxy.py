"""The driver's handle on the server actor, with the Server's methods."""
from __future__ import annotations

from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from fedpgp_ray.algorithms import Params
from fedpgp_ray.client import EvalResult, FitResult
from fedpgp_ray.runtime.ray.actors import unwrap
from fedpgp_ray.strategy import ClientFailure, RoundFailedError


class ServerProxy:
    """The driver's handle on the server actor, with `Server`'s methods.

    aggregate_train / aggregate_evaluate also report the runtime's fault counters of that
    phase (actor restarts, client retries), so they land in the round's metrics.
    """

    def __init__(self, actor: Any, phase_metrics: Callable[[str], dict[str, float]],
                 output_dir: str = "<output_dir>") -> None:
        self.actor = actor
        self.output_dir = output_dir  # named in the one line that reports a dead server actor
        self.phase_metrics = phase_metrics  # the runtime's fault counters of a phase ("fit" / "evaluate")

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return ray.get(self.actor.call.remote(method, *args))
        except RayTaskError as err:
            raise unwrap(err) from None
        except RayActorError as err:  # killed, or its node lost: the checkpoints hold every completed round
            cause = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise RoundFailedError(f"the server actor died during {method} ({type(err).__name__}: {cause}): the "
                                   f"completed rounds are checkpointed; continue with `fedpgp-ray run --resume "
                                   f"{self.output_dir}`") from None

    def global_params(self) -> Params:
        return self._call("global_params")

    def start_round(self) -> int:
        return self._call("start_round")

    def get_history(self) -> list[dict[str, Any]]:
        return self._call("get_history")

    def aggregate_train(self, rnd: int, results: list[FitResult], failures: list[ClientFailure]) -> dict[str, float]:
        metrics = self._call("aggregate_train", rnd, results, failures)
        return {**metrics, **self.phase_metrics("fit")}

    def aggregate_evaluate(self, rnd: int, results: list[EvalResult]) -> dict[str, float]:
        metrics = self._call("aggregate_evaluate", rnd, results)
        return {**metrics, **self.phase_metrics("evaluate")}

    def finish_round(self, rnd: int, report: dict[str, Any]) -> None:
        self._call("finish_round", rnd, report)

    def secagg_start(self, rnd: int, clients: list[int]) -> dict[int, Any]:
        return self._call("secagg_start", rnd, clients)

    def secagg_step(self, stage: str, responses: dict[int, Any]) -> dict[int, Any] | None:
        return self._call("secagg_step", stage, responses)
