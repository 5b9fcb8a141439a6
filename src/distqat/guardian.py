"""The guardian: a tiny supervisor that owns one role process and its whole process tree.

Run as ``python -m distqat.guardian --parent-pid PID [--grace SECONDS] -- CMD ARG...``.
The launcher starts one guardian per role (see ``distqat.launch``). The guardian is a child
subreaper, so every descendant the role leaves behind (hivemind's DHT child, ``p2pd``,
``torch_shm_manager``) re-parents to it instead of init. It stops the role when the role exits,
when the launcher dies (even by SIGKILL) or when it is told to; then it stops whatever is left of
the tree and removes the unix socket files and /dev/shm files its descendants had held.

It imports only the standard library and psutil: it is started once per role and must stay light.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

import psutil

_PR_SET_CHILD_SUBREAPER = 36
_TICK_S = 0.2
_FILE_SCAN_S = 1.0
_LEFTOVER_TERM_S = 3.0
# torch_shm_manager exits (and unlinks its /dev/shm files) 2 s after its last client has gone.
_HELPER_SETTLE_S = 3.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_TEMP_DIRS = {"/tmp", tempfile.gettempdir()}


def _log(message: str) -> None:
    print(f"guardian[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        # Without it orphans escape to init; we still stop what we can see, so carry on.
        _log(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_all(procs: Iterable[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _unix_socket_paths() -> dict[int, str]:
    """Socket inode -> filesystem path of every bound unix socket in this network namespace."""
    paths: dict[int, str] = {}
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            # Abstract names start with '@' and have no file to clean up.
            if len(fields) >= 8 and fields[7].startswith("/"):
                paths[int(fields[6])] = fields[7]
    return paths


def held_files(pids: Iterable[int], with_maps: bool = True) -> tuple[set[str], set[str]]:
    """(unix socket paths, /dev/shm paths) that these processes hold: bound, open or mapped."""
    inodes: set[int] = set()
    shm: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
                    elif target.startswith("/dev/shm/") and not target.endswith(" (deleted)"):
                        shm.add(target)
        if with_maps:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if "/dev/shm/" in line and not line.endswith(" (deleted)\n"):
                        shm.add(line[line.index("/dev/shm/") :].rstrip("\n"))
    sockets = {path for inode, path in _unix_socket_paths().items() if inode in inodes} if inodes else set()
    return sockets, shm


def _partition(procs: list[psutil.Process]) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """Split descendants into plain ones and the topmost session leaders.

    A descendant that started its own session (torch_shm_manager, a nested guardian) is a helper that
    cleans up its own subtree once its clients are gone; processes inside its subtree are its business.
    """
    me = os.getpid()
    tree: dict[int, tuple[int, bool]] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error, OSError):
            tree[proc.pid] = (proc.ppid(), os.getsid(proc.pid) == proc.pid)
    plain, leaders = [], []
    for proc in procs:
        top, pid = None, proc.pid
        while pid in tree and pid != me:
            parent, is_leader = tree[pid]
            top = pid if is_leader else top
            pid = parent
        if top is None:
            plain.append(proc)
        elif top == proc.pid:
            leaders.append(proc)
    return plain, leaders


class Guardian:
    """One guardian's state: the role, its exit status, and the files its tree was seen holding."""

    def __init__(self, parent_pid: int, grace_s: float):
        self.parent_pid = parent_pid
        self.grace_s = grace_s
        self.role: subprocess.Popen[bytes] | None = None
        self.role_status: int | None = None  # raw waitpid status once the role is reaped
        self.stop_reason: str | None = None
        self.sockets: set[str] = set()
        self.shm: set[str] = set()
        self.pids: set[int] = set()  # every descendant seen: torch names its shm files after their creator
        self._parent_is_direct = os.getppid() == parent_pid
        self._parent_ctime = self._create_time(parent_pid)

    @staticmethod
    def _create_time(pid: int) -> float | None:
        try:
            return psutil.Process(pid).create_time()
        except psutil.Error:
            return None

    def parent_alive(self) -> bool:
        if self._parent_is_direct:
            # Re-parenting is the one signal that cannot be fooled by pid reuse.
            return os.getppid() == self.parent_pid
        return self._parent_ctime is not None and self._create_time(self.parent_pid) == self._parent_ctime

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_reason is None:
            self.stop_reason = f"signal {signal.Signals(signum).name}"

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.role is not None and pid == self.role.pid:
                self.role_status = status
                # Keep Popen from ever waiting on a pid we already reaped.
                self.role.returncode = os.waitstatus_to_exitcode(status)

    def scan_files(self) -> None:
        pids = [p.pid for p in _descendants()]
        self.pids.update(pids)
        sockets, shm = held_files(pids)
        self.sockets |= sockets
        self.shm |= shm

    def wait_tree(self, timeout: float) -> bool:
        """Reap until no descendant runs or the timeout passes; True if none runs."""
        deadline = time.monotonic() + timeout
        while True:
            self.reap()
            if not any(_is_running(p) for p in _descendants()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def run(self, cmd: list[str]) -> int:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self.on_signal)
        _become_subreaper()
        if not self.parent_alive():
            _log(f"launcher {self.parent_pid} is gone before the role started; not starting it")
            return 1
        try:
            self.role = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        except OSError as e:
            _log(f"cannot start {cmd[0]!r}: {e}")
            return 127
        last_scan = 0.0
        while self.stop_reason is None:
            self.reap()
            if self.role_status is not None:
                break
            if not self.parent_alive():
                _log(f"launcher {self.parent_pid} died; stopping role {self.role.pid}")
                self.stop_reason = "launcher died"
                break
            if time.monotonic() - last_scan >= _FILE_SCAN_S:
                self.scan_files()
                last_scan = time.monotonic()
            time.sleep(_TICK_S)
        return self.shutdown()

    def shutdown(self) -> int:
        assert self.role is not None
        # Further signals must not interrupt the cleanup; the launcher escalates with killpg if needed.
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self.reap()
        if self.role_status is None:
            with contextlib.suppress(ProcessLookupError):
                self.role.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            while self.role_status is None and time.monotonic() < deadline:
                time.sleep(0.05)
                self.reap()
            if self.role_status is None:
                _log(f"role {self.role.pid} ignored SIGTERM for {self.grace_s:g} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    self.role.send_signal(signal.SIGKILL)
        self.scan_files()
        leftovers = self._stop_leftovers()
        removed = self._remove_files()
        code = self._exit_code()
        if code != 0 or leftovers or removed:
            _log(
                f"role {self.role.pid} exited with {self.role.returncode}; "
                f"cleaned {len(leftovers)} leftover processes, {removed} files"
            )
        return code

    def _stop_leftovers(self) -> set[int]:
        """Stop what is left of the tree; returns the pids we had to signal, the role excepted."""
        signalled: set[int] = set()
        plain, leaders = _partition(_descendants())
        # Plain processes first (hivemind's DHT child, p2pd): they are the clients of the helpers.
        plain = [p for p in plain if _is_running(p)]
        if plain:
            signalled |= {p.pid for p in plain}
            _signal_all(plain, signal.SIGTERM)
            deadline = time.monotonic() + _LEFTOVER_TERM_S
            while any(_is_running(p) for p in plain) and time.monotonic() < deadline:
                time.sleep(0.05)
                self.reap()
            _signal_all(plain, signal.SIGKILL)
        if leaders and not self.wait_tree(_HELPER_SETTLE_S):
            leaders = [p for p in leaders if _is_running(p)]
            signalled |= {p.pid for p in leaders}
            _signal_all(leaders, signal.SIGTERM)
            # A nested guardian needs its role's grace plus its own cleanup; other helpers die at once.
            self.wait_tree(self.grace_s + _LEFTOVER_TERM_S + _HELPER_SETTLE_S)
        # Loop: a dying process may fork, and orphans of killed helpers re-parent to us meanwhile.
        for _ in range(50):
            self.reap()
            procs = _descendants()
            if not procs:
                break
            signalled |= {p.pid for p in procs if _is_running(p)}
            _signal_all(procs, signal.SIGKILL)
            time.sleep(0.05)
        signalled.discard(self.role.pid)  # type: ignore[union-attr]
        return signalled

    def _remove_files(self) -> int:
        """Unlink the recorded files that survived their holders and that nobody else holds now."""
        removed = 0
        still_bound = set(_unix_socket_paths().values())
        for path in sorted(self.sockets - still_bound):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
                    removed += 1
                    # A private temp dir made for the socket (torch-shm-dir-*) goes with it.
                    folder = os.path.dirname(path)
                    if os.path.dirname(folder) in _TEMP_DIRS and not os.listdir(folder):
                        os.rmdir(folder)
        # A file created and orphaned between two scans (a process killed right after making it) was
        # never seen held; torch's own segments carry their creator's pid: `torch_<pid>_<...>`.
        created = {path for pid in self.pids for path in glob.glob(f"/dev/shm/torch_{pid}_*")}
        shm = {p for p in self.shm | created if os.path.isfile(p)}
        if shm:
            others = [p.pid for p in psutil.process_iter() if p.pid != os.getpid()]
            for path in sorted(shm - held_files(others)[1]):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
        return removed

    def _exit_code(self) -> int:
        if self.role_status is None:
            return 1
        code = os.waitstatus_to_exitcode(self.role_status)
        return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distqat.guardian", description=__doc__.split("\n")[0])
    parser.add_argument("--parent-pid", type=int, required=True, help="launcher pid; its death stops the role")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds the role has to exit on SIGTERM")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARG...")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("missing the role command after --")
    return Guardian(args.parent_pid, args.grace).run(cmd)


if __name__ == "__main__":
    sys.exit(main())
