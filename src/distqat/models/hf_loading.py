"""Loading a local Hugging Face model folder (`model_pipeline.pretrained_path`), with one-line errors.

The hub cannot be reached from every machine; a folder written by `save_pretrained` (or a downloaded
snapshot) is what `pretrained_path` names. Problems name the folder and what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from distqat.errors import ModelError


def pretrained_config(path: str, model_type: str) -> PretrainedConfig:
    from transformers import AutoConfig

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model_pipeline.pretrained_path: {path}: no config.json (expected a Hugging Face model folder)"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ModelError(f"model_pipeline.pretrained_path: {path}: unreadable config.json: {error}") from None
    if config.model_type != model_type:
        raise ModelError(
            f"model_pipeline.pretrained_path: {path} holds a '{config.model_type}' model, not '{model_type}'"
        )
    return config


def from_pretrained(model_class: type[PreTrainedModel], path: str, **kwargs: Any) -> PreTrainedModel:
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"model_pipeline.pretrained_path: {path}: cannot load weights: {first}") from None
    return model.train()
