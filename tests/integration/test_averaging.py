"""DiLoCo rounds through the real hivemind all-reduce, between real processes on 127.0.0.1.

Each peer is `distqat.diagnostics.averaging_peer`: the same θ₀, its own seeded offset standing in for
its inner steps, one round. The golden test checks the result against the reference DiLoCo update
computed here; the fault test kills one replica and freezes another in the middle of the all-reduce and
checks that no survivor applied a partial round.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from distqat.swarm.averaging import ALLREDUCE_STARTED_FILE_ENV

PEER_MODULE = "distqat.diagnostics.averaging_peer"
START_TIMEOUT_S = 90.0


def initial_params(numel: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(numel), torch.randn(3, 5)]


def trained_params(numel: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # The same operation as the peer's, so the bits match.
    return [p.add_(torch.randn(p.shape, generator=generator), alpha=0.1) for p in initial_params(numel)]


def reference_round(numel: int, seeds: list[int], weights: list[int]) -> list[torch.Tensor]:
    """θ ← θ₀ - η·Nesterov(Σ w_i (θ₀ - θ_i) / Σ w_i), with torch's own SGD (lr 0.7, momentum 0.9)."""
    start = [p.clone() for p in initial_params(numel)]
    deltas = [[s - t for s, t in zip(start, trained_params(numel, seed), strict=True)] for seed in seeds]
    total = float(sum(weights))
    outer = [p.clone().requires_grad_(True) for p in start]
    for index, param in enumerate(outer):
        param.grad = sum(w / total * d[index].double() for w, d in zip(weights, deltas, strict=True)).float()
    torch.optim.SGD(outer, lr=0.7, momentum=0.9, nesterov=True).step()
    return [p.detach() for p in outer]


