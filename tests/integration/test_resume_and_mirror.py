"""Nothing is lost when the whole swarm dies: a local swarm SIGKILLed at a step and restarted with
`--resume` continues from its checkpoints, with the loss where it was; and a stage that lost its only
replica is restored from the param mirror (configs/tiny.yaml, real processes on 127.0.0.1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import psutil
import pytest
from test_failover import failover  # the same folder: pytest puts it on sys.path
from test_local_swarm import start_local, steps_so_far, wait_for

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist"
)

ROLES = ("server", "trainer", "client", "monitor", "data-server", "mirror")


def newest_run_steps(log_dir: Path) -> dict[str, int]:
    """The run step recorded in the newest checkpoint manifest of each stage."""
    found = {}
    for stage in ("head", "tail"):
        manifests = sorted((log_dir / "checkpoints" / stage).glob("ckpt-*.json"))
        if manifests:
            found[stage] = json.loads(manifests[-1].read_text()).get("run_step") or 0
    return found


def losses(log_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["loss"] for row in rows if row.get("loss") is not None and math.isfinite(row["loss"])]


def sigkill_swarm(launcher: psutil.Process) -> None:
    """Every role at once with SIGKILL (no role gets to write a last checkpoint), then the launcher; the
    guardians are left to clean up what the roles left (DHT children, p2pd), as after a power cut."""
    roles = []
    for proc in launcher.children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if "distqat.guardian" not in cmdline and "distqat" in cmdline and any(role in cmdline for role in ROLES):
            roles.append(proc)
    assert any("server" in proc.cmdline() for proc in roles)
    for proc in roles:
        proc.kill()
    launcher.kill()


def test_a_swarm_killed_whole_resumes_from_its_checkpoints(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    first = start_local(log_dir, "--checkpoint.every", "1")
    try:
        wait_for(lambda: steps_so_far(log_dir) >= 60, 240, "60 steps")
        wait_for(lambda: min(newest_run_steps(log_dir).values() or [0]) >= 30, 60, "checkpoints of step 30 or later")
        killed_at = steps_so_far(log_dir)
        sigkill_swarm(psutil.Process(first.pid))
    finally:
        first.kill()
        first.communicate(timeout=60)
    before = losses(log_dir)
    untrained, trained = before[0], before[-1]
    checkpointed = min(newest_run_steps(log_dir).values())

    second = start_local(log_dir, "--resume", "--max-steps", str(checkpointed + 30))
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output[-3000:]
    assert f"resuming from step {checkpointed}" in output
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["first_step"] == checkpointed and 0 < checkpointed <= killed_at
    assert summary["steps"] >= checkpointed + 30  # the step count went on from there
    servers = "\n".join(path.read_text() for path in sorted(log_dir.glob("server_*.log")))
    assert servers.count("starts from checkpoint") >= 2  # every stage, not a fresh init
    # The loss went on where it was: the resumed run's first steps are far from the untrained loss.
    assert summary["first_loss"] < (untrained + trained) / 2, (untrained, trained, summary["first_loss"])


def test_a_resume_without_checkpoints_is_one_clear_error(tmp_path: Path) -> None:
    run = start_local(tmp_path / "logs", "--resume", "--max-steps", "5")
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 1
    assert "--resume: stage 'head' has no checkpoint that fits this config in" in output


def test_a_stage_that_lost_every_replica_is_restored_from_the_mirror(tmp_path: Path) -> None:
    figures, log_dir = failover(
        tmp_path,
        *("--replicas", "1", "--kill", "head.0.0.0", "--kill-at-step", "30", "--restart-after", "1"),
        # Servers write no checkpoint: only the mirror can give the stage its state back.
        *("--checkpoint.enable", "false", "--param-mirror.enable", "true", "--param-mirror.refresh-every", "1"),
    )
    mirror_log = (log_dir / "mirror.log").read_text()
    assert "pulled 'head' from head.0.0.0" in mirror_log
    new_server = (log_dir / "server_new.log").read_text()
    assert "taking stage 'head'" in new_server
    assert "starts from the param mirror" in new_server
    assert figures["refill_s"] is not None  # and it trained again
    assert list((log_dir / "checkpoints" / "head").glob("ckpt-*.json"))  # the mirror's own checkpoints
