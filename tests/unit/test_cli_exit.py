"""`sweep` ends without Python's module teardown (`cli/main.py main`), and still does what an exit
is for: other threads finish (thread pools are told to stop first), exit handlers run (the private
`threading._shutdown` and `atexit._run_exitfuncs` it calls are pinned here),
the output arrives whole, and the status is the command's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HARNESS = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from dspy_sweeps.cli.main import main

marker = Path(sys.argv[1])
def late() -> None:
    time.sleep(0.3)
    marker.with_suffix(".thread").write_text("finished")
threading.Thread(target=late).start()  # not a daemon: an exit waits for it
idle = ThreadPoolExecutor(1)
idle.submit(int).result()  # its worker, idle and not a daemon, must be told to stop, not waited on forever
atexit.register(marker.write_text, "ran")
sys.argv = ["sweep", *sys.argv[2:]]
main()
"""


def sweep_in_harness(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    marker = tmp_path / "atexit"
    command = [sys.executable, "-c", HARNESS, str(marker), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={"PATH": ""})


def test_a_command_that_succeeds_exits_0_after_its_threads_and_exit_handlers(tmp_path: Path) -> None:
    done = sweep_in_harness(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: sweep" in done.stdout and "submit" in done.stdout, "the whole help, flushed"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "atexit.thread").read_text() == "finished"


def test_bad_input_keeps_its_status_and_its_one_line(tmp_path: Path) -> None:
    done = sweep_in_harness(tmp_path, "run", "sweeps/no-such-sweep.yaml")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: sweeps/no-such-sweep.yaml: no such sweep file"]
    assert (tmp_path / "atexit").read_text() == "ran"
