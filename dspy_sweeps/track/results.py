"""Trial records on disk (one Parquet file per sweep) and the leaderboard, read through DuckDB."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspy_sweeps.records import TrialResult
from dspy_sweeps.spec.plan import Trial


@dataclass(frozen=True)
class TrialRecord:
    """One leaderboard row: what the trial was, and what it produced."""

    sweep: str
    trial_id: str
    kind: str
    settings: str
    student: str
    teacher: str | None
    seed: int
    status: str
    error: str | None
    reason: str | None
    val_score: float | None
    test_score: float | None
    lm_calls: int
    calls_requested: int
    cache_hits: int
    merged_calls: int
    failed_calls: int
    failed_examples: int
    estimated_calls: int
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cost_usd: float
    duration_s: float
    program_path: str | None
    data_fingerprint: str
    mlflow_run_id: str | None = None
    tracked: bool = False  # logged to W&B and MLflow; --resume re-runs a trial that was not
    tracked_by: str = ""  # which trackers logged it (`tracking_identity`): a reused trial's runs are in this run's
    attempts: int = 1  # runs of the trial it took: a retry after a worker died, or a resume
    retries: int = 0  # LM calls resent by the gateway
    gave_up: int = 0  # LM calls whose retries on one model ran out
    fell_back: int = 0  # LM calls passed on to a fallback model
    calls_by_model: str = "{}"  # JSON: answered LM calls per model (the sweep's model strings)
    # `student`/`teacher` are the specs' names (their identity); these say what they called and whether it was real.
    student_model: str = ""
    student_simulated: bool = False
    teacher_model: str | None = None
    teacher_simulated: bool = False
    val_scores: list[float | None] = field(default_factory=list)  # per example, in split order; None: not scored
    test_scores: list[float | None] = field(default_factory=list)
    format_failures: int = 0  # malformed answers (the model's failures, scored as wrong), beside failed_calls
    adapter_fallbacks: int = 0  # extra calls DSPy's JSON fallback made after a malformed chat-format answer
    teacher_retries: int = 0  # teacher calls resampled after a malformed answer
    teacher_as_text: int = 0  # teacher answers taken as plain text once every resample was malformed

    @property
    def simulated(self) -> bool:
        """Its scores came from (or its program was compiled with) the simulated endpoint."""
        return self.student_simulated or self.teacher_simulated

    @classmethod
    def of(
        cls,
        sweep: str,
        trial: Trial,
        result: TrialResult,
        program_path: Path | None,
        fingerprint: str,
        simulated: Mapping[str, bool] | None = None,
    ) -> TrialRecord:
        """`simulated` tells, by spec (`model_dump_json()`), which models' answers were simulated
        (`run_sweep` checks their endpoints); without it, a local endpoint plugin that declares its
        answers simulated (the `sim/` models) is the only sign."""
        from dspy_sweeps.lm.endpoints import simulated as plugin_simulated

        simulated = simulated or {}
        teacher = trial.teacher if trial.teacher and trial.kind != "none" else None
        return cls(
            sweep=sweep,
            trial_id=trial.id,
            kind=trial.kind,
            settings=json.dumps(trial.settings, sort_keys=True),
            student=trial.student.name,
            teacher=teacher.name if teacher else None,
            student_model=trial.student.model,
            student_simulated=simulated.get(trial.student.model_dump_json(), plugin_simulated(trial.student)),
            teacher_model=teacher.model if teacher else None,
            teacher_simulated=bool(teacher and simulated.get(teacher.model_dump_json(), plugin_simulated(teacher))),
            val_scores=list(result.val_scores),
            test_scores=list(result.test_scores),
            seed=trial.seed,
            status=result.status,
            error=result.error,
            reason=result.reason,
            val_score=result.val_score,
            test_score=result.test_score,
            lm_calls=result.lm_calls,
            calls_requested=result.calls_requested,
            cache_hits=result.cache_hits,
            merged_calls=result.merged_calls,
            failed_calls=result.failed_calls,
            failed_examples=result.failed_examples,
            estimated_calls=trial.estimated_calls,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_s=result.latency_s,
            cost_usd=result.cost_usd,
            duration_s=result.duration_s,
            program_path=str(program_path) if program_path else None,
            data_fingerprint=fingerprint,
            attempts=result.attempts,
            retries=result.retries,
            gave_up=result.gave_up,
            fell_back=result.fell_back,
            calls_by_model=json.dumps(result.calls_by_model, sort_keys=True),
            format_failures=result.format_failures,
            adapter_fallbacks=result.adapter_fallbacks,
            teacher_retries=result.teacher_retries,
            teacher_as_text=result.teacher_as_text,
        )


def write_records(path: Path, records: list[TrialRecord]) -> None:
    """Rewrite the sweep's file atomically: a crash mid-write leaves the previous file intact."""
    write_tables(path, [records_table(records)])


def records_table(records: list[TrialRecord]) -> Any:
    """The records as an Arrow table (the results file's rows), their fields read as they are
    (`asdict` would deep-copy each one: most of the results thread's time in a large sweep)."""
    import pyarrow as pa

    return pa.Table.from_pylist([vars(r) for r in records])


def write_tables(path: Path, tables: list[Any]) -> None:
    """`write_records` for records already made into tables, in order (a column all None in one
    table takes the others' type), so a writer that adds rows converts only the new ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    try:
        pq.write_table(pa.concat_tables(tables, promote_options="permissive"), tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: no half-written file is left beside the results
        raise
    os.replace(tmp, path)


def read_records(path: Path) -> list[TrialRecord]:
    """The records a sweep has written so far (none if it never wrote any)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return []
    names = {f.name for f in dataclasses.fields(TrialRecord)}
    return [TrialRecord(**{k: v for k, v in row.items() if k in names}) for row in pq.read_table(path).to_pylist()]


def leaderboard(path: Path) -> list[dict[str, Any]]:
    """Finished trials best first (val score, then fewer LM calls), failed trials last."""
    import duckdb

    query = """
        SELECT * FROM read_parquet(?, union_by_name = true)
        ORDER BY status = 'ok' DESC, val_score DESC NULLS LAST, lm_calls ASC, trial_id
    """
    with duckdb.connect(":memory:") as con:
        result = con.execute(query, [str(path)])
        columns = [d[0] for d in result.description]
        return [dict(zip(columns, row, strict=True)) for row in result.fetchall()]
