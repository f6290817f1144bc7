"""Kill what a SIGKILLed sweep left behind. Ray fate-shares its raylet and GCS with the driver,
but its dashboard and runtime-env agents can outlive a killed driver (seen with Ray 2.60), and
they rename themselves (`ray::DashboardAgent`), so only their ancestry identifies them.

Started by `runner.start_ray` in its own session: `python -m dspy_sweeps.run.reaper PARENT_PID`,
its stdin a pipe from the parent. It keeps a list of the parent's descendants while the parent
lives; once the parent has ended, however it ended, it kills those still running (the same
process: pid and start time match). When the parent stops Ray itself (`runner.stop_ray` writes
`STOP` on the pipe) and lives on, as a notebook, a test process or a bench does, the reaper kills
only what is left of that Ray session and exits: the parent's other children are its own, and a
reaper per sweep polling /proc until the process ends would pile up.
"""

from __future__ import annotations

import os
import select
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


STOP = b"stop\n"  # what runner.stop_ray writes before closing the pipe; a dead parent closes it with nothing


def main(parent: int) -> None:
    seen: dict[int, str] = {}
    sessions: set[bytes] = set()
    stopped = False  # the parent stopped Ray itself and lives on
    while os.getppid() == parent:  # re-parented: the sweep's process has ended
        current = descendants(parent)
        seen.update(current)
        sessions |= ray_sessions(current)
        if select.select([sys.stdin], [], [], 0.25)[0]:
            stopped = sys.stdin.buffer.read(len(STOP)) == STOP
            break
    time.sleep(2.0)  # after a clean exit Ray is already stopping: give it a moment
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    same_session = {pid for pid in pids if any(s in _cmdline(pid) for s in sessions)}
    still_ours = {pid for pid, started in seen.items() if (_stat(pid) or (0, ""))[1] == started}
    if stopped:  # the parent's other children are its own: only Ray's renamed processes among them
        still_ours = {pid for pid in still_ours if _cmdline(pid).startswith(b"ray::")}
    for pid in same_session | still_ours:
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
