from __future__ import annotations

import sys
import time
from pathlib import Path

from dmsc_fed.launcher.processes import ProcessGroup, _alive


def test_group_stops_children_and_grandchildren(tmp_path: Path) -> None:
    script = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    )
    group = ProcessGroup()
    child = group.start(name="parent", argv=[sys.executable, "-c", script], env={}, log_path=tmp_path / "p.log")
    deadline = time.monotonic() + 10
    while len(group.live()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = dict(group.seen)
    assert len(group.live()) == 2, "the grandchild was not tracked"
    group.stop(grace_s=5)
    assert group.live() == []
    assert not any(_alive(pid, start) for pid, start in seen.items())
    assert child.popen.returncode is not None


def test_group_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    group = ProcessGroup()
    group.start(name="stubborn", argv=[sys.executable, "-c", script], env={}, log_path=tmp_path / "s.log")
    time.sleep(0.5)
    group.stop(grace_s=3)
    assert group.live() == []
