"""The reaper of a Ray the driver started, in a driver that lives on after its sweep (a notebook, a
bench, a test process): stopping Ray ends the reaper too, with what was left of that Ray, and leaves
the driver's own children alone. (A SIGKILLed driver's reaper is in test_crashes.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from ray_head import own_ray

REPO = Path(__file__).resolve().parents[2]

# A driver that starts a local Ray as `sweep run` does, stops it, and stays up with a child of its own.
DRIVER = """
import json, subprocess, sys
from pathlib import Path
import psutil
from dspy_sweeps.run import runner

own = subprocess.Popen(["sleep", "300"])
runner.start_ray(None, Path.cwd())
children = psutil.Process().children(recursive=True)
reapers = [p.pid for p in children if "dspy_sweeps.run.reaper" in " ".join(p.cmdline())]
rays = [p.pid for p in children if p.pid != own.pid and p.pid not in reapers]
runner.stop_ray()
print(json.dumps({"own": own.pid, "reapers": reapers, "rays": rays}), flush=True)
sys.stdin.read()  # lives on until the test closes its stdin
own.kill()
"""


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stopping_ray_ends_its_reaper_and_leaves_the_drivers_own_children_alone() -> None:
    env = own_ray({**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        started = json.loads(driver.stdout.readline())
        assert len(started["reapers"]) == 1 and started["rays"], started
        deadline = time.monotonic() + 60  # a reaper waits 2 s after the stop, then clears and exits
        while time.monotonic() < deadline and _running(started["reapers"][0]):
            time.sleep(0.25)
        assert not _running(started["reapers"][0]), "the reaper outlived the Ray it watched"
        assert driver.poll() is None and _running(started["own"]), "the driver and its own child live on"
        left = [pid for pid in started["rays"] if _running(pid)]
        assert left == [], f"Ray's processes outlived its stop: {left}"
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)
