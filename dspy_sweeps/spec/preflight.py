"""Everything checked before Ray starts or any LM is called: data, imports, settings, budget, keys."""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass

from dspy_sweeps.data import Dataset, load_dataset
from dspy_sweeps.errors import SweepError
from dspy_sweeps.lm.checks import check_keys
from dspy_sweeps.lm.endpoints import check_settings
from dspy_sweeps.spec.imports import build_program, load_object
from dspy_sweeps.spec.optimizers import Signatures, bind_settings, check_program, check_sizes, estimate_calls
from dspy_sweeps.spec.plan import Trial, baselines, expand_grid, plan_trials, trial_basis
from dspy_sweeps.spec.schema import Sweep


@dataclass(frozen=True)
class Prepared:
    sweep: Sweep
    data: Dataset
    trials: list[Trial]
    ensemble_calls: int = 0  # the Ensemble trial after the others: its members scored on val and test
    basis: str = ""  # spec/plan.py's trial_basis: part of every trial id, including a search's later ones

    @property
    def estimated_calls(self) -> int:
        return sum(t.estimated_calls for t in self.trials) + self.ensemble_calls


def prepare(sweep: Sweep) -> Prepared:
    """Validate the sweep against its data and code; SweepError on the first problem found."""
    data = load_dataset(sweep.data)
    program = build_program(sweep.program)
    predictors = len(program.predictors())
    _check_metric(sweep.metric)
    basis = trial_basis(sweep, data.fingerprint)
    trials = _check_space(sweep, program, len(data.train), basis)
    sizes = (len(data.train), len(data.val), len(data.test))
    trials = [
        dataclasses.replace(t, estimated_calls=estimate_calls(t.kind, t.settings, sizes, predictors)) for t in trials
    ]
    top = sweep.ensemble.top if sweep.ensemble else 0
    prepared = Prepared(sweep, data, trials, top * (len(data.val) + len(data.test)) * predictors, basis)
    _check_ensemble(prepared)
    _check_budget(prepared)
    _check_tracking(sweep)
    check_settings(sweep)
    check_keys(sweep)
    return prepared


def _check_space(sweep: Sweep, program: object, train: int, basis: str) -> list[Trial]:
    """The plan's trials: the grid, or for a search the baselines and a preview of its trials
    (sampled values bound to the real signatures as grid points are); the pruner is built once."""
    from dspy_sweeps.spec import search

    search.check_space(sweep)
    if sweep.prune is not None:
        search.build_pruner(sweep.prune)
    for i, spec in enumerate(sweep.optimizers):  # a search's distributions are checked by check_space
        grid = {} if sweep.search is not None else spec.settings
        _check_optimizer(sweep, spec.kind, grid, program, train, f"optimizers.{i}")
    trials = (
        [*baselines(sweep, basis), *search.preview(sweep, basis)]
        if sweep.search is not None
        else plan_trials(sweep, basis)
    )
    for t in trials:
        bind_settings(t.kind, t.settings, where=f"optimizers ({t.label})")
    return trials


def _check_optimizer(sweep: Sweep, kind: str, grid: dict, program: object, train: int, where: str) -> None:
    """Every cell of the optimizer's grid binds to its signatures and fits this program, data and sweep."""
    from dspy_sweeps.spec.kinds import BASELINE, kind_of

    for settings in expand_grid(grid):
        bind_settings(kind, settings, where=where)
        check_sizes(kind, settings, train, where)
    if kind == BASELINE:
        return
    check_program(kind, program, sweep.program, where)
    if sweep.embedder is None and Signatures.of(kind_of(kind), where).has("vectorizer"):
        raise SweepError(
            f"{where}.kind: {kind} finds neighbours with an embedding model: add `embedder: {{name: ..., model: ...}}` "
            "(an OpenAI-compatible /v1/embeddings model)"
        )


def _check_ensemble(prepared: Prepared) -> None:
    ensemble = prepared.sweep.ensemble
    compiled = [t for t in prepared.trials if t.kind != "none"]
    if ensemble is not None and len(compiled) < ensemble.top:
        raise SweepError(
            f"ensemble.top: {ensemble.top} programs to combine, but the sweep compiles only {len(compiled)}"
        )


def _check_metric(path: str) -> None:
    """A metric is called as metric(example, prediction, trace): a class or another shape fails every trial."""
    metric = load_object(path, "metric")
    shape = "a function of (example, prediction, trace=None)"
    if isinstance(metric, type) or not callable(metric):
        raise SweepError(
            f"metric: '{path}' is {'a class' if isinstance(metric, type) else 'not callable'}, not {shape}"
        )
    try:
        inspect.signature(metric).bind(None, None)
    except TypeError as exc:
        raise SweepError(f"metric: '{path}' cannot be called as {shape}: {exc}") from None
    except ValueError:  # no signature to read (a builtin): leave it to the call
        pass


def _check_budget(prepared: Prepared) -> None:
    limit = prepared.sweep.budget.max_lm_calls
    if limit is not None and prepared.estimated_calls > limit:
        raise SweepError(
            f"budget.max_lm_calls: the plan needs about {prepared.estimated_calls:,} LM calls, "
            f"over the budget of {limit:,} (raise it, or trim the grid)"
        )


def _check_tracking(sweep: Sweep) -> None:
    wandb = sweep.tracking.wandb
    if wandb and wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise SweepError("tracking.wandb.mode: online needs the WANDB_API_KEY variable (or use mode: offline)")
    if sweep.promote and sweep.tracking.mlflow is None:
        raise SweepError("promote: promotion uses the MLflow registry, so tracking.mlflow must not be null")
