"""Pure functions over the swarm's view: complete pipelines, stage assignment, free replica indices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set


def count_complete_pipelines(replicas_by_stage: Mapping[str, Sequence[object]], stage_names: Sequence[str]) -> int:
    """A pipeline needs one replica of every stage: their number is the smallest replica count."""
    if not stage_names:
        return 0
    return min(len(replicas_by_stage.get(stage, ())) for stage in stage_names)


def missing_stages(replicas_by_stage: Mapping[str, Sequence[object]], stage_names: Sequence[str]) -> list[str]:
    return [stage for stage in stage_names if not replicas_by_stage.get(stage)]


def stage_with_fewest_replicas(replicas_by_stage: Mapping[str, Sequence[object]], stage_names: Sequence[str]) -> str:
    """Where a new server helps most: the stage with the fewest replicas, the earliest stage on ties."""
    return min(stage_names, key=lambda stage: (len(replicas_by_stage.get(stage, ())), stage_names.index(stage)))


def free_expert_index(taken: Set[int], max_expert_index: int) -> int:
    """The smallest replica index not in use; raises ValueError when all are taken."""
    for index in range(max_expert_index):
        if index not in taken:
            return index
    raise ValueError(f"all {max_expert_index} expert indices are taken (raise max_expert_index)")
