"""Stage checkpoints on disk: one safetensors file of tensors plus a JSON manifest, written atomically.

A checkpoint holds a replica's whole state (module, inner optimiser, DiLoCo's θ₀ and outer optimiser,
step counters) so that a server filling a stage that lost every replica resumes where the stage was.
Nested state dicts are split into a JSON skeleton and a flat dict of tensors (`split_tensors`), so the
tensors stay readable by any safetensors tool and nothing is unpickled on load.

Layout: `<dir>/<stage>/ckpt-<seq>.safetensors` and `ckpt-<seq>.json`; the manifest is renamed into place
last, so a checkpoint without its manifest is incomplete and ignored. The manifest names the model's
stage layout (`fingerprint`): a checkpoint of another model or another cut is refused, never half-loaded.
It also holds a digest of the tensors file, so a truncated or corrupted file is detected before loading
and skipped in favour of the previous checkpoint. Writers of one stage folder on one machine (replicas,
the param mirror) take an exclusive lock, so two never pick the same sequence number.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

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


def stage_fingerprint(model_name: str, module_state: dict[str, torch.Tensor]) -> str:
    """What a stage checkpoint must match: the stage's model and the exact names and shapes of its state."""
    return fingerprint(
        {"model": model_name, "state": [(name, list(tensor.shape)) for name, tensor in module_state.items()]}
    )


def module_fingerprint(model_name: str, module: nn.Module) -> str:
    return stage_fingerprint(model_name, module.state_dict())


def rng_state() -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, Python), to checkpoint with a replica."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Any) -> None:
    """Put back what `rng_state` saved; a missing or malformed part is left as it is (not worth failing a load)."""
    if not isinstance(state, dict):
        return
    if isinstance(state.get("torch"), torch.Tensor):
        torch.set_rng_state(state["torch"])
    python = state.get("python")
    if isinstance(python, list) and len(python) == 3:
        random.setstate((python[0], tuple(python[1]), python[2]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    path: Path  # the manifest
    manifest: dict[str, Any]

    @property
    def tensors_path(self) -> Path:
        return self.path.with_suffix(".safetensors")


def _fsync_write(path: Path, write) -> str:
    """Write through a temporary file, fsync it, rename it into place; returns the file's digest."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        digest = file_digest(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return digest


def _fsync_folder(folder: Path) -> None:
    # The renames themselves must reach the disk, or a power cut could leave the manifest's rename undone.
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of writers that died mid-write (their pid is gone)."""
    for path in folder.glob(".ckpt-*.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageCheckpoints:
    """The checkpoints of one stage in one folder: write the newest, keep the last `keep`, load the newest valid."""

    def __init__(
        self,
        root: Path,
        stage: str,
        fingerprint: str,
        keep: int = 3,
        config_hash: str | None = None,
        newer_than: float | None = None,
    ):
        self.folder = Path(root) / stage
        self.stage, self.fingerprint, self.keep = stage, fingerprint, keep
        self.config_hash = config_hash  # written into every manifest; a difference is reported, not refused
        self.newer_than = newer_than  # Unix time: older checkpoints belong to an earlier run and are ignored

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

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def write(self, skeleton: Any, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
        """`save` of a state already split (so copied) by `split_tensors`: the slow part, off the compute thread."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            _remove_stale_temporaries(self.folder)
            existing = self.list()
            sequence = int(_NAME.match(existing[0].path.name).group(1)) + 1 if existing else 1
            path = self.folder / f"ckpt-{sequence:08d}.json"
            digest = _fsync_write(path.with_suffix(".safetensors"), lambda target: save_file(tensors, str(target)))
            full_manifest = {
                **manifest,
                "format": CHECKPOINT_FORMAT,
                "stage": self.stage,
                "fingerprint": self.fingerprint,
                "config_hash": self.config_hash,
                "saved_at": time.time(),
                "tensors_digest": digest,
                "state": skeleton,
            }
            _fsync_write(path, lambda target: target.write_text(json.dumps(full_manifest)))
            _fsync_folder(self.folder)
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
            if self.newer_than is not None and float(checkpoint.manifest.get("saved_at") or 0) < self.newer_than:
                logger.debug("ignoring checkpoint %s: written before this run started", checkpoint.path)
                continue
            problem = self.problem(checkpoint)
            if problem:
                logger.warning("skipping checkpoint %s: %s", checkpoint.path, problem)
                continue
            try:
                tensors = load_file(str(checkpoint.tensors_path))
                state = join_tensors(checkpoint.manifest["state"], tensors)
            except (OSError, SafetensorError, KeyError, ValueError, TypeError) as error:
                logger.warning("skipping checkpoint %s: unreadable tensors (%s)", checkpoint.path, error)
                continue
            written_under = checkpoint.manifest.get("config_hash")
            if self.config_hash and written_under and written_under != self.config_hash:
                logger.info(
                    "checkpoint %s was written under another config (hash %s, now %s); model and cut match: loading",
                    checkpoint.path,
                    written_under,
                    self.config_hash,
                )
            return checkpoint, state
        return None

    def newest_valid(self) -> tuple[Checkpoint | None, str | None]:
        """The newest checkpoint that would load (manifest fits, tensors intact), without loading it; else
        (None, why the newest one was refused, or None when there is none at all)."""
        first_problem = None
        for checkpoint in self.list():
            if self.newer_than is not None and float(checkpoint.manifest.get("saved_at") or 0) < self.newer_than:
                continue
            problem = self.problem(checkpoint)
            if problem is None:
                return checkpoint, None
            first_problem = first_problem or f"{checkpoint.path}: {problem}"
        return None, first_problem

    def problem(self, checkpoint: Checkpoint) -> str | None:
        """Why this checkpoint cannot be loaded here (another model or cut, damaged tensors), or None."""
        problem = self._mismatch(checkpoint.manifest)
        if problem:
            return problem
        expected = checkpoint.manifest.get("tensors_digest")
        try:
            if expected is not None and file_digest(checkpoint.tensors_path) != expected:
                return "its tensors file is truncated or corrupt (digest differs from the manifest's)"
        except OSError as error:
            return f"its tensors file cannot be read ({error})"
        return None

    def _mismatch(self, manifest: dict[str, Any]) -> str | None:
        if manifest.get("format") != CHECKPOINT_FORMAT:
            return f"format {manifest.get('format')!r}, this version reads {CHECKPOINT_FORMAT}"
        if manifest.get("stage") != self.stage:
            return f"it holds stage '{manifest.get('stage')}', not '{self.stage}'"
        if manifest.get("fingerprint") != self.fingerprint:
            model = manifest.get("model")
            return (
                "it was written for another model or stage cut (fingerprint differs"
                + (f"; it holds '{model}'" if model else "")
                + ")"
            )
        return None
