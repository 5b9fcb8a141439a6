"""Stage checkpoints: exact round trip of nested state, newest first, keep-k, and refusing what does not fit."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distqat.checkpoints import StageCheckpoints, join_tensors, restore_rng_state, rng_state, split_tensors
from distqat.config import OptimConfig
from distqat.distributed.optim.diloco import DiLoCo
from distqat.distributed.stage_sync import load_replica_state


def trained_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, DiLoCo]:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    diloco = DiLoCo(list(module.parameters()), OptimConfig(type="sgd", sgd_lr=0.7, sgd_momentum=0.9))
    for _ in range(3):
        optimizer.zero_grad()
        module(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
    return module, optimizer, diloco


def full_state(module, optimizer, diloco) -> dict:
    return {
        "module": module.state_dict(),
        "inner_optimizer": optimizer.state_dict(),
        "diloco": diloco.state_dict(),
        "samples": 24,
    }


def test_split_and_join_round_trip_keeps_int_keys_and_values() -> None:
    module, optimizer, diloco = trained_state()
    state = full_state(module, optimizer, diloco)
    skeleton, tensors = split_tensors(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    restored = join_tensors(json.loads(json.dumps(skeleton)), tensors)
    assert sorted(restored["inner_optimizer"]["state"]) == sorted(state["inner_optimizer"]["state"])  # int keys
    for key, value in state["module"].items():
        assert torch.equal(restored["module"][key], value)
    assert restored["samples"] == 24


def test_a_checkpoint_loads_exactly_into_a_fresh_replica(tmp_path: Path) -> None:
    module, optimizer, diloco = trained_state()
    store = StageCheckpoints(tmp_path, "head", fingerprint="f1")
    store.save(full_state(module, optimizer, diloco), {"steps": 3})
    fresh_module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh_optimizer = torch.optim.Adam(fresh_module.parameters(), lr=0.01)
    fresh_diloco = DiLoCo(list(fresh_module.parameters()), OptimConfig(type="sgd", sgd_lr=0.7, sgd_momentum=0.9))
    checkpoint, state = store.load_newest()
    assert checkpoint.manifest["steps"] == 3
    assert load_replica_state(state, fresh_module, fresh_optimizer, fresh_diloco) is None
    for (name, value), fresh in zip(module.state_dict().items(), fresh_module.state_dict().values(), strict=True):
        assert torch.equal(value, fresh), name
    assert torch.equal(
        optimizer.state_dict()["state"][0]["exp_avg"], fresh_optimizer.state_dict()["state"][0]["exp_avg"]
    )


def test_keeps_the_last_k_and_loads_the_newest(tmp_path: Path) -> None:
    store = StageCheckpoints(tmp_path, "head", fingerprint="f1", keep=2)
    for step in range(1, 5):
        store.save({"w": torch.full((2,), float(step))}, {"steps": step})
    kept = store.list()
    assert [checkpoint.manifest["steps"] for checkpoint in kept] == [4, 3]
    files = [path for path in (tmp_path / "head").iterdir() if path.name != ".lock"]  # the writers' lock file
    assert len(files) == 4  # two manifests, two tensor files, no temp files
    _, state = store.load_newest()
    assert torch.equal(state["w"], torch.full((2,), 4.0))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    store = StageCheckpoints(tmp_path, "head", fingerprint="f1")
    store.save({"w": torch.ones(3)}, {"steps": 1})
    newest = store.save({"w": torch.full((3,), 2.0)}, {"steps": 2})
    tensors = newest.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:20])  # truncated, as by a crash mid-copy
    checkpoint, state = store.load_newest()
    assert checkpoint.manifest["steps"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    StageCheckpoints(tmp_path, "head", fingerprint="resnet18").save({"w": torch.ones(1)}, {"steps": 1})
    assert StageCheckpoints(tmp_path, "head", fingerprint="resnet50").load_newest() is None
    assert "another model or stage cut" in caplog.text


def test_a_state_that_does_not_fit_changes_nothing() -> None:
    module, optimizer, diloco = trained_state()
    before = {name: value.clone() for name, value in module.state_dict().items()}
    other = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3))
    state = full_state(other, torch.optim.Adam(other.parameters()), diloco)
    problem = load_replica_state(state, module, optimizer, diloco)
    assert problem and "size mismatch" in problem
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_flipped_byte_inside_the_tensors_is_detected_by_the_digest(tmp_path: Path, caplog) -> None:
    store = StageCheckpoints(tmp_path, "head", fingerprint="f1")
    store.save({"w": torch.ones(64)}, {"steps": 1})
    newest = store.save({"w": torch.full((64,), 2.0)}, {"steps": 2})
    tensors = newest.with_suffix(".safetensors")
    data = bytearray(tensors.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: the file still parses, its values are wrong
    tensors.write_bytes(bytes(data))
    checkpoint, state = store.load_newest()
    assert checkpoint.manifest["steps"] == 1 and torch.equal(state["w"], torch.ones(64))
    assert "truncated or corrupt" in caplog.text
    valid, _ = store.newest_valid()
    assert valid.manifest["steps"] == 1


def test_the_manifest_names_the_model_config_and_its_tensors(tmp_path: Path) -> None:
    store = StageCheckpoints(tmp_path, "head", fingerprint="f1", config_hash="c1")
    path = store.save({"w": torch.ones(2)}, {"steps": 7, "model": "tiny.head", "run_step": 5, "diloco_round": 1})
    manifest = json.loads(path.read_text())
    for key in ("steps", "model", "run_step", "diloco_round", "stage", "fingerprint", "saved_at", "tensors_digest"):
        assert key in manifest, key
    assert manifest["config_hash"] == "c1"


def test_a_mismatch_is_refused_with_the_model_it_holds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    StageCheckpoints(tmp_path, "head", fingerprint="a").save({"w": torch.ones(1)}, {"model": "resnet18.head"})
    store = StageCheckpoints(tmp_path, "head", fingerprint="b")
    assert store.load_newest() is None
    checkpoint, problem = store.newest_valid()
    assert checkpoint is None and "holds 'resnet18.head'" in problem
    assert "skipping checkpoint" in caplog.text and "resnet18.head" in caplog.text


def test_checkpoints_older_than_the_run_are_ignored(tmp_path: Path) -> None:
    StageCheckpoints(tmp_path, "head", fingerprint="f1").save({"w": torch.ones(1)}, {"steps": 1})
    later = time.time() + 1
    assert StageCheckpoints(tmp_path, "head", fingerprint="f1", newer_than=later).load_newest() is None
    assert StageCheckpoints(tmp_path, "head", fingerprint="f1", newer_than=later - 60).load_newest() is not None


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    store = StageCheckpoints(tmp_path, "head", fingerprint="f1")
    store.save({"rng": rng_state()}, {})
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    _, state = store.load_newest()
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


WRITER = """
import os, sys, time, torch
import safetensors.torch
from distqat.checkpoints import StageCheckpoints
store = StageCheckpoints(sys.argv[1], "head", fingerprint="f1")
store.save({"w": torch.ones(4)}, {"steps": 1})
real = safetensors.torch.save_file
def half_then_hang(tensors, path):  # the process dies in the middle of writing the second checkpoint
    real(tensors, path)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    open(sys.argv[2], "w").close()
    time.sleep(600)
import distqat.checkpoints
distqat.checkpoints.save_file = half_then_hang
store.save({"w": torch.full((1 << 16,), 2.0)}, {"steps": 2})
"""


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    marker = tmp_path / "writing"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    leftovers = [path.name for path in (tmp_path / "head").iterdir() if ".tmp-" in path.name]
    assert leftovers  # it really died mid-write
    store = StageCheckpoints(tmp_path, "head", fingerprint="f1")
    checkpoint, state = store.load_newest()
    assert checkpoint.manifest["steps"] == 1 and torch.equal(state["w"], torch.ones(4))
    store.save({"w": torch.zeros(1)}, {"steps": 3})  # the next writer clears the dead one's temporary file
    assert not [path for path in (tmp_path / "head").iterdir() if ".tmp-" in path.name]
    assert [c.manifest["steps"] for c in store.list()] == [3, 1]
