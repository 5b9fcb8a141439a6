"""When a stage's replicas average: progress counted in samples across all of them.

Trainers route micro-batches to replicas by throughput, so replicas of one stage take inner steps at
different rates; a replica that waited for its own `inner_steps` would reach it long before a slower
one and find nobody to average with. Instead every replica announces the samples it trained since its
last averaging attempt, and a round is due for all of them at once when, together, the replicas at the
same round have trained `inner_steps` steps' worth of samples each. Each then weighs its pseudo-gradient
by the samples it really trained.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerProgress:
    round: int  # DiLoCo rounds applied
    samples: int  # samples trained since its last averaging attempt
    updated_at: float  # unix time of the record
    averaging: bool = False  # in an averaging round right now


def stage_samples(own_round: int, own_samples: int, peers: Iterable[PeerProgress], since: float) -> tuple[int, int]:
    """(replicas, samples) of the stage at `own_round`, this one included.

    Records older than `since` (our last attempt) are skipped: a peer's count from before that attempt
    is stale and would trigger another round at once.
    """
    replicas, samples = 1, own_samples
    for peer in peers:
        if peer.round == own_round and peer.updated_at >= since:
            replicas += 1
            samples += peer.samples
    return replicas, samples


def round_due(
    own_round: int, own_samples: int, peers: Iterable[PeerProgress], since: float, samples_per_replica: int
) -> bool:
    """True when the replicas at this round have trained `samples_per_replica` samples each, on average,
    or when another replica at this round has started averaging (its view of the progress was newer)."""
    if own_samples <= 0:
        return False  # nothing of ours to average yet
    peers = list(peers)
    if any(peer.averaging and peer.round == own_round for peer in peers):
        return True
    replicas, samples = stage_samples(own_round, own_samples, peers, since)
    return samples >= samples_per_replica * replicas


def ahead_of(own_round: int, peers: Iterable[PeerProgress]) -> int | None:
    """The highest round a live peer has applied, if it is past ours: we missed a round and must catch up."""
    highest = max((peer.round for peer in peers), default=own_round)
    return highest if highest > own_round else None
