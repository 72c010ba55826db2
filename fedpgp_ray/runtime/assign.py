"""Which worker serves which sampled client in a phase: sticky where it costs nothing, balanced always."""
from __future__ import annotations

import math


def home_slot(client_id: int, num_slots: int) -> int:
    """The worker a client returns to when it can (its state and features are likely cached there)."""
    return client_id % num_slots


def balanced_slots(client_ids: list[int], num_slots: int) -> dict[int, list[int]]:
    """slot -> its clients (sorted) for one phase. A client goes to its home slot while that slot holds
    fewer than ceil(m / num_slots) of the phase's m clients; the overflow goes, in client order, to the
    slots with the fewest (lowest slot first on ties). No slot gets more than its fair share, so a round
    never waits on one overloaded worker; with an even spread of ids nothing moves."""
    fair = math.ceil(len(client_ids) / num_slots) if client_ids else 0
    slots: dict[int, list[int]] = {s: [] for s in range(num_slots)}
    overflow = []
    for cid in sorted(client_ids):
        home = slots[home_slot(cid, num_slots)]
        (home if len(home) < fair else overflow).append(cid)
    for cid in overflow:
        slot = min(slots, key=lambda s: (len(slots[s]), s))
        slots[slot].append(cid)
    return {s: sorted(ids) for s, ids in slots.items()}
