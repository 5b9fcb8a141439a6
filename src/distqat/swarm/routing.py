"""Routing policy (pure): which replica of a stage gets the next micro-batch.

Replicas are drawn at random, weighted by the throughput they announce divided by their queue (SWARM's
stochastic wiring), so fast, idle replicas get more work and no replica is starved; a replica that failed
a call is avoided for `ban_time` seconds. `on_lost(uid, why)` is told once when a replica leaves the
usable set (banned after a failure, or gone from the DHT), which is when failover is detected;
`on_found(uid)` when a server (a peer serving a uid) first appears, which is when a gap is seen filled.

A replica that has not measured its throughput yet and that this router has never used gets the next
micro-batch of its stage at once: a server that just filled a gap starts working within one step, not
after a weighted draw happens to land on it (which took ~6 s at the average weight). After that one probe
it is drawn at the average measured rate until it announces its own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence

from distqat.errors import NoReplicaError
from distqat.swarm.records import ServerInfo


def _ban_key(info: ServerInfo) -> str:
    # The peer, not only the uid: a new server that takes a dead one's free replica index is not banned.
    return f"{info.uid}@{info.peer_id}"


def replica_weight(info: ServerInfo, default_rate: float) -> float:
    """Expected share of the work: announced samples/s (default for a replica that has not measured it yet)
    over the calls already queued on it."""
    rate = info.samples_per_s if info.samples_per_s > 0 else default_rate
    return rate / (1 + max(0, info.queue))


class Router:
    def __init__(
        self,
        stage_names: Sequence[str],
        ban_time: float,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_lost: Callable[[str, str], None] | None = None,
        on_found: Callable[[str], None] | None = None,
    ):
        self.stage_names = list(stage_names)
        self.ban_time = ban_time
        self._rng = rng or random.Random()
        self._clock = clock
        self._on_lost, self._on_found = on_lost, on_found
        self._replicas: dict[str, list[ServerInfo]] = {stage: [] for stage in stage_names}
        self._banned_until: dict[str, float] = {}
        self._probed: set[str] = set()  # unmeasured replicas that already got their first micro-batch

    def update(self, replicas_by_stage: Mapping[str, Sequence[ServerInfo]]) -> None:
        before = {info.uid for stage in self.stage_names for info in self.usable(stage)}
        known = {_ban_key(info) for stage in self.stage_names for info in self._replicas[stage]}
        self._replicas = {stage: list(replicas_by_stage.get(stage, ())) for stage in self.stage_names}
        after = {info.uid for stage in self.stage_names for info in self._replicas[stage]}
        for uid in sorted(before - after):
            self._lost(uid, "gone from the DHT")
        if self._on_found is not None:
            for info in (info for stage in self.stage_names for info in self._replicas[stage]):
                if _ban_key(info) not in known:
                    self._on_found(info.uid)

    def ban(self, replica: ServerInfo) -> None:
        key = _ban_key(replica)
        was_usable = self._banned_until.get(key, 0.0) <= self._clock()
        self._banned_until[key] = self._clock() + self.ban_time
        if was_usable:
            self._lost(replica.uid, "failed a call")

    def _lost(self, uid: str, why: str) -> None:
        if self._on_lost is not None:
            self._on_lost(uid, why)

    def usable(self, stage: str) -> list[ServerInfo]:
        now = self._clock()
        return [info for info in self._replicas.get(stage, []) if self._banned_until.get(_ban_key(info), 0.0) <= now]

    def pick(self, stage: str) -> ServerInfo:
        candidates = self.usable(stage)
        if not candidates:
            known = len(self._replicas.get(stage, []))
            raise NoReplicaError(
                f"stage '{stage}' has no usable replica ({known} known, all recently failed)"
                if known
                else f"stage '{stage}' has no live replica"
            )
        for info in candidates:
            if info.samples_per_s <= 0 and _ban_key(info) not in self._probed:
                self._probed.add(_ban_key(info))
                return info
        known_rates = [info.samples_per_s for info in candidates if info.samples_per_s > 0]
        # A replica that has not measured its throughput yet gets the average rate, so it is tried.
        default_rate = sum(known_rates) / len(known_rates) if known_rates else 1.0
        weights = [replica_weight(info, default_rate) for info in candidates]
        return self._rng.choices(candidates, weights=weights, k=1)[0]

    def has_route(self) -> bool:
        return all(self.usable(stage) for stage in self.stage_names)
