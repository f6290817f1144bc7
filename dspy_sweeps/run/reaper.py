"""Kill what a SIGKILLed sweep left behind. Ray fate-shares its raylet and GCS with the driver,
but its dashboard and runtime-env agents can outlive a killed driver (seen with Ray 2.60), and
they rename themselves (`ray::DashboardAgent`), so only their ancestry identifies them.

Started by `runner.start_ray` in its own session: `python -m dspy_sweeps.run.reaper PARENT_PID`.
It keeps a list of the parent's descendants while the parent lives; once the parent has ended,
however it ended, it kills those still running (the same process: pid and start time match).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process from /proc, or None if it is gone."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def descendants(root: int) -> dict[int, str]:
    """Every process below `root`, by pid, with its start time."""
    stats = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        if stat is not None:
            children.setdefault(stat[0], []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid != os.getpid() and stats.get(pid):
            found[pid] = stats[pid][1]
            todo.extend(children.get(pid, []))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def ray_sessions(pids: dict[int, str]) -> set[bytes]:
    """The `--session-name=...` of Ray processes among `pids`: workers started later carry it too."""
    names = set()
    for pid in pids:
        for arg in _cmdline(pid).split(b"\0"):
            if arg.startswith(b"--session-name="):
                names.add(arg)
    return names


def main(parent: int) -> None:
    seen: dict[int, str] = {}
    sessions: set[bytes] = set()
    while os.getppid() == parent:  # re-parented: the sweep's process has ended
        current = descendants(parent)
        seen.update(current)
        sessions |= ray_sessions(current)
        time.sleep(0.25)
    time.sleep(2.0)  # after a clean exit Ray is already stopping: give it a moment
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    same_session = {pid for pid in pids if any(s in _cmdline(pid) for s in sessions)}
    still_ours = {pid for pid, started in seen.items() if (_stat(pid) or (0, ""))[1] == started}
    for pid in same_session | still_ours:
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
