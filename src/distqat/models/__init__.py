"""Model registry: `family.stage` names -> stage builders (built-in families are imported on first use)."""

from distqat.models.registry import (
    StageEntry,
    build_pipeline_stage,
    build_pipeline_stages,
    build_stage,
    get_stage_entry,
    load_model_module,
    prepare_pipeline,
    register_expert_class,
    register_family,
    registered_names,
    stage_ranges,
)

__all__ = [
    "StageEntry",
    "build_pipeline_stage",
    "build_pipeline_stages",
    "build_stage",
    "get_stage_entry",
    "load_model_module",
    "prepare_pipeline",
    "register_expert_class",
    "register_family",
    "registered_names",
    "stage_ranges",
]
