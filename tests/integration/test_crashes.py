"""Crashes during a sweep (issue: reliability): a trial's host, the driver itself and the state
directory's disk. Finished work is never lost or redone and nothing is left running (`make reliability`
measures the same cases apart)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from ray_head import own_ray
from sweep_helpers import BOOTSTRAP_ONLY, REPO, SWEEP, UNTRACKED, pointed_at, rows, sweep_cli
from wandb_reader import read_runs

from dspy_sweeps_sim.launch import SimServer

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def test_a_killed_trial_host_has_its_trial_retried_and_gepa_resumes(sim: SimServer, tmp_path: Path) -> None:
    """One trial per host: GEPA's host is SIGKILLed once GEPA has saved its state in the trial's
    folder; a fresh host re-runs the trial, whose GEPA finds its log_dir and resumes; the baseline
    trial on the other host is untouched, and every trial finishes once."""
    killed: list[int] = []
    gepa_states: list[Path] = []

    def kill_the_gepa_host(cli: subprocess.Popen) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and cli.poll() is None and not killed:
            gepa_states[:] = list((tmp_path / "trials").glob("demo/gepa-*/gepa/gepa_state.bin"))
            hosts = {p.pid: p for p in psutil.Process(cli.pid).children(recursive=True) if "TrialHost" in _title(p)}
            markers = list((tmp_path / "trials").glob("demo/gepa-*/host"))
            pid = int(markers[0].read_text().split()[1]) if markers else None
            if gepa_states and pid in hosts and len(hosts) == 2:  # both hosts up, GEPA's has saved its state
                hosts[pid].kill()
                killed.append(pid)
            time.sleep(0.1)

    grid = "optimizers=[{kind: gepa, max_metric_calls: 150}]"
    hosts = "hosts={trials_per_host: 1}"
    args = ["run", "sweeps/demo.yaml", *pointed_at(sim), "--set", grid, "--set", hosts, *UNTRACKED]
    result = run_with(kill_the_gepa_host, args, state=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    all_rows = rows(tmp_path)
    records = {r["kind"]: r for r in all_rows}
    assert killed, "GEPA's host was not found running after it saved its state"
    assert len(all_rows) == 2, "every trial is recorded exactly once"
    assert sorted(records) == ["gepa", "none"] and all(r["status"] == "ok" for r in records.values())
    assert records["gepa"]["attempts"] == 2, "retried once, in the folder where GEPA saved its state"
    assert gepa_states[0].is_file(), "GEPA's saved state stayed in the trial's folder for the retry"
    gepa_dir = gepa_states[0].parents[1]
    assert int((gepa_dir / "host").read_text().split()[1]) != killed[0], "the retry ran on a fresh host"
    assert records["none"]["attempts"] == 1, "the other host's trial was not disturbed"


def test_a_killed_driver_leaves_nothing_running_and_resumes(sim: SimServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    grid = "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: [1, 2]}]"
    args = [
        "run",
        "sweeps/demo.yaml",
        *pointed_at(sim),
        "--set",
        grid,
        "--set",
        "parallelism=1",
        "--set",
        "promote=null",
    ]
    children: list[psutil.Process] = []

    def kill_driver_after_first_trial(cli: subprocess.Popen) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and cli.poll() is None:
            if (state / "results" / "demo.parquet").exists() and any(r["tracked"] for r in rows(state)):
                children.extend(psutil.Process(cli.pid).children(recursive=True))
                cli.send_signal(signal.SIGKILL)
                return
            time.sleep(0.2)

    killed = run_with(kill_driver_after_first_trial, args, state=state)
    assert killed.returncode == -signal.SIGKILL, (
        f"the driver should have been killed mid-sweep: {killed.stderr[-3000:]}"
    )
    before = {r["trial_id"]: r for r in rows(state)}
    left = _alive_after(children, seconds=20)
    resumed = sweep_cli(*args, "--resume", state=state)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {r["trial_id"]: r for r in rows(state)}
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(f"sqlite:///{state}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{state}/mlflow.db").get_experiment_by_name("demo").experiment_id]
    )
    children_runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    # A trial's runs open when it starts: the one the driver died in is closed as interrupted on resume.
    interrupted = [r for r in children_runs if r.data.tags.get("status") == "interrupted"]
    finished_runs = [r for r in children_runs if r.info.status == "FINISHED"]
    wandb_trials = [r for r in read_runs(state / "wandb" / "wandb") if r.job_type != "sweep"]
    # Kept by --resume: what finished and was tracked (ends are saved in batches, then tracked one by one,
    # so a trial on disk whose tracking the kill cut short runs again and is tracked then).
    rerun = [
        t
        for t, r in before.items()
        if r["status"] == "ok" and r["tracked"] and after[t]["duration_s"] != r["duration_s"]
    ]
    assert left == [], f"processes outlived the killed driver: {left}"
    assert "resuming:" in resumed.stdout
    assert len(after) == 3 and all(r["status"] == "ok" for r in after.values())
    assert rerun == [], "finished and tracked trials are not run again"
    assert len(finished_runs) == 3, "one finished MLflow run per trial, none duplicated"
    assert interrupted and all(r.info.status == "KILLED" for r in interrupted), "the run the driver died in"
    assert len(children_runs) == 3 + len(interrupted)
    assert len([r for r in wandb_trials if r.exit_code == 0]) == 3, "one finished W&B run per trial"


def run_with(fault, args: list[str], state: Path) -> subprocess.CompletedProcess:
    """Run the CLI with `args` while `fault(process)` acts on it from a thread."""
    cmd = [str(SWEEP), *args, "--state-dir", str(state)]
    # Its own Ray: the faults act on the processes the driver starts (its hosts) and on what it leaves.
    env = own_ray({**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    cli = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread = threading.Thread(target=fault, args=(cli,))
    thread.start()
    stdout, stderr = cli.communicate(timeout=600)
    thread.join()
    return subprocess.CompletedProcess(cmd, cli.returncode, stdout, stderr)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _title(proc: psutil.Process) -> str:
    """A Ray worker's process title (`ray::TrialHost.run`), or its command line."""
    try:
        return f"{proc.name()} {' '.join(proc.cmdline())}"
    except psutil.Error:
        return ""


