"""Shared fixtures: every test must leave no process, hivemind socket or shared-memory file behind.

``no_leftovers`` is autouse. It tags the test with a unique environment variable (inherited by
everything the test starts, so it finds orphans that re-parented to init too), and afterwards
fails the test if a process the test started still runs or if a hivemind socket, a torch shm
folder or a /dev/shm file created during the test still exists and no live process holds it. Leftover
processes are killed (by the PIDs found, never by name) so later tests are not disturbed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

_TAG_VAR = "DISTQAT_TEST_TAG"
# torch_shm_manager's private socket folder stays behind when the manager is killed.
_FILE_GLOBS = ("/tmp/hivemind-p2pd-*.sock", "/tmp/hivemind-p2pclient-*.sock", "/tmp/torch-shm-dir-*")
_GRACE_S = 5.0
_FILE_GRACE_S = 3.0

Key = tuple[int, float]  # (pid, create time): a pid alone may be reused during a test


def _key(proc: psutil.Process) -> Key | None:
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.Error:
        return []


def _tagged(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(_TAG_VAR) == tag:
                found.append(proc)
    return found


def _is_live(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_own_shm_manager(proc: psutil.Process) -> bool:
    """The test process's own torch_shm_manager: torch starts it on first use and it lives as long
    as this process (it cleans up /dev/shm when we exit), so it is no test's leftover."""
    try:
        return proc.ppid() == os.getpid() and proc.name() == "torch_shm_manager"
    except psutil.Error:
        return False


def _new_processes(before: set[Key], tag: str) -> list[psutil.Process]:
    """Live processes started during the test: our new descendants, tagged orphans and their trees.

    A process that existed before the test (say a module-scoped swarm) may start and keep children
    of its own; those are its business, not this test's.
    """
    me = psutil.Process()
    found: dict[Key, psutil.Process] = {}
    for proc in [*me.children(), *_tagged(tag)]:
        key = _key(proc)
        if key is None or key in before or _is_own_shm_manager(proc):
            continue
        for p in [proc, *_tree(proc)]:
            k = _key(p)
            if k is not None and k not in before and _is_live(p):
                found[k] = p
    return list(found.values())


def _files() -> set[str]:
    paths = {p for pattern in _FILE_GLOBS for p in glob.glob(pattern)}
    with contextlib.suppress(OSError):
        paths |= {os.path.join("/dev/shm", name) for name in os.listdir("/dev/shm")}
    return paths


def _unheld(paths: set[str]) -> set[str]:
    """The paths no live process holds: no socket bound to it, no open fd, no mapping.

    Another test run or a swarm on this host creates the same kinds of files while they are in use;
    only an unheld file is a leftover.
    """
    bound: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) >= 8:
                bound.add(fields[7])
    unheld = {p for p in paths - bound if not any(b.startswith(p + "/") for b in bound)}
    shm = {p for p in unheld if p.startswith("/dev/shm/")}
    if not shm:
        return unheld
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    shm.discard(os.readlink(f"/proc/{proc.pid}/fd/{fd}"))
            with open(f"/proc/{proc.pid}/maps") as maps:
                for line in maps:
                    shm.discard(line.rstrip("\n").split(maxsplit=5)[-1])
    return {p for p in unheld if not p.startswith("/dev/shm/")} | shm


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160] or proc.name()}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    tag = uuid.uuid4().hex
    monkeypatch.setenv(_TAG_VAR, tag)
    me = psutil.Process()
    before = {k for p in _tree(me) if (k := _key(p)) is not None}
    files_before = _files()

    yield

    deadline = time.monotonic() + _GRACE_S
    leftovers = _new_processes(before, tag)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.1)
        leftovers = _new_processes(before, tag)
    described = [_describe(p) for p in leftovers]
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=5)

    # torch_shm_manager unlinks its files 2 s after its last client is gone: give it time.
    deadline = time.monotonic() + _FILE_GRACE_S
    new_files = _unheld(_files() - files_before)
    while new_files and time.monotonic() < deadline:
        time.sleep(0.2)
        new_files = _unheld(new_files & _files())
    for path in new_files:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)

    problems = []
    if described:
        problems.append("processes still running (killed now):\n  " + "\n  ".join(described))
    if new_files:
        problems.append("files left behind (removed now):\n  " + "\n  ".join(sorted(new_files)))
    if problems:
        pytest.fail("test left things behind: " + "\n".join(problems), pytrace=False)
