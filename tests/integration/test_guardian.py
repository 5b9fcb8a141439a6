"""The guardian and RoleProcess leave nothing behind on any exit path (real processes, real hivemind)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from distqat.guardian import held_files
from distqat.launch import ProcessSupervisor, RoleProcess

SRC = str(Path(__file__).resolve().parents[2] / "src")
# The guardian records socket paths once a second; wait longer than that before a SIGKILL.
SOCKET_SCAN_WAIT_S = 2.0


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def python_role(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def start_role(tmp_path: Path, code: str, **kwargs: object) -> RoleProcess:
    return RoleProcess.start("role", python_role(code), tmp_path / "logs" / "role.log", **kwargs)  # type: ignore[arg-type]


def wait_ready(rp: RoleProcess, ready: Path, timeout: float = 20.0) -> int:
    wait_until(lambda: ready.exists() or rp.poll() is not None, timeout, f"{ready.name}")
    assert rp.poll() is None, f"role died early:\n{rp.log_path.read_text()}"
    role_pid = rp.role_pid
    assert role_pid is not None
    return role_pid


@pytest.mark.timeout(30)
def test_sigkilled_role_grandchild_is_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    argv = ["sh", "-c", f"sleep 300 & echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; exec sleep 300"]
    rp = RoleProcess.start("role", argv, tmp_path / "role.log")
    wait_until(pidfile.exists, 10, "the grandchild's pid file")
    grandchild = int(pidfile.read_text())
    role_pid = rp.role_pid
    assert role_pid is not None and not gone(grandchild)

    os.kill(role_pid, signal.SIGKILL)
    assert rp.wait(10) == 137
    assert gone(grandchild)
    assert "cleaned 1 leftover processes" in rp.log_path.read_text()


@pytest.mark.timeout(30)
def test_exit_code_is_passed_through(tmp_path: Path) -> None:
    rp = start_role(tmp_path, "import sys; sys.exit(3)")
    assert rp.wait(10) == 3
    missing = RoleProcess.start("missing", [str(tmp_path / "no-such-program")], tmp_path / "missing.log")
    assert missing.wait(10) == 127


@pytest.mark.timeout(30)
def test_sigkilled_launcher_stops_role_cleanly(tmp_path: Path) -> None:
    ready, marker = tmp_path / "ready", tmp_path / "marker"
    role = f"""
        import threading
        from pathlib import Path
        from distqat.launch import install_shutdown_handlers
        stop = threading.Event()
        install_shutdown_handlers(stop)
        Path({str(ready)!r}).touch()
        stop.wait()
        Path({str(marker)!r}).write_text("stopped cleanly")
    """
    launcher = f"""
        import sys, time
        from pathlib import Path
        from distqat.launch import RoleProcess
        rp = RoleProcess.start("sleeper", [sys.executable, "-c", {textwrap.dedent(role)!r}],
                               Path({str(tmp_path / "role.log")!r}))
        print(rp.pid, flush=True)
        time.sleep(300)
    """
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(python_role(launcher), stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    guardian = int(proc.stdout.readline())
    wait_until(ready.exists, 20, "the role to start")
    tree = [guardian, *(p.pid for p in psutil.Process(guardian).children(recursive=True))]
    assert len(tree) == 2

    proc.kill()
    proc.wait()
    proc.stdout.close()
    wait_until(marker.exists, 5, "the role's clean-shutdown marker")
    wait_until(lambda: all(gone(pid) for pid in tree), 5, f"processes {tree} to exit")
    assert "launcher" in (tmp_path / "role.log").read_text()


@pytest.mark.timeout(30)
def test_sigkilled_role_lets_nested_guardian_stop_its_role_cleanly(tmp_path: Path) -> None:
    """The client -> trainer shape: a role that is itself a launcher of roles is SIGKILLed."""
    ready, marker = tmp_path / "ready", tmp_path / "marker"
    inner = f"""
        import subprocess, threading
        from pathlib import Path
        from distqat.launch import install_shutdown_handlers
        stop = threading.Event()
        install_shutdown_handlers(stop)
        subprocess.Popen(["sleep", "300"])
        Path({str(ready)!r}).touch()
        stop.wait()
        Path({str(marker)!r}).write_text("stopped cleanly")
    """
    outer = f"""
        import sys, time
        from pathlib import Path
        from distqat.launch import RoleProcess
        rp = RoleProcess.start("inner", [sys.executable, "-c", {textwrap.dedent(inner)!r}],
                               Path({str(tmp_path / "inner.log")!r}))
        time.sleep(300)
    """
    rp = start_role(tmp_path, outer)
    wait_until(ready.exists, 20, "the inner role to start")
    outer_role = rp.role_pid
    assert outer_role is not None
    tree = [p.pid for p in psutil.Process(rp.pid).children(recursive=True)]
    assert len(tree) == 4  # outer role, inner guardian, inner role, sleep

    os.kill(outer_role, signal.SIGKILL)
    assert rp.wait(15) == 137
    assert marker.exists(), (tmp_path / "inner.log").read_text()
    assert all(gone(pid) for pid in tree)


@pytest.mark.timeout(30)
def test_socket_file_of_sigkilled_role_is_removed(tmp_path: Path) -> None:
    sock_path, ready = tmp_path / "role.sock", tmp_path / "ready"
    rp = start_role(
        tmp_path,
        f"""
        import socket, time
        from pathlib import Path
        s = socket.socket(socket.AF_UNIX)
        s.bind({str(sock_path)!r})
        s.listen()
        Path({str(ready)!r}).touch()
        time.sleep(300)
        """,
    )
    role_pid = wait_ready(rp, ready)
    assert sock_path.exists()
    time.sleep(SOCKET_SCAN_WAIT_S)

    os.kill(role_pid, signal.SIGKILL)
    assert rp.wait(10) == 137
    assert not sock_path.exists()


HIVEMIND_ROLE = """
    import threading
    from pathlib import Path
    import hivemind
    from distqat.launch import install_shutdown_handlers
    stop = threading.Event()
    install_shutdown_handlers(stop)
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    Path({ready!r}).touch()
    stop.wait()
    dht.shutdown()