class Peers:
    """Starts averaging_peer processes; the first bootstraps the DHT."""

    def __init__(self, tmp_path: Path, numel: int, compression: str, timeout: float = 30.0):
        self.tmp, self.numel, self.compression, self.timeout = tmp_path, numel, compression, timeout
        self.go = tmp_path / "go"
        self.procs: dict[str, subprocess.Popen] = {}
        self.initial_peers = ""

    def start(self, name: str, seed: int, weight: int, mark: bool = False) -> None:
        maddrs = self.tmp / "maddrs.txt"
        env = dict(os.environ)
        if mark:
            env[ALLREDUCE_STARTED_FILE_ENV] = str(self.tmp / f"{name}.started")
        command = [sys.executable, "-m", PEER_MODULE, "--uid", f"body.0.{len(self.procs)}.0", "--seed", str(seed)]
        command += ["--weight", str(weight), "--numel", str(self.numel), "--compression", self.compression]
        command += ["--go", str(self.go), "--out", str(self.tmp / f"{name}.pt"), "--timeout", str(self.timeout)]
        command += ["--initial-peers", self.initial_peers]
        if not self.procs:
            command += ["--maddrs-file", str(maddrs)]
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        # Each peer runs under a guardian, as roles do: a fault hits the peer's whole tree (DHT child,
        # averager, p2pd), as when its machine dies or freezes, and the guardian cleans what a kill leaves.
        guarded = [sys.executable, "-m", "distqat.guardian", "--parent-pid", str(os.getpid()), "--", *command]
        self.procs[name] = subprocess.Popen(
            guarded, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        if len(self.procs) == 1:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not (maddrs.exists() and maddrs.read_text()):
                assert self.procs[name].poll() is None, (self.tmp / f"{name}.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the first peer did not start its DHT"
                time.sleep(0.1)
            self.initial_peers = maddrs.read_text()

    def result(self, name: str, timeout: float = 120.0) -> dict:
        proc = self.procs[name]
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, (self.tmp / f"{name}.log").read_text()[-3000:]
        return torch.load(self.tmp / f"{name}.pt")

    def signal(self, name: str, signum: int) -> None:
        """Signal every process of the peer (not its guardian)."""
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(self.procs[name].pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signum)

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            self.signal(name, signal.SIGCONT)
            if proc.poll() is None:
                proc.terminate()  # the guardian stops the peer, then cleans up after it
            proc.wait(timeout=60)


@pytest.fixture
def peers_factory(tmp_path: Path):
    created: list[Peers] = []

    def make(numel: int, compression: str = "none", timeout: float = 30.0) -> Peers:
        created.append(Peers(tmp_path, numel, compression, timeout))
        return created[-1]

    yield make
    for peers in created:
        peers.stop_all()


def started(peers: Peers, names: list[str]) -> None:
    """Wait until every peer's averager is up, then let them all start the round."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for name in names:
        while not (peers.tmp / f"{name}.ready").exists():
            assert peers.procs[name].poll() is None, (peers.tmp / f"{name}.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"peer {name} did not start"
            time.sleep(0.1)
    peers.go.touch()


def test_round_matches_the_reference_and_is_identical_on_every_replica(peers_factory):
    numel, seeds, weights = 5000, [1, 2], [10, 30]
    peers = peers_factory(numel)
    peers.start("a", seeds[0], weights[0])
    peers.start("b", seeds[1], weights[1])
    started(peers, ["a", "b"])
    a, b = peers.result("a"), peers.result("b")

    assert a["status"] == b["status"] == "averaged", (a["detail"], b["detail"])
    assert a["group_size"] == b["group_size"] == 2
    for x, y in zip(a["params"], b["params"], strict=True):
        assert torch.equal(x, y)  # to the last bit
    assert a["outer_digest"] == b["outer_digest"]
    for got, want in zip(a["params"], reference_round(numel, seeds, weights), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert a["bytes_sent"] > 0 and a["bytes_received"] > 0


@pytest.mark.parametrize(("compression", "atol", "max_ratio"), [("fp16", 2e-3, 0.6), ("int8", 1e-2, 0.35)])
def test_compressed_rounds_stay_identical_and_send_fewer_bytes(peers_factory, compression, atol, max_ratio):
    numel, seeds, weights = 20000, [3, 4], [5, 5]
    peers = peers_factory(numel, compression)
    peers.start("a", seeds[0], weights[0])
    peers.start("b", seeds[1], weights[1])
    started(peers, ["a", "b"])
    a, b = peers.result("a"), peers.result("b")

    assert a["status"] == b["status"] == "averaged", (a["detail"], b["detail"])
    for x, y in zip(a["params"], b["params"], strict=True):
        assert torch.equal(x, y)  # every member decodes the same bytes
    for got, want in zip(a["params"], reference_round(numel, seeds, weights), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
    fp32_bytes = 4 * (numel + 15)  # each peer sends half its tensors out and half the averages back
    assert a["bytes_sent"] < max_ratio * fp32_bytes


def test_a_killed_and_a_frozen_replica_never_leave_a_partial_round(peers_factory):
    numel = 12_000_000  # ~48 MB per replica: the all-reduce lasts long enough to fault it midway
    peers = peers_factory(numel, timeout=40.0)
    names, seeds = ["a", "b", "killed", "frozen"], [5, 6, 7, 8]
    for name, seed in zip(names, seeds, strict=True):
        peers.start(name, seed, weight=10, mark=name in ("killed", "frozen"))
    started(peers, names)

    deadline = time.monotonic() + 60
    faulted: set[str] = set()
    while faulted != {"killed", "frozen"} and time.monotonic() < deadline:
        for name, fault in (("killed", signal.SIGKILL), ("frozen", signal.SIGSTOP)):
            if name not in faulted and (peers.tmp / f"{name}.started").exists():
                peers.signal(name, fault)
                faulted.add(name)
        time.sleep(0.01)
    assert faulted == {"killed", "frozen"}, "the faulted replicas never reached their all-reduce"

    results = {name: peers.result(name, timeout=150) for name in ("a", "b")}
    peers.signal("frozen", signal.SIGCONT)
    start = initial_params(numel)
    for name, seed in (("a", 5), ("b", 6)):
        result = results[name]
        own = trained_params(numel, seed)
        if result["status"] == "failed":  # rolled back: exactly its own params, θ₀ untouched
            for x, y in zip(result["params"], own, strict=True):
                assert torch.equal(x, y)
        else:
            assert result["status"] == "averaged"
            assert not any(torch.equal(x, y) for x, y in zip(result["params"][:1], start[:1], strict=True))
    if results["a"]["status"] == results["b"]["status"] == "averaged":
        for x, y in zip(results["a"]["params"], results["b"]["params"], strict=True):
            assert torch.equal(x, y)
    assert results["a"]["status"] == results["b"]["status"], (results["a"]["detail"], results["b"]["detail"])
