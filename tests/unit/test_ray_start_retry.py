"""A local Ray whose raylet misses Ray's 30-second registration window is started again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dspy_sweeps.run import runner

TIMED_OUT = "The current node timed out during startup. This could happen because some of the raylet failed"


def test_a_start_that_timed_out_is_tried_again_and_its_leftovers_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    leftovers: list[subprocess.Popen] = []
    calls: list[dict] = []

    def init(**options: object) -> None:
        calls.append(options)
        if len(calls) == 1:  # what a failed start leaves: a child process (its GCS, raylet)
            leftovers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
            raise Exception(TIMED_OUT)

    monkeypatch.setattr(runner.ray, "init", init)
    runner._init_local({"address": None})
    import psutil

    assert len(calls) == 2
    assert not psutil.pid_exists(leftovers[0].pid)  # killed and reaped, not left to run


def test_other_start_failures_and_the_last_try_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def init(**options: object) -> None:
        calls.append("init")
        raise Exception(TIMED_OUT)

    monkeypatch.setattr(runner.ray, "init", init)
    with pytest.raises(Exception, match="timed out during startup"):
        runner._init_local({}, tries=2)
    assert len(calls) == 2

    monkeypatch.setattr(runner.ray, "init", lambda **_: (_ for _ in ()).throw(RuntimeError("port taken")))
    with pytest.raises(RuntimeError, match="port taken"):
        runner._init_local({})


def test_a_ray_address_is_checked_before_ray_waits_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Joining: an address nothing listens at, or that is no address, is one line naming where it came
    from; a listening one, `auto` and `local` pass."""
    import socket

    from dspy_sweeps.errors import SweepError

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        for fine in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "auto", "local"):
            runner.check_ray_address(fine)
    with pytest.raises(SweepError, match=rf"^--address 127.0.0.1:{port}: no Ray head answers at 127.0.0.1:{port} \("):
        runner.check_ray_address(f"127.0.0.1:{port}")  # closed now
    monkeypatch.setenv("RAY_ADDRESS", "head-without-a-port")
    with pytest.raises(SweepError, match=r"^RAY_ADDRESS head-without-a-port: expected host:port"):
        runner.check_ray_address(None)
