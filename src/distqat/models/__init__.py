"""Model registry: `family.stage` names -> stage builders (built-in families are imported on first use)."""

from distqat.models.registry import (
    StageEntry,
    build_pipeline_stages,
    build_stage,
    get_stage_entry,
    register_expert_class,
    registered_names,
)

__all__ = [
    "StageEntry",
    "build_pipeline_stages",
    "build_stage",
    "get_stage_entry",
    "register_expert_class",
    "registered_names",
]
