"""Stage-state files: a folder with every saved stage's state_dict (safetensors) and a JSON manifest.

Layout (format `distqat-stage-state`, version 1), what `distqat baseline --save-state DIR` writes and
`distqat export --checkpoint DIR` reads:

    DIR/manifest.json        {"format", "version", "config": <the resolved config>, "stages": [
                               {"index", "name", "model_name", "file"}, ...]}
    DIR/<stage name>.safetensors   the stage module's state_dict (params and buffers, LSQ steps included)

The config is embedded so a reader rebuilds exactly the modules (architecture, cut, quant scheme) the
tensors belong to. Checkpoints of the swarm (issue 9) are meant to use the same layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from distqat.config import Config, format_validation_error
from distqat.errors import ConfigError

FORMAT, VERSION = "distqat-stage-state", 1


def save_stage_states(directory: Path, config: Config, stages: dict[int, nn.Module]) -> Path:
    """Write the given stages (by pipeline index) and the manifest; returns the manifest's path."""
    directory.mkdir(parents=True, exist_ok=True)
    names = config.model_pipeline.stage_names
    entries = []
    for index, module in sorted(stages.items()):
        file = f"{names[index]}.safetensors"
        # Copies: safetensors refuses tensors that share memory (tied weights) or are not contiguous.
        tensors = {key: value.detach().cpu().contiguous().clone() for key, value in module.state_dict().items()}
        save_file(tensors, str(directory / file))
        entries.append(
            {
                "index": index,
                "name": names[index],
                "model_name": config.model_pipeline.pipeline[index].model_name,
                "file": file,
            }
        )
    manifest = {"format": FORMAT, "version": VERSION, "config": config.model_dump(mode="json"), "stages": entries}
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


def read_manifest(directory: Path) -> tuple[Config, list[dict[str, Any]]]:
    """The config and the stage entries of a stage-state folder; one-line ConfigError if it is not one."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ConfigError(
            f"--checkpoint {directory}: no manifest.json (not a stage-state folder; a swarm's checkpoint folder "
            "needs --config)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON: {error}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    try:
        config = Config.model_validate(manifest["config"])
    except ValidationError as error:
        raise ConfigError(f"{path}: config: {format_validation_error(error)}") from None
    return config, manifest["stages"]


def load_stage_state(directory: Path, entry: dict[str, Any], module: nn.Module) -> None:
    """Load one stage's tensors into a module built from the manifest's config."""
    file = Path(directory) / entry["file"]
    if not file.is_file():
        raise ConfigError(f"{file}: missing (listed in {Path(directory) / 'manifest.json'})")
    try:
        module.load_state_dict(load_file(str(file)))
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise ConfigError(f"{file}: does not fit stage '{entry['name']}': {' '.join(first[:2])[:300]}") from None