"""


def start_hivemind_role(tmp_path: Path) -> tuple[RoleProcess, int, list[psutil.Process], set[str]]:
    """A role holding a DHT; returns it, its pid, its process tree and the files that tree holds."""
    ready = tmp_path / "ready"
    rp = start_role(tmp_path, HIVEMIND_ROLE.format(ready=str(ready)))
    role_pid = wait_ready(rp, ready, timeout=45)
    tree = psutil.Process(role_pid).children(recursive=True)
    names = [p.name() for p in tree]
    assert "p2pd" in names, f"no p2pd under the role: {names}"
    sockets, shm = held_files([role_pid, *(p.pid for p in tree)])
    assert any(s.startswith("/tmp/hivemind-p2pd-") for s in sockets), sockets
    return rp, role_pid, tree, sockets | shm


@pytest.mark.timeout(60)
def test_sigkilled_hivemind_role_leaves_no_p2pd_or_files(tmp_path: Path) -> None:
    rp, role_pid, tree, files = start_hivemind_role(tmp_path)
    time.sleep(SOCKET_SCAN_WAIT_S)

    os.kill(role_pid, signal.SIGKILL)
    assert rp.wait(20) == 137
    still_running = [f"{p.pid} {p.name()}" for p in tree if not gone(p.pid)]
    assert not still_running, f"left running: {still_running}"
    assert not [f for f in files if os.path.exists(f)]
    assert not set(glob.glob("/tmp/hivemind-*.sock")) & files


@pytest.mark.timeout(60)
def test_stopped_hivemind_role_shuts_down_cleanly(tmp_path: Path) -> None:
    rp, _, tree, files = start_hivemind_role(tmp_path)

    assert rp.stop(timeout=20) == 0
    assert all(gone(p.pid) for p in tree)
    assert not [f for f in files if os.path.exists(f)]
    # Everything went away on its own (torch_shm_manager included): the guardian had nothing to clean.
    assert "cleaned" not in rp.log_path.read_text()


def sigterm_ignoring_role(ready: Path) -> str:
    """A role that ignores SIGTERM, touches `ready`, and sleeps: only a kill stops it."""
    return f"""
        import signal, time
        from pathlib import Path
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Path({str(ready)!r}).touch()
        time.sleep(300)
    """


@pytest.mark.timeout(30)
def test_stop_kills_role_that_ignores_sigterm_after_guardian_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = sigterm_ignoring_role(ready)
    rp = start_role(tmp_path, code, grace_s=1.0)
    role_pid = wait_ready(rp, ready)
    started = time.monotonic()
    assert rp.stop(timeout=10) == 137  # the guardian itself escalated to SIGKILL
    assert time.monotonic() - started < 5
    assert gone(role_pid)


@pytest.mark.timeout(30)
def test_stop_kills_process_group_when_guardian_does_not_finish(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = sigterm_ignoring_role(ready)
    rp = start_role(tmp_path, code, grace_s=60.0)
    role_pid = wait_ready(rp, ready)
    started = time.monotonic()
    assert rp.stop(timeout=2) == -signal.SIGKILL
    assert time.monotonic() - started < 4
    wait_until(lambda: gone(role_pid), 2, "the role to die with its group")


@pytest.mark.timeout(30)
def test_supervisor_stops_all_in_parallel(tmp_path: Path) -> None:
    def role(i: int) -> list[str]:
        return python_role(
            f"""
            import threading
            from pathlib import Path
            from distqat.launch import install_shutdown_handlers
            stop = threading.Event()
            install_shutdown_handlers(stop)
            Path({str(tmp_path / f"ready{i}")!r}).touch()
            stop.wait()
            """
        )

    with ProcessSupervisor(grace_s=5) as sup:
        procs = [sup.start(f"r{i}", role(i), tmp_path / f"r{i}.log") for i in range(3)]
        sup.start("crash", python_role("raise SystemExit(7)"), tmp_path / "crash.log")
        wait_until(lambda: "crash" in sup.exited(), 10, "the crashing role to exit")
        assert sup.exited() == {"crash": 7}
        wait_until(lambda: all((tmp_path / f"ready{i}").exists() for i in range(3)), 20, "roles to start")
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert all(p.poll() == 0 for p in procs)
    assert sup.processes == {}
