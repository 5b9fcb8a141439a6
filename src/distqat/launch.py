"""Launcher side of process lifecycle: start role processes, keep their handles, stop them by PID.

Every role runs under a guardian (``distqat.guardian``) in its own process group. The guardian owns
the role's whole process tree, so nothing outlives a run even when this launcher is SIGKILLed; the
launcher only talks to the guardian it started: SIGTERM, wait, and ``killpg`` as a last resort.

Also holds the role-side helper ``install_shutdown_handlers``: hivemind cleans up its DHT child,
``p2pd`` and socket files only on a clean shutdown, so a role turns termination signals into an event.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType

import psutil

# Directory that holds the ``distqat`` package, so the guardian imports the same code as the launcher.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    paths = env.get("PYTHONPATH", "").split(os.pathsep) if env.get("PYTHONPATH") else []
    if _PACKAGE_ROOT not in paths:
        env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *paths])
    return env


class RoleProcess:
    """One role process started under a guardian and stopped by the PID we started."""

    def __init__(self, name: str, log_path: Path, popen: subprocess.Popen[bytes]):
        self.name = name
        self.log_path = log_path
        self._popen = popen
        self.pid = popen.pid  # the guardian; start_new_session makes it its group's leader too
        self._role: psutil.Process | None = None

    @classmethod
    def start(
        cls,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        grace_s: float = 10.0,
    ) -> RoleProcess:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "distqat.guardian", "--parent-pid", str(os.getpid())]
        cmd += ["--grace", str(grace_s), "--", *argv]
        with open(log_path, "ab") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {name}: {argv}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(env),
                # Own process group: a terminal's Ctrl+C reaches only the launcher, which then stops
                # roles in order, and killpg can take the whole group down as a last resort.
                start_new_session=True,
            )
        return cls(name, log_path, popen)

    def poll(self) -> int | None:
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        """Ask the guardian to stop the role cleanly (it escalates on its own after its grace)."""
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the guardian's whole process group."""
        # Only while the guardian is unreaped: its pid, and so the group id, cannot be reused yet.
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def stop(self, timeout: float = 15.0) -> int | None:
        self.terminate()
        code = self.wait(timeout)
        if code is None:
            self.kill()
            code = self.wait(5.0)
        return code

    @property
    def role_pid(self) -> int | None:
        """Pid of the role itself (the guardian's child); None once it is gone."""
        if self._role is not None:
            try:
                if self._role.is_running() and self._role.status() != psutil.STATUS_ZOMBIE:
                    return self._role.pid
            except psutil.Error:
                pass
            return None
        if self._popen.poll() is not None:
            return None
        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return None
        # Orphans re-parented to the guardian descend from the role, so while the role lives it is
        # the oldest child. Cached (pid + create time) so later calls never pick an orphan.
        live = [c for c in children if c.is_running()]
        if not live:
            return None
        self._role = min(live, key=lambda c: c.create_time())
        return self._role.pid

    def __repr__(self) -> str:
        return f"RoleProcess({self.name!r}, pid={self.pid}, returncode={self._popen.poll()})"


class ProcessSupervisor:
    """Owns a set of RoleProcess; stop_all on exit. Context manager."""

    def __init__(self, grace_s: float = 10.0):
        self.grace_s = grace_s
        self.processes: dict[str, RoleProcess] = {}

    def start(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> RoleProcess:
        old = self.processes.get(name)
        if old is not None and old.poll() is None:
            raise ValueError(f"role {name!r} is already running (guardian pid {old.pid})")
        proc = RoleProcess.start(name, argv, log_path, env=env, grace_s=self.grace_s)
        self.processes[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.processes.pop(name, None)
        if proc is not None:
            proc.stop()

    def forget(self, name: str) -> None:
        """Drop an exited role from the set (its guardian has already cleaned up after it)."""
        proc = self.processes.get(name)
        if proc is not None and proc.poll() is not None:
            del self.processes[name]

    def stop_all(self, timeout: float = 15.0) -> None:
        procs = list(self.processes.values())
        # Signal everyone first so the roles shut down in parallel, not one grace period each.
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait(5.0)
        self.processes.clear()

    def exited(self) -> dict[str, int]:
        return {name: code for name, proc in self.processes.items() if (code := proc.poll()) is not None}

    def __enter__(self) -> ProcessSupervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()


def install_shutdown_handlers(stop_event: threading.Event) -> None:
    """Turn SIGTERM/SIGINT/SIGHUP into stop_event.set() so a role shuts down cleanly.

    hivemind only cleans up on a clean shutdown. Call from the main thread. A second signal while
    the event is already set falls back to the previous handler (a second Ctrl+C forces the exit).
    """
    owner_pid = os.getpid()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def fall_back(signum: int, frame: FrameType | None) -> None:
        prev = previous[signum]
        if callable(prev):
            prev(signum, frame)
            return
        signal.signal(signum, prev if prev is not None else signal.SIG_DFL)
        if prev != signal.SIG_IGN:
            os.kill(os.getpid(), signum)

    def handler(signum: int, frame: FrameType | None) -> None:
        # Forked children (hivemind's DHT process) inherit this handler but not the event's reader:
        # they must keep the default behaviour or they would ignore the guardian's SIGTERM.
        if os.getpid() != owner_pid or stop_event.is_set():
            fall_back(signum, frame)
            return
        stop_event.set()

    for sig in previous:
        signal.signal(sig, handler)