def _alive_after(processes: list[psutil.Process], seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.5)
    return [" ".join(_cmdline(p))[:120] for p in alive]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 MB tmpfs of its own for the state dir, so filling it fills nothing else (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_sweep_cleanly_and_resume_finishes_it(sim: SimServer, small_disk: Path) -> None:
    state, ballast = small_disk / "state", small_disk / "ballast"
    args = [
        "run",
        "sweeps/demo.yaml",
        *pointed_at(sim),
        "--set",
        BOOTSTRAP_ONLY,
        "--set",
        "parallelism=1",
        "--set",
        "promote=null",
    ]

    def fill_disk_after_first_trial(cli: subprocess.Popen) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and cli.poll() is None:
            if (state / "results" / "demo.parquet").exists() and any(r["tracked"] for r in rows(state)):
                with ballast.open("wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * (1 << 20))
                sim.set_faults("ok")  # the held trial goes on, now onto a full disk
                return
            time.sleep(0.2)

    # The second trial (BootstrapFewShot) starts with teacher calls: they are held until the disk is
    # full, so it cannot end before the first trial's tracked row is seen (ends are saved in batches).
    # Each hold drops the call after 15 s and the gateway resends it, for up to a minute.
    sim.set_faults("hang", model="teacher", hang_seconds=15)
    full = run_with(fill_disk_after_first_trial, args, state=state)
    ballast.unlink()
    assert full.returncode == 2, full.stderr[-3000:]
    before = {r["trial_id"]: r for r in rows(state)}  # the last complete results file
    resumed = sweep_cli(*args, "--resume", state=state)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {r["trial_id"]: r for r in rows(state)}
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    # Kept by --resume: what finished and was tracked (a trial whose tracking the full disk broke runs again).
    rerun = [
        t
        for t, r in before.items()
        if r["status"] == "ok" and r["tracked"] and after[t]["duration_s"] != r["duration_s"]
    ]
    assert len(errors) == 1 and "the state directory" in errors[0] and "is full" in errors[0], full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "resuming:" in resumed.stdout
    assert len(after) == 2 and all(r["status"] == "ok" for r in after.values())
    assert rerun == [], "trials finished and tracked before the disk filled are not run again"
