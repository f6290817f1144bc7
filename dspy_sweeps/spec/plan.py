"""Expand a sweep into trials: each optimizer's grid × students × teachers × seeds, plus baselines.

A trial's id is a digest of everything that changes its result: its optimizer, settings, models and
seed, and the sweep's `basis` (`trial_basis`: the data's fingerprint, which covers the files, the
query and the split, the thread count, and the source of the program's and the metric's modules).
A trial folder is keyed by the id, so no run inherits the state of a trial that computed something else.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from dspy_sweeps.spec.schema import ModelSpec, Sweep


@dataclass(frozen=True)
class Trial:
    """One optimizer run: what to compile with which models. The id is stable across runs."""

    id: str
    program: str
    metric: str
    kind: str
    student: ModelSpec
    teacher: ModelSpec | None
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    num_threads: int = 8
    estimated_calls: int = 0
    embedder: ModelSpec | None = None  # the sweep's embedder, for optimizers that take one
    trace_examples: int = 0  # test examples whose evaluation is logged as an MLflow trace (not identity)

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.kind}({shown})" if shown else self.kind


def trial_basis(sweep: Sweep, data_fingerprint: str) -> str:
    """What every trial of the sweep shares that changes its result, as one digest."""
    record = {
        "data": data_fingerprint,
        "inputs": sweep.data.inputs,
        "num_threads": sweep.num_threads,
        "program": source_hash(sweep.program),
        "metric": source_hash(sweep.metric),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def source_hash(path: str) -> str:
    """A digest of the source file of `pkg.module:attr`'s module, read without importing it (an
    edited program or metric is a different trial); the path itself when there is no file."""
    module = path.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None else None
    if not origin or not origin.endswith(".py"):
        return path
    with open(origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def plan_trials(sweep: Sweep, basis: str) -> list[Trial]:
    """Every trial of the sweep, baselines first, in a deterministic order (a search's are sampled
    as it runs: `spec/search.py`); `basis` is the sweep's `trial_basis`."""
    trials = baselines(sweep, basis)
    teachers = sweep.teachers or [None]
    for spec in (s for s in sweep.optimizers if s.kind != "none"):
        for settings in expand_grid(spec.settings):
            for student, teacher, seed in itertools.product(sweep.students, teachers, sweep.seeds):
                trials.append(make_trial(sweep, spec.kind, settings, student, teacher, seed, basis))
    return trials


def baselines(sweep: Sweep, basis: str) -> list[Trial]:
    """One uncompiled trial per student: the reference every optimizer's gain is measured from."""
    return [make_trial(sweep, "none", {}, student, None, sweep.seeds[0], basis) for student in sweep.students]


def expand_grid(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """{a: [1, 2], b: x} -> [{a: 1, b: x}, {a: 2, b: x}]."""
    axes = [(k, v if isinstance(v, list) else [v]) for k, v in settings.items()]
    return [dict(zip([k for k, _ in axes], values, strict=True)) for values in itertools.product(*[v for _, v in axes])]


def make_trial(
    sweep: Sweep, kind: str, settings: dict, student: ModelSpec, teacher: ModelSpec | None, seed: int, basis: str
) -> Trial:
    identity = {
        "basis": basis,
        "program": sweep.program,
        "metric": sweep.metric,
        "kind": kind,
        "settings": settings,
        "seed": seed,
        "student": student.model_dump(exclude_none=True),
        "teacher": teacher.model_dump(exclude_none=True) if teacher else None,
    }
    embedder = sweep.embedder if kind != "none" else None
    if embedder is not None:
        identity["embedder"] = embedder.model_dump(exclude_none=True)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    teacher_name = f"-{teacher.name}" if teacher and kind != "none" else ""
    name = kind.rpartition(":")[2]  # a teleprompter by import path is named by its class: ids are file names
    trial_id = f"{name}-{student.name}{teacher_name}-s{seed}-{digest}"
    traced = sweep.tracking.mlflow.traces if sweep.tracking.mlflow else 0
    return Trial(
        trial_id,
        sweep.program,
        sweep.metric,
        kind,
        student,
        teacher,
        seed,
        settings,
        sweep.num_threads,
        0,
        embedder,
        traced,
    )
