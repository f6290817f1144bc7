"""Endpoint faults injected into a running sweep (issue: reliability): short outages are retried,
a long one fails only its trials (or goes to a fallback model), a refused key stops the sweep. The faults come
from the simulator's fault injection (a test facility); `make reliability` measures the same cases apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sweep_helpers import BOOTSTRAP_ONLY, UNTRACKED, pointed_at, rows, sweep_cli

from dspy_sweeps_sim.launch import SimServer

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def test_endpoint_faults_are_retried_or_fail_only_their_trials(sim: SimServer, tmp_path: Path) -> None:
    """student: a short run of 500s, garbage, hangs past its 10 s timeout and a 429 (retried,
    recovered); student2: down for good."""
    sim.set_faults("error500", count=4, model="student")
    sim.set_faults("garbage", count=3, model="student", append=True)
    sim.set_faults("hang", count=2, model="student", hang_seconds=60, append=True)
    sim.set_faults("rate_limit", count=2, retry_after=1, model="teacher", append=True)
    sim.set_faults("error500", model="student2", append=True)
    result = sweep_cli(
        "run",
        "sweeps/demo.yaml",
        *pointed_at(sim, ("student", "student2")),
        "--set",
        BOOTSTRAP_ONLY,
        *UNTRACKED,
        state=tmp_path / "state",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = rows(tmp_path / "state")
    healthy = [r for r in records if "student2" not in r["student"]]
    broken = [r for r in records if "student2" in r["student"]]
    assert len(healthy) == 2 and all(r["status"] == "ok" for r in healthy)
    assert len(broken) == 2 and all(r["status"] == "failed" and r["reason"] == "endpoint" for r in broken)
    assert all(r["val_score"] is None for r in broken), "a failed call is never scored as a wrong answer"
    faults = sim.stats()["models"]
    assert faults["student"]["faults"]["error500"] == 4 and faults["teacher"]["faults"]["rate_limit"] == 2
    assert faults["student"]["faults"]["hang"] == 2 and faults["student"]["faults"]["garbage"] == 3


def test_a_teacher_down_for_good_falls_back_and_its_trials_finish(sim: SimServer, tmp_path: Path) -> None:
    """The teacher answers 503 to everything; its fallback (another model on the endpoint) answers."""
    sim.set_faults("error503", model="teacher")
    backup = f"{{name: backup, model: openai/student2, api_base: '{sim.base_url}'}}"
    result = sweep_cli(
        "run",
        "sweeps/demo.yaml",
        *pointed_at(sim),
        "--set",
        "teachers.0.retries=2",
        "--set",
        f"teachers.0.fallbacks=[{backup}]",
        "--set",
        BOOTSTRAP_ONLY,
        *UNTRACKED,
        state=tmp_path / "state",
    )
    records = rows(tmp_path / "state")
    compiled = [r for r in records if r["kind"] == "bootstrap_fewshot"]
    served = [json.loads(r["calls_by_model"]) for r in compiled]
    refused = sim.stats()["models"]["teacher"]["faults"].get("error503", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert refused > 0, "the teacher's 503s were hit"
    assert compiled and all(r["status"] == "ok" for r in compiled)
    for record, calls in zip(compiled, served, strict=True):
        assert calls.get("openai/student2", 0) > 0 and "openai/teacher" not in calls, calls
        assert calls["openai/student"] > 0, "the student's own calls are counted under its model"
        assert record["fell_back"] == calls["openai/student2"] and record["gave_up"] == record["fell_back"]
        assert record["retries"] == 2 * record["gave_up"], "each teacher call: one send and two retries"
    assert refused == 3 * sum(r["gave_up"] for r in records)
    assert sim.stats()["models"]["student2"]["ok"] == sum(s["openai/student2"] for s in served)


def test_a_refused_key_stops_the_sweep_at_once(sim: SimServer, tmp_path: Path) -> None:
    sim.set_faults("unauthorized", model="teacher")
    result = sweep_cli(
        "run",
        "sweeps/demo.yaml",
        *pointed_at(sim),
        "--set",
        "teachers.0.api_key_env=SWEEP_TEACHER_KEY",
        "--set",
        BOOTSTRAP_ONLY,
        *UNTRACKED,
        state=tmp_path / "state",
        env={"SWEEP_TEACHER_KEY": "sk-wrong"},
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # Ray logs its own lines too
    refused = sim.stats()["models"]["teacher"]["faults"].get("unauthorized", 0)
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "teacher" in lines[0] and "SWEEP_TEACHER_KEY" in lines[0], result.stderr[-2000:]
    assert "sk-wrong" not in result.stdout + result.stderr
    assert refused <= 2, "no retries: the endpoint is not called again once it refused the key"
