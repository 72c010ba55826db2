"""Injected faults (tests, failure drills): which actor to kill, crash, hang or fail, and when."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

FAULTS_ENV = "FEDPGP_RAY_FAULTS"


@dataclass
class FaultPlan:
    """Injected faults, for tests and failure drills (default: none). Also read as JSON from
    $FEDPGP_RAY_FAULTS, e.g. '{"exit": [[1, 3]], "fail": [5]}'.

    kill: (round, client) pairs: right after first submitting that client's fit, the driver
        `ray.kill`s the actor serving it (mid-round, with the task in flight); once per pair.
    exit: (round, client) pairs: the actor process exits (`os._exit(1)`) when it starts that
        client's fit, on the first attempt only.
    fail: clients whose fit raises on every attempt.
    hang: (round, client) pairs: the actor hangs (sleeps, alive) in that client's fit, on the first
        attempt only; `runtime.task_timeout_s` ends it.
    kill_after_fit, kill_after_evaluate: (round, client) pairs: once that client's fit (evaluate)
        result has arrived, the driver `ray.kill`s the actor that served it (a `kill -9` of an actor
        that holds finished clients); its next task fails and a replacement restores from the store.
    slow: round -> seconds: every fit of that round first sleeps that long (JSON: [[round, seconds]]). It
        holds a round open so that a fault from outside (a test killing a node) lands mid-round; the
        training itself is unchanged.
    """
    kill: set[tuple[int, int]] = field(default_factory=set)
    exit: set[tuple[int, int]] = field(default_factory=set)
    fail: set[int] = field(default_factory=set)
    hang: set[tuple[int, int]] = field(default_factory=set)
    fired: set[tuple[int, int]] = field(default_factory=set)  # the kills already done
    # (round, SecAgg stage, client): the actor serving that client is killed just before the stage is sent
    secagg_kill: set[tuple[int, str, int]] = field(default_factory=set)
    kill_after_fit: set[tuple[int, int]] = field(default_factory=set)
    kill_after_evaluate: set[tuple[int, int]] = field(default_factory=set)
    fired_after: set[tuple[str, int, int]] = field(default_factory=set)  # kill_after_* already done
    slow: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str | None) -> "FaultPlan":
        data = json.loads(text) if text else {}
        return cls(kill={tuple(p) for p in data.get("kill", [])}, exit={tuple(p) for p in data.get("exit", [])},
                   fail=set(data.get("fail", [])), hang={tuple(p) for p in data.get("hang", [])},
                   secagg_kill={tuple(p) for p in data.get("secagg_kill", [])},
                   kill_after_fit={tuple(p) for p in data.get("kill_after_fit", [])},
                   kill_after_evaluate={tuple(p) for p in data.get("kill_after_evaluate", [])},
                   slow={int(r): float(s) for r, s in data.get("slow", [])})

    def kill_after(self, method: str, rnd: int, client_id: int) -> bool:
        """Whether to kill the actor that just returned this client's `method` result (once per pair)."""
        planned = self.kill_after_fit if method == "fit" else self.kill_after_evaluate
        if (rnd, client_id) not in planned or (method, rnd, client_id) in self.fired_after:
            return False
        self.fired_after.add((method, rnd, client_id))
        return True

    def fault_for(self, method: str, rnd: int, client_id: int, attempt: int) -> str | None:
        """The fault to inject into this attempt of a client's task (only fits are faulted)."""
        if method != "fit":
            return None
        if attempt == 0 and (rnd, client_id) in self.exit:
            return "exit"
        if attempt == 0 and (rnd, client_id) in self.hang:
            return "hang"
        if client_id in self.fail:
            return "fail"
        return f"sleep {self.slow[rnd]}" if rnd in self.slow else None
