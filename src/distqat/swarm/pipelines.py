"""Pure functions over the swarm's view: complete pipelines, stage assignment, free replica indices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set

from distqat.swarm.records import ServerInfo


def count_complete_pipelines(replicas_by_stage: Mapping[str, Sequence[object]], stage_names: Sequence[str]) -> int:
    """A pipeline needs one replica of every stage: their number is the smallest replica count."""
    if not stage_names:
        return 0
    return min(len(replicas_by_stage.get(stage, ())) for stage in stage_names)


def missing_stages(replicas_by_stage: Mapping[str, Sequence[object]], stage_names: Sequence[str]) -> list[str]:
    return [stage for stage in stage_names if not replicas_by_stage.get(stage)]


def _throughput(replicas: Sequence[object]) -> float:
    return sum(getattr(info, "samples_per_s", 0.0) for info in replicas)


def stage_with_fewest_replicas(replicas_by_stage: Mapping[str, Sequence[object]], stage_names: Sequence[str]) -> str:
    """Where a new server helps most: the stage with the fewest replicas; on ties the one with the lowest
    announced throughput (the bottleneck), then the earliest."""

    def need(stage: str) -> tuple[int, float, int]:
        replicas = replicas_by_stage.get(stage, ())
        return len(replicas), _throughput(replicas), stage_names.index(stage)

    return min(stage_names, key=need)


def stage_to_fill(
    replicas_by_stage: Mapping[str, Sequence[ServerInfo]], stage_names: Sequence[str], uid: str
) -> str | None:
    """The empty stage the server `uid` should move to, or None when it should stay.

    Only one server is designated, so that servers looking at the same view do not all move: the stage
    with the most replicas (at least 2, the latest stage on ties) gives its slowest replica (the highest
    replica index on ties). The earliest empty stage is filled first.
    """
    empty = [stage for stage in stage_names if not replicas_by_stage.get(stage)]
    donors = [stage for stage in stage_names if len(replicas_by_stage.get(stage, ())) >= 2]
    if not empty or not donors:
        return None
    donor = max(donors, key=lambda stage: (len(replicas_by_stage[stage]), stage_names.index(stage)))
    mover = min(replicas_by_stage[donor], key=lambda info: (info.samples_per_s, -info.expert_index))
    return empty[0] if mover.uid == uid else None


def free_expert_index(taken: Set[int], max_expert_index: int) -> int:
    """The smallest replica index not in use; raises ValueError when all are taken."""
    for index in range(max_expert_index):
        if index not in taken:
            return index
    raise ValueError(f"all {max_expert_index} expert indices are taken (raise max_expert_index)")
