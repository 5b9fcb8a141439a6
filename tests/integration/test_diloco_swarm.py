"""DiLoCo in a real local swarm: replicas of a stage average, a joiner downloads the stage's state, and a
replica killed as soon as it enters an all-reduce does not stop the others from finishing the run.

(The tiny model's all-reduce lasts milliseconds, so the kill may land just after it: `test_averaging`
kills and freezes replicas inside a long all-reduce; this test is about the swarm living on.)"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psutil
import pytest
from test_local_swarm import start_local, wait_for  # the same folder: pytest puts it on sys.path

from distqat.swarm.averaging import ALLREDUCE_STARTED_FILE_ENV

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist"
)


def test_a_replica_killed_mid_round_leaves_the_swarm_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    marker = tmp_path / "allreduce.started"
    monkeypatch.setenv(ALLREDUCE_STARTED_FILE_ENV, str(marker))
    log_dir, summary_path = tmp_path / "logs", tmp_path / "summary.json"
    # Three servers: two replicas of `head` (the second joins by downloading the first's state), one `tail`.
    run = start_local(
        log_dir,
        "--max-steps",
        "150",
        "--world-size",
        "3",
        "--diloco.inner-steps",
        "4",
        "--diloco.averaging-timeout",
        "15",
        "--summary",
        str(summary_path),
    )
    try:
        wait_for(lambda: marker.exists() and marker.read_text(), 180, "a replica to start an all-reduce")
        averager = psutil.Process(int(marker.read_text()))
        server = averager.parent()  # the averager runs in a child of the stage server
        assert server is not None and "server" in server.cmdline()
        server.send_signal(signal.SIGKILL)
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            run.communicate(timeout=60)
    assert run.returncode == 0, output

    summary = json.loads(summary_path.read_text())
    assert summary["steps"] >= 150
    assert summary["bytes_averaging"] > 0 and summary["bytes_activations"] > 0
    assert summary["diloco_rounds"]["head"] >= 1 and summary["diloco_rounds"]["tail"] >= 1
    server_logs = "\n".join(path.read_text() for path in sorted(log_dir.glob("server_*.log")))
    assert "loaded the state of head.0." in server_logs  # the second head replica joined with the first's state
    assert "round 0 applied" in server_logs
