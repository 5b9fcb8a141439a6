"""Stage checkpoints on disk: one safetensors file of tensors plus a JSON manifest, written atomically.

A checkpoint holds a replica's whole state (module, inner optimiser, DiLoCo's θ₀ and outer optimiser,
step counters) so that a server filling a stage that lost every replica resumes where the stage was.
Nested state dicts are split into a JSON skeleton and a flat dict of tensors (`split_tensors`), so the
tensors stay readable by any safetensors tool and nothing is unpickled on load.

Layout: `<dir>/<stage>/ckpt-<seq>.safetensors` and `ckpt-<seq>.json`; the manifest is renamed into place
last, so a checkpoint without its manifest is incomplete and ignored. The manifest names the model's
stage layout (`fingerprint`): a checkpoint of another model or another cut is refused, never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8})\.json$")
_TENSOR = "__tensor__"


def split_tensors(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able skeleton, tensors by path) of a nest of dicts, lists, tensors and plain values."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().clone()  # a copy: training goes on while it is written
            return {_TENSOR: path}
        if isinstance(value, dict):
            # Keys become strings in JSON: remember which were ints (torch optimisers index state by int).
            return {"__dict__": [[key, walk(item, f"{path}/{key}")] for key, item in value.items()]}
        if isinstance(value, (list, tuple)):
            return [walk(item, f"{path}/{index}") for index, item in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a value of type {type(value).__name__} at '{path or '/'}'")

    return walk(state, prefix), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`; raises KeyError when a tensor is missing."""
    if isinstance(skeleton, dict) and _TENSOR in skeleton:
        return tensors[skeleton[_TENSOR]]
    if isinstance(skeleton, dict):
        return {key: join_tensors(item, tensors) for key, item in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [join_tensors(item, tensors) for item in skeleton]
    return skeleton


def fingerprint(description: Any) -> str:
    """A short hash of what must match for a state to fit (model names, stage cut, architecture)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class Checkpoint:
    path: Path  # the manifest
    manifest: dict[str, Any]

    @property
    def tensors_path(self) -> Path:
        return self.path.with_suffix(".safetensors")


def _fsync_write(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class StageCheckpoints:
    """The checkpoints of one stage in one folder: write the newest, keep the last `keep`, load the newest valid."""

    def __init__(self, root: Path, stage: str, fingerprint: str, keep: int = 3):
        self.folder = Path(root) / stage
        self.stage, self.fingerprint, self.keep = stage, fingerprint, keep

    def list(self) -> list[Checkpoint]:
        """Complete checkpoints (manifest present), newest first; unreadable manifests are skipped."""
        found = []
        for path in self.folder.glob("ckpt-*.json") if self.folder.is_dir() else ():
            if not _NAME.match(path.name):
                continue
            try:
                found.append(Checkpoint(path, json.loads(path.read_text())))
            except (OSError, json.JSONDecodeError) as error:
                logger.warning("skipping checkpoint %s: unreadable manifest (%s)", path, error)
        return sorted(found, key=lambda checkpoint: checkpoint.path.name, reverse=True)

    def save(self, state: dict[str, Any], manifest: dict[str, Any]) -> Path:
        """Write `state` as the newest checkpoint; returns its manifest path. Old ones beyond `keep` go."""
        return self.write(*split_tensors(state), manifest)

    def write(self, skeleton: Any, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
        """`save` of a state already split (so copied) by `split_tensors`: the slow part, off the compute thread."""
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = self.list()
        sequence = int(_NAME.match(existing[0].path.name).group(1)) + 1 if existing else 1
        path = self.folder / f"ckpt-{sequence:08d}.json"
        _fsync_write(path.with_suffix(".safetensors"), lambda target: save_file(tensors, str(target)))
        full_manifest = {
            **manifest,
            "format": CHECKPOINT_FORMAT,
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "saved_at": time.time(),
            "state": skeleton,
        }
        _fsync_write(path, lambda target: target.write_text(json.dumps(full_manifest)))
        for old in self.list()[self.keep :]:
            old.tensors_path.unlink(missing_ok=True)
            old.path.unlink(missing_ok=True)
        return path

    def load_newest(self) -> tuple[Checkpoint, dict[str, Any]] | None:
        """The newest checkpoint that fits this stage and loads, with its state; None if there is none.

        A checkpoint of another model or cut, or a truncated or corrupt file, is logged and skipped in
        favour of the one before it.
        """
        for checkpoint in self.list():
            problem = self._mismatch(checkpoint.manifest)
            if problem:
                logger.warning("skipping checkpoint %s: %s", checkpoint.path, problem)
                continue
            try:
                tensors = load_file(str(checkpoint.tensors_path))
                state = join_tensors(checkpoint.manifest["state"], tensors)
            except (OSError, SafetensorError, KeyError, ValueError, TypeError) as error:
                logger.warning("skipping checkpoint %s: unreadable tensors (%s)", checkpoint.path, error)
                continue
            return checkpoint, state
        return None

    def _mismatch(self, manifest: dict[str, Any]) -> str | None:
        if manifest.get("format") != CHECKPOINT_FORMAT:
            return f"format {manifest.get('format')!r}, this version reads {CHECKPOINT_FORMAT}"
        if manifest.get("stage") != self.stage:
            return f"it holds stage '{manifest.get('stage')}', not '{self.stage}'"
        if manifest.get("fingerprint") != self.fingerprint:
            return "it was written for another model or stage cut (fingerprint differs)"
        return None
