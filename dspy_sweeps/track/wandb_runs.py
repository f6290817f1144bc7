"""W&B: one run per trial (job type = its optimizer) and one run for the sweep (job type `sweep`).

Lineage as W&B users read it: every trial run uses the sweep's data artifact (type `dataset`,
`track/datasets.py`) and logs its compiled program as a version of the `SWEEP-program` artifact
(type `dspy-program`, aliased with its trial id); the promoted program is logged again by the
sweep run with the registered model's alias (`champion`), which lands on the same version."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dspy_sweeps.records import TrialEvent, TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import DataSpec, WandbSpec
from dspy_sweeps.state import State
from dspy_sweeps.track.datasets import wandb_artifact
from dspy_sweeps.track.figures import (
    ENDED_WELL,
    LEADERBOARD_COLUMNS,
    STEP,
    event_figures,
    figures,
    final_step,
    leaderboard_rows,
    simulation_flags,
    trial_config,
)
from dspy_sweeps.track.pareto import pareto_figure
from dspy_sweeps.track.results import TrialRecord


class WandbLogger:
    """Offline runs land under the state dir (`wandb sync` uploads them later). An online W&B that
    cannot be reached within `ONLINE_TIMEOUT_S` switches the rest of the sweep to offline runs.

    Several trials' runs are open at once (`reinit="create_new"` gives each its own Run object).
    A history row per event; W&B's own `_step` counts rows, and `calls` is the x-axis its charts use.
    """

    ONLINE_TIMEOUT_S = 20

    def __init__(
        self, spec: WandbSpec, sweep: str, state: State, fingerprint: str = "", data: DataSpec | None = None
    ) -> None:
        self.spec, self.sweep, self.state, self.fingerprint, self.data = spec, sweep, state, fingerprint, data
        self.mode = spec.mode
        self.runs: dict[str, Any] = {}  # trial id -> its open run
        self.steps: dict[str, int] = {}
        self.sweep_run: Any = None
        os.environ.setdefault("WANDB_SILENT", "true")
        # Artifacts' files are staged here until `wandb sync` uploads them: in the state dir, not ~/.local.
        os.environ.setdefault("WANDB_DATA_DIR", str(state.wandb / "data"))
        state.wandb.mkdir(parents=True, exist_ok=True)

    def trial_started(self, trial: Trial) -> None:
        if trial.id in self.runs:
            return
        run = self._init(job_type=trial.kind, name=trial.id, config=trial_config(trial, self.fingerprint))
        run.define_metric(STEP)
        run.define_metric("*", step_metric=STEP)
        if self.data is not None:
            self._use(run, wandb_artifact(self.sweep, self.data, self.fingerprint))
        self.runs[trial.id] = run

    def _use(self, run: Any, artifact: Any) -> None:
        """The run's input. Offline, `use_artifact` refuses; what it does for a new artifact online
        (log it, marked to be used once committed) is then done directly, and `wandb sync` replays it."""
        if self.mode == "online":
            run.use_artifact(artifact)
        else:
            run._log_artifact(artifact, is_user_created=True, use_after_commit=True)

    def trial_events(self, trial: Trial, events: list[TrialEvent]) -> None:
        self.trial_started(trial)
        run = self.runs[trial.id]
        for event in events:
            run.log({STEP: event.calls, **event_figures(event)})
            self.steps[trial.id] = max(self.steps.get(trial.id, 0), event.calls)

    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        import wandb

        self.trial_started(trial)
        run = self.runs.pop(trial.id)
        run.tags = (*run.tags, record.status, *(["SIMULATED"] if record.simulated else []))
        run.config.update(simulation_flags(record), allow_val_change=True)
        run.log({STEP: final_step(self.steps, trial.id, record), **figures(record)})
        run.summary.update({**figures(record), "status": record.status, "error": record.error or ""})
        if result.predictions:
            table = wandb.Table(columns=["inputs", "prediction", "gold", "score"])
            for p in result.predictions:
                table.add_data(
                    *(json.dumps(p[k], ensure_ascii=False) for k in ("inputs", "prediction", "gold")), p["score"]
                )
            run.log({"val_predictions": table})
        if result.program:
            run.log_artifact(self._program_artifact(record, result.program), aliases=[trial.id])
        run.finish(exit_code=0 if record.status in ENDED_WELL else 1)
        return None

    def promoted(self, record: TrialRecord, alias: str, version: str) -> None:
        """The champion's program artifact, logged again (same files, so the same version) with `alias`."""
        if self.sweep_run is None:
            self.sweep_run = self._init(job_type="sweep", name=f"{self.sweep}-sweep")
        program = Path(record.program_path).read_text() if record.program_path else ""
        artifact = self._program_artifact(record, program)
        artifact.metadata.update({"registered_version": version})
        self.sweep_run.log_artifact(artifact, aliases=[alias, record.trial_id])

    def _program_artifact(self, record: TrialRecord, program: str) -> Any:
        """A trial's compiled program (DSPy JSON state) and what it is, as a `dspy-program` artifact."""
        import wandb

        about = {
            "trial_id": record.trial_id,
            "optimizer": record.kind,
            "student": record.student_model or record.student,
            "teacher": record.teacher_model or record.teacher or "",
            "val_score": record.val_score,
            "test_score": record.test_score,
            "data_fingerprint": record.data_fingerprint,
            **simulation_flags(record),
        }
        artifact = wandb.Artifact(f"{self.sweep}-program", type="dspy-program", metadata=dict(about))
        with artifact.new_file("program.json") as f:
            f.write(program)
        with artifact.new_file("about.json") as f:
            f.write(json.dumps(about, indent=2, sort_keys=True))
        return artifact

    def open_sweep_run(self) -> None:
        """The sweep's own run, open from the sweep's start."""
        if self.sweep_run is None:
            self.sweep_run = self._init(job_type="sweep", name=f"{self.sweep}-sweep")

    def log_sweep(self, records: list[TrialRecord]) -> None:
        """The sweep run's leaderboard and Pareto plot, logged again (a new history row) as each trial ends."""
        import wandb

        self.open_sweep_run()
        rows = leaderboard_rows(records)
        table = wandb.Table(columns=list(LEADERBOARD_COLUMNS), data=[[r[c] for c in LEADERBOARD_COLUMNS] for r in rows])
        png = self.state.wandb / f"{self.sweep}-pareto.png"  # W&B's Image copies the file into the run
        pareto_figure(records, f"{self.sweep}: val score vs cost").savefig(png)
        self.sweep_run.log(
            {
                "leaderboard": table,
                "score_vs_cost": wandb.plot.scatter(table, "cost_usd", "val_score", title="val score vs cost $"),
                "pareto": wandb.Image(str(png)),
                "trials_done": len(records),
            }
        )
        self.sweep_run.summary.update({"pareto_front": sorted(r["trial_id"] for r in rows if r["on_front"])})

    def _init(self, **kwargs: Any) -> Any:
        import wandb

        kwargs.update(project=self.spec.project, entity=self.spec.entity, group=self.sweep, dir=str(self.state.wandb))
        # Runs stay open while the sweep runs, several at once: the driver's terminal output is nobody's log.
        kwargs.update(reinit="create_new", settings=wandb.Settings(console="off"))
        if self.mode == "online":
            try:
                online = wandb.Settings(console="off", init_timeout=self.ONLINE_TIMEOUT_S)
                return wandb.init(mode="online", **{**kwargs, "settings": online})
            except Exception as exc:
                print(
                    f"W&B is unreachable ({type(exc).__name__}); logging offline under {self.state.wandb} (`wandb sync` uploads later)"
                )
                self.mode = "offline"
        return wandb.init(mode=self.mode, **kwargs)

    def close(self, status: str) -> None:
        """Runs of trials that never ended (the sweep stopped first) close as failed."""
        for run in self.runs.values():
            run.finish(exit_code=1)
        self.runs.clear()
        if self.sweep_run is not None:
            self.sweep_run.finish(exit_code=0 if status == "FINISHED" else 1)
