"""A group of child processes that is always stopped, by PID, with its descendants.

Flower's SuperLink and SuperNodes spawn SuperExec processes, which spawn a
process per ServerApp run and per ClientApp message. The group remembers every
descendant it has ever seen (PID plus start time, so a reused PID is never
signalled) and, on :meth:`ProcessGroup.stop`, sends SIGTERM to the main
processes, waits, then SIGKILLs whatever of its own is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dmsc_fed.errors import LauncherError


def _stat(pid: int) -> tuple[int, int] | None:
    """``(ppid, starttime)`` of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


@dataclass
class Child:
    """A process the group started."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


class ProcessGroup:
    """Processes started by one launcher, stopped together (a context manager)."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.seen: dict[int, int] = {}  # pid -> starttime of every process ever seen
        self._lock = threading.Lock()
        self._stop_watch = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> Child:
        """Start ``argv`` in its own session with stdout and stderr going to ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            try:
                popen = subprocess.Popen(
                    list(argv),
                    env=dict(env),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as err:
                raise LauncherError(f"cannot start {name} ({argv[0]}): {err.strerror}") from None
        child = Child(name=name, popen=popen, log_path=log_path)
        with self._lock:
            self.children.append(child)
            st = _stat(popen.pid)
            if st is not None:
                self.seen[popen.pid] = st[1]
        return child

    def _scan(self) -> None:
        """Record every live descendant of our children."""
        with self._lock:
            roots = set(self.seen)
        table: dict[int, tuple[int, int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = _stat(int(entry.name))
                if st is not None:
                    table[int(entry.name)] = st
        changed = True
        while changed:
            changed = False
            for pid, (ppid, start) in table.items():
                if pid not in roots and ppid in roots:
                    roots.add(pid)
                    with self._lock:
                        self.seen.setdefault(pid, start)
                    changed = True

    def _watch(self) -> None:
        while not self._stop_watch.wait(0.5):
            with contextlib.suppress(OSError):
                self._scan()

    def live(self) -> list[int]:
        """PIDs of processes of this group that are still running."""
        with self._lock:
            items = list(self.seen.items())
        return [pid for pid, start in items if _alive(pid, start)]

    def _signal(self, pid: int, sig: int) -> None:
        with self._lock:
            start = self.seen.get(pid)
        if start is not None and _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _wait_gone(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            for child in self.children:
                child.popen.poll()  # reap our direct children
            self._scan()
            if not self.live():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def stop(self, *, grace_s: float = 15.0) -> None:
        """Stop every process of the group, by PID.

        SIGTERM goes to the main processes (last started first), then to any
        descendant still running; SIGKILL to what is left after ``grace_s``.
        """
        self._scan()
        for child in reversed(self.children):
            self._signal(child.popen.pid, signal.SIGTERM)
        if not self._wait_gone(grace_s / 3):
            for pid in self.live():
                self._signal(pid, signal.SIGTERM)
            if not self._wait_gone(grace_s * 2 / 3):
                for pid in self.live():
                    self._signal(pid, signal.SIGKILL)
                self._wait_gone(5.0)
        self._stop_watch.set()
