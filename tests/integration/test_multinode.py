"""A real multi-node Ray cluster on one machine (issue 16): a head on 127.0.0.1 with no CPUs for trial
hosts, and worker nodes on 127.0.0.2 and 127.0.0.3, each in its own mount namespace with a tmpfs over
the project's `pipelines/`, the driver's state dir and the head's Ray temp folder, so a node shares the
network with the driver but none of its files (tests/ray_head.py `start_node`). Trial checkpoints go
to a storage path every node mounts (the stand-in for a shared filesystem or s3://).

- `sweep run --address` ships the project: every trial runs on the second node, which cannot see
  `pipelines/`; promotion and `sweep pull` work on the driver.
- `sweep submit` runs the same sweep as a Ray job (its driver on the head, with the head's PATH): every
  trial again on the second node; after the job its results are read from storage on the driver, and
  `sweep pull` reads its champion from the MLflow server.
- The node running GEPA is lost mid-run (its raylet's process group killed): the trial resumes on a
  third node from storage, with attempts 2, spending fewer metric calls than GEPA's whole run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ray_head import RayHead, RayNode, own_ray, start_head, start_node
from sweep_helpers import REPO, SWEEP, pointed_at, rows

from dspy_sweeps_sim.launch import SimServer

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
NODE_LOCAL = Path(tempfile.gettempdir()) / "dspy-sweeps-trials"  # run/storage.py's working folders
# Node death noticed in seconds, not Ray's default half a minute (the GCS's health checks of raylets).
# Generous per check: on a loaded machine a stricter timeout fails the head's own raylet at start-up.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "5",
}


@dataclass
class Cluster:
    head: RayHead
    driver_dir: Path  # the driver's own files (state dirs): hidden from every worker node
    storage: Path  # reached by every node
    nodes: list[RayNode] = field(default_factory=list)

    def add_node(self, ip: str, tries: int = 3) -> RayNode:
        node = start_node(self.head, ip, num_cpus=2, hidden=[REPO / "pipelines", self.driver_dir], tries=tries)
        self.nodes.append(node)
        return node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # The dashboard (the job server `sweep submit` talks to) on a free port: above Ray's worker ports
    # (10002-19999), not its agent's 52365. Started as a user meets it: the venv's `bin` is not on the
    # head's PATH, the PATH a job's entrypoint runs with.
    env = {**own_ray(dict(os.environ)), **FAST_HEALTH_CHECKS}
    running = _start_cluster(env, tmp_path_factory.mktemp("driver"), tmp_path_factory.mktemp("shared-storage"))
    try:
        yield running
    finally:
        for node in running.nodes:
            node.lose()
            shutil.rmtree(node.log.parent, ignore_errors=True)
        running.head.stop()


def _start_cluster(env: dict[str, str], driver_dir: Path, storage: Path, rounds: int = 3) -> Cluster:
    """A head and its first node, both again when the node cannot join: on a loaded machine a head's
    processes can still fail after it is up, and a node never joins a head that stopped."""
    failures = []
    for _ in range(rounds):
        running = Cluster(start_head(dashboard=True, num_cpus=0, env=env, venv_on_path=False), driver_dir, storage)
        try:
            running.add_node("127.0.0.2", tries=1)
            return running
        except AssertionError as exc:
            running.head.stop()
            failures.append(str(exc))
    raise AssertionError("\n\n".join(failures))


def sweep_on(cluster: Cluster, state: Path, *args: str, mlflow: str) -> subprocess.Popen:
    env = {**own_ray(dict(os.environ)), **cluster.head.env, "MLFLOW_TRACKING_URI": mlflow}
    cmd = [str(SWEEP), *args, "--address", cluster.head.address, "--state-dir", str(state)]
    cmd += ["--storage", str(cluster.storage / state.name)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def hosts_of(storage: Path) -> dict[str, str]:
    """Trial id -> the Ray node address its (last) host ran on, from the trial folders in storage."""
    return {p.parent.name: p.read_text().split()[2] for p in storage.glob("trials/demo/*/host")}


def test_sweep_run_address_runs_every_trial_on_a_node_without_the_project(
    cluster: Cluster, sim: SimServer, mlflow_server: str, tmp_path: Path
) -> None:
    state = cluster.driver_dir / "run-address"
    grid = "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]"
    names = ["--set", "promote.model=multinode", "--set", "tracking={wandb: null, mlflow: {experiment: multinode}}"]
    run = sweep_on(
        cluster, state, "run", "sweeps/demo.yaml", *pointed_at(sim), "--set", grid, *names, mlflow=mlflow_server
    )
    out, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    records = rows(state)
    assert sorted(r["kind"] for r in records) == ["bootstrap_fewshot", "none"]
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in records), records
    assert set(hosts_of(cluster.storage / state.name).values()) == {"127.0.0.2"}, "every trial ran on the second node"
    assert "promoted" in out.lower(), out[-2000:]

    env = {**own_ray(dict(os.environ)), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    pulled = subprocess.run(
        [str(SWEEP), "pull", "multinode@champion", "-o", str(tmp_path / "pulled"), "--tracking-uri", mlflow_server],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert (tmp_path / "pulled" / "program.json").is_file()


def test_sweep_submit_runs_every_trial_on_a_node_without_the_project(
    cluster: Cluster, sim: SimServer, mlflow_server: str, tmp_path: Path
) -> None:
    state, storage = cluster.driver_dir / "submit", cluster.storage / "submit"
    assert cluster.head.dashboard is not None
    env = {**own_ray(dict(os.environ)), **cluster.head.env, "MLFLOW_TRACKING_URI": mlflow_server}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    overrides = [*pointed_at(sim), "--set", "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]"]
    overrides += [
        "--set",
        "promote.model=multinode-job",
        "--set",
        "tracking={wandb: null, mlflow: {experiment: multinode-job}}",
    ]

    def sweep(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(SWEEP), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    address = ["--address", cluster.head.dashboard]
    submitted = sweep(
        "submit", "sweeps/demo.yaml", *address, *overrides, "--state-dir", str(state), "--storage", str(storage),
        "--follow", timeout=900,
    )  # fmt: skip
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    job_id = submitted.stdout.splitlines()[0].strip()
    assert "promoted v1 as @champion" in submitted.stdout, submitted.stdout[-3000:]  # the job's log, streamed
    status = sweep("status", job_id, *address)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, (status.stdout, status.stderr)

    workers = {node.ip for node in cluster.nodes if node.process.poll() is None}  # 127.0.0.2, the head excluded
    hosts = hosts_of(storage)
    assert len(hosts) == 2 and set(hosts.values()) == workers, (hosts, workers)

    # After the job, on the driver: the results from storage, then the champion from the MLflow server.
    results = sweep("results", "demo", "--storage", str(storage))
    assert results.returncode == 0, results.stderr[-2000:]
    pulled = sweep("pull", "multinode-job@champion", "-o", str(tmp_path / "pulled"), "--tracking-uri", mlflow_server)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    meta = json.loads((tmp_path / "pulled" / "metadata.json").read_text())
    assert meta["trial_id"] in hosts and (tmp_path / "pulled" / "program.json").is_file()
    assert meta["trial_id"] in results.stdout and "promoted" in results.stdout, results.stdout


def gepa_evals(path: Path) -> int:
    return pickle.loads(path.read_bytes())["total_num_evals"]


def test_a_node_lost_mid_gepa_has_its_trial_resumed_on_another_node_from_storage(
    cluster: Cluster, sim: SimServer, mlflow_server: str
) -> None:
    state = cluster.driver_dir / "node-loss"
    storage = cluster.storage / state.name
    second = cluster.nodes[0]
    lost: dict[str, float] = {}
    seen: list[int] = []  # GEPA's metric calls in the states the retry saved, as they landed

    def lose_the_node_mid_gepa(run: subprocess.Popen) -> None:
        """Lose the node once GEPA has saved state to storage; then watch the state the retry saves:
        resumed, GEPA's count of metric calls never drops below what storage held at the loss (a
        GEPA started again from nothing would save a smaller count at its first iteration)."""
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and run.poll() is None:
            saved = list(storage.glob("trials/demo/gepa-*/gepa/gepa_state.bin"))
            if "at" not in lost and saved and gepa_evals(saved[0]) > 0:
                lost["evals"] = gepa_evals(saved[0])
                second.lose()
                lost["at"] = time.monotonic()
                # The lost node's working folder (its /tmp is this machine's): what GEPA had when it died.
                working = list(NODE_LOCAL.glob(f"demo/{saved[0].parents[1].name}-*/gepa/gepa_state.bin"))
                lost["on_node"] = max((gepa_evals(p) for p in working), default=lost["evals"])
                for folder in working:
                    shutil.rmtree(folder.parents[1], ignore_errors=True)
                cluster.add_node("127.0.0.3")  # where the trial can run again
            elif "at" in lost and saved and "127.0.0.3" in hosts_of(storage).get(saved[0].parents[1].name, ""):
                seen.append(gepa_evals(saved[0]))
            time.sleep(0.1)

    grid = "optimizers=[{kind: gepa, max_metric_calls: 200}]"
    args = ["run", "sweeps/demo.yaml", *pointed_at(sim), "--set", grid, "--set", "hosts={trials_per_host: 1}"]
    args += ["--set", "tracking={wandb: null, mlflow: {experiment: multinode-loss}}", "--set", "promote=null"]
    run = sweep_on(cluster, state, *args, mlflow=mlflow_server)
    watcher = threading.Thread(target=lose_the_node_mid_gepa, args=(run,))
    watcher.start()
    out, err = run.communicate(timeout=1200)
    watcher.join()
    records = {r["kind"]: r for r in rows(state)} if (state / "results" / "demo.parquet").exists() else {}
    gepa = records.get("gepa", {})
    final = list(storage.glob("trials/demo/gepa-*/gepa/gepa_state.bin"))
    total = gepa_evals(final[0]) if final else 0
    assert "at" in lost, f"the node was not lost mid-GEPA: {err[-3000:]}"
    assert run.returncode == 0, err[-3000:]
    assert len(rows(state)) == 2 and all(r["status"] == "ok" for r in records.values()), records
    assert gepa["attempts"] == 2, "retried once, after its node was lost"
    assert hosts_of(storage)[gepa["trial_id"]] == "127.0.0.3", "the retry ran on the third node"
    assert lost["evals"] < total <= 200 + 60, (lost, total)  # GEPA may end past its budget by one evaluation
    assert seen and min(seen) >= lost["evals"], "GEPA resumed from the state in storage, not from nothing"
    print(f"GEPA metric calls: {total} in all, {lost['evals']} in storage at the loss, {lost['on_node']} on the node")
    assert total - lost["evals"] < total, "so the resumed attempt spent fewer metric calls than a fresh run"
