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


def _node_script(tmp_path: Path, refusals: int) -> list[str]:
    """A stand-in SuperNode: refused (Flower's activation message, exit 1) ``refusals`` times, then it exits 3."""
    counter = tmp_path / "starts"
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = int(p.read_text() or 0) + 1 if p.exists() else 1; "
        "p.write_text(str(n)); "
        f"print('[code: 2004] Failed to activate SuperNode.' if n <= {refusals} else 'crashed'); "
        f"sys.exit(1 if n <= {refusals} else 3)"
    )
    return [sys.executable, "-c", script, str(counter)]


def test_a_restarted_site_retries_while_the_superlink_holds_its_old_session(tmp_path: Path) -> None:
    import pytest

    from dmsc_fed.errors import LauncherError
    from dmsc_fed.launcher.remote import hold_rejoining

    said: list[str] = []
    with ProcessGroup() as group, pytest.raises(LauncherError, match="exited with code 3"):
        hold_rejoining(
            group,
            name="SuperNode a",
            argv=_node_script(tmp_path, refusals=2),
            env={},
            log_path=tmp_path / "node.log",
            say=said.append,
            wait_s=60,
            retry_s=0.1,
        )
    assert (tmp_path / "starts").read_text() == "3"  # refused twice, started again each time
    assert sum("still holds this site's previous session" in s for s in said) == 2


def test_a_site_refused_for_longer_than_it_waits_gives_up_with_flowers_message(tmp_path: Path) -> None:
    import pytest

    from dmsc_fed.errors import LauncherError
    from dmsc_fed.launcher.remote import hold_rejoining

    with ProcessGroup() as group, pytest.raises(LauncherError, match="Failed to activate SuperNode"):
        hold_rejoining(
            group,
            name="SuperNode a",
            argv=_node_script(tmp_path, refusals=100),
            env={},
            log_path=tmp_path / "node.log",
            say=lambda _: None,
            wait_s=0.0,
            retry_s=0.1,
        )
    assert (tmp_path / "starts").read_text() == "1"
