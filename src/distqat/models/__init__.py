"""Model registry: `family.stage` names -> stage builders. Importing this package registers the built-in families."""

from distqat.models import resnet, tiny  # noqa: F401  (registers their stages)
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
