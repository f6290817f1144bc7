"""Search spaces: distributions in optimizer settings, sampled by Optuna; pruners from `prune:`.

    search: {kind: tpe, trials: 16, seed: 0}          # grid | random | tpe
    prune: {kind: successive_halving, min_resource: 64, reduction_factor: 2}
    optimizers:
      - {kind: mipro_v2, num_candidates: {int: [2, 8]}, init_temperature: {float: [0.1, 1.5], log: true}}
      - {kind: gepa, max_metric_calls: {choice: [60, 120]}}

A setting is a constant, a list (a choice, as it is a grid axis without `search:`), or a
distribution: `{int: [low, high]}`, `{float: [low, high]}` (with `log: true` or `step: s`),
`{choice: [...]}`. With more than one optimizer, student, teacher or seed, which one a trial
uses is a choice too. Random and TPE sample define-by-run (an optimizer's settings are
sampled only for trials of that optimizer); a grid is every point, enumerated here and
visited by Optuna's GridSampler as one categorical `point`, so conditional spaces work.

Nothing here knows Ray or DSPy's runtime; the optimizer classes are read only to bind values.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from typing import Any

from dspy_sweeps.errors import SweepError
from dspy_sweeps.spec.optimizers import bind_settings, optimizer_class
from dspy_sweeps.spec.plan import Trial, expand_grid, make_trial
from dspy_sweeps.spec.schema import ModelSpec, Prune, Sweep

DISTRIBUTIONS = ("int", "float", "choice")
OPTIONS = ("log", "step")
PRUNERS = {"median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner"}


@dataclass(frozen=True)
class Dist:
    """One setting's distribution."""

    kind: str  # "int" | "float" | "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        extra = " log" if self.log else f" step {self.step}" if self.step else ""
        return f"{self.kind} in [{self.low}, {self.high}]{extra}"


def parse(value: Any, where: str) -> Dist | None:
    """The distribution a setting's value gives, None for a constant; SweepError names the field."""
    if isinstance(value, list):
        return _choice(value, where)
    if not isinstance(value, dict) or not set(value) & set(DISTRIBUTIONS):
        return None
    kinds = [k for k in DISTRIBUTIONS if k in value]
    unknown = sorted(set(value) - set(DISTRIBUTIONS) - set(OPTIONS))
    if len(kinds) > 1 or unknown:
        raise SweepError(
            f"{where}: a distribution is one of {{int: ...}}, {{float: ...}}, {{choice: ...}}"
            f" with log or step (got keys {', '.join(map(str, value))})"
        )
    kind = kinds[0]
    if kind == "choice":
        return _choice(value["choice"], where)
    bounds = value[kind]
    number = int if kind == "int" else (int, float)
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)
    ):
        raise SweepError(f"{where}: {{{kind}: [low, high]}} needs two {kind} numbers (got {bounds!r})")
    low, high = bounds
    log, step = bool(value.get("log", False)), value.get("step")
    if low > high or (low == high and kind == "float"):
        raise SweepError(f"{where}: {{{kind}: [{low}, {high}]}}: low must be below high")
    if log and low <= 0:
        raise SweepError(f"{where}: a log distribution needs low > 0 (got {low})")
    if log and step is not None:
        raise SweepError(f"{where}: give log or step, not both")
    if step is not None and (not isinstance(step, number) or isinstance(step, bool) or step <= 0):
        raise SweepError(f"{where}: step must be a positive {kind} (got {step!r})")
    return Dist(kind, low, high, log, step)


def _choice(values: Any, where: str) -> Dist:
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where}: a choice needs at least one value (got {values!r})")
    for v in values:
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise SweepError(f"{where}: choice values must be numbers, strings, booleans or null (got {v!r})")
    return Dist("choice", choices=tuple(values))


def check_space(sweep: Sweep) -> None:
    """Every distribution parses, fits its setting's type, and its values bind to the optimizer.

    Without `search:` a distribution is refused (lists stay grid axes, as they always were);
    with it, bounds and each choice are bound like a grid point's settings.
    """
    for i, spec in enumerate(sweep.optimizers):
        for key, value in spec.settings.items():
            where = f"optimizers.{i}.{key}"
            if sweep.search is None and isinstance(value, list):
                continue  # a grid axis, as it always was
            dist = parse(value, where)
            if dist is None:
                continue
            if sweep.search is None:
                raise SweepError(
                    f"{where}: a distribution needs a search section (e.g. search: {{kind: random, trials: 16}})"
                )
            _fits(spec.kind, key, dist, where)
            for point in _corners(dist):
                bind_settings(spec.kind, {**_constants(spec.settings), key: point}, where=f"optimizers.{i}")
        if sweep.search is not None and sweep.search.kind == "grid":
            _grid_values_of(spec.settings, f"optimizers.{i}")


def _fits(kind: str, key: str, dist: Dist, where: str) -> None:
    """A distribution's values must have the type of the setting's default (when it has one)."""
    default = _default(kind, key)
    if default is None or isinstance(default, bool) and dist.kind == "choice":
        return
    expected = type(default)
    values = dist.choices if dist.kind == "choice" else (dist.low, dist.high)
    fits = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(expected)
    if fits is None:
        return
    if dist.kind != "choice" and expected is int and dist.kind == "float":
        values = (0.5,)  # a float range over an int setting: refuse it whatever its bounds
    bad = next((v for v in values if v is not None and not fits(v)), None)
    if bad is not None:
        raise SweepError(
            f"{where}: a {dist.kind} distribution does not fit this {expected.__name__} setting "
            f"({optimizer_class(kind).__name__}'s default is {default!r}; got {bad!r})"
        )


def _default(kind: str, key: str) -> Any:
    cls = optimizer_class(kind)
    for fn in (cls.__init__, cls.compile):
        param = inspect.signature(fn).parameters.get(key)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return None


def _corners(dist: Dist) -> list[Any]:
    return list(dist.choices) if dist.kind == "choice" else [dist.low, dist.high]


def _constants(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if parse(v, k) is None}


# -- the grid ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One trial's choices: an optimizer entry, its settings, the models and the seed."""

    optimizer: int
    settings: dict[str, Any]
    student: ModelSpec
    teacher: ModelSpec | None
    seed: int


def grid_points(sweep: Sweep) -> list[Point]:
    """Every point of a grid search, in a fixed order (GridSampler visits them in its own)."""
    teachers = sweep.teachers or [None]
    points = []
    for i, spec in enumerate(sweep.optimizers):
        if spec.kind == "none":
            continue
        for settings in expand_grid(_grid_values_of(spec.settings, f"optimizers.{i}")):
            for student, teacher, seed in itertools.product(sweep.students, teachers, sweep.seeds):
                points.append(Point(i, settings, student, teacher, seed))
    return points


def _grid_values_of(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Settings with each distribution as its list of grid values (a float range needs a step)."""
    values = {}
    for key, value in settings.items():
        dist = parse(value, f"{where}.{key}")
        if dist is None:
            values[key] = value
        elif dist.kind == "choice":
            values[key] = list(dist.choices)
        elif dist.kind == "int":
            values[key] = list(range(int(dist.low), int(dist.high) + 1, int(dist.step or 1)))
        elif dist.step is None:
            raise SweepError(f"{where}.{key}: a grid search needs a step for a float range (e.g. step: 0.1)")
        else:
            count = int(round((dist.high - dist.low) / dist.step)) + 1
            values[key] = [round(dist.low + n * dist.step, 10) for n in range(count)]
    return values


# -- sampling ----------------------------------------------------------------------------


def trial_count(sweep: Sweep) -> int:
    """How many trials the search runs (baselines apart)."""
    assert sweep.search is not None
    if sweep.search.kind == "grid":
        size = len(grid_points(sweep))
        return min(sweep.search.trials or size, size)
    return sweep.search.trials or 0


def sampler(sweep: Sweep, started: int = 0) -> Any:
    """The search's Optuna sampler, seeded with the sweep's seed plus the trials its study has
    `started`: a fresh search is reproducible, and a resumed one draws new points."""
    import optuna

    search = sweep.search
    assert search is not None
    seed = search.seed + started
    if search.kind == "grid":
        return optuna.samplers.GridSampler({"point": list(range(len(grid_points(sweep))))}, seed=seed)
    if search.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def suggest(sweep: Sweep, trial: Any, basis: str) -> Trial:
    """The sweep's trial for an Optuna trial: the grid point it was given, or sampled define-by-run
    (`basis`: the sweep's `plan.trial_basis`)."""
    assert sweep.search is not None
    if sweep.search.kind == "grid":
        point = grid_points(sweep)[trial.suggest_categorical("point", list(range(len(grid_points(sweep)))))]
    else:
        point = _sampled(sweep, trial)
    spec = sweep.optimizers[point.optimizer]
    return make_trial(sweep, spec.kind, point.settings, point.student, point.teacher, point.seed, basis)


def _sampled(sweep: Sweep, trial: Any) -> Point:
    entries = [(i, s) for i, s in enumerate(sweep.optimizers) if s.kind != "none"]
    labels = _labels(entries)
    i = entries[labels.index(_pick(trial, "optimizer", labels))][0]
    spec = sweep.optimizers[i]
    settings = {
        key: _value(trial, f"{labels[[e[0] for e in entries].index(i)]}.{key}", value)
        for key, value in spec.settings.items()
    }
    student = _by_name(sweep.students, _pick(trial, "student", [s.name for s in sweep.students]))
    teacher = (
        _by_name(sweep.teachers, _pick(trial, "teacher", [t.name for t in sweep.teachers])) if sweep.teachers else None
    )
    return Point(i, settings, student, teacher, _pick(trial, "seed", list(sweep.seeds)))


def _labels(entries: list[tuple[int, Any]]) -> list[str]:
    kinds = [s.kind for _, s in entries]
    return [
        kind if kinds.count(kind) == 1 else f"{kind}.{i}"
        for i, kind in zip([e[0] for e in entries], kinds, strict=True)
    ]


def _pick(trial: Any, name: str, options: list[Any]) -> Any:
    """A categorical choice, asked only when there is a choice to make."""
    return options[0] if len(options) == 1 else trial.suggest_categorical(name, options)


def _by_name(models: list[ModelSpec], name: str) -> ModelSpec:
    return next(m for m in models if m.name == name)


def _value(trial: Any, name: str, value: Any) -> Any:
    dist = parse(value, name)
    if dist is None:
        return value
    if dist.kind == "choice":
        return _pick(trial, name, list(dist.choices))
    if dist.kind == "int":
        return trial.suggest_int(name, int(dist.low), int(dist.high), step=int(dist.step or 1), log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def preview(sweep: Sweep, basis: str) -> list[Trial]:
    """The trials a search would start with, for `sweep plan` and call estimates: the grid's
    points, or the sweep's sampler run without results (TPE starts with random trials too)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sweep.search is not None and sweep.search.kind == "grid":
        points = grid_points(sweep)
        return [
            make_trial(sweep, sweep.optimizers[p.optimizer].kind, p.settings, p.student, p.teacher, p.seed, basis)
            for p in points
        ][: trial_count(sweep)]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=sweep.search.seed))
    trials = []
    for _ in range(trial_count(sweep)):
        asked = study.ask()
        trials.append(suggest(sweep, asked, basis))
        study.tell(asked, state=optuna.trial.TrialState.FAIL)  # a preview: nothing ran
    return trials


def space_lines(sweep: Sweep) -> list[str]:
    """The search space as `sweep plan` prints it."""
    assert sweep.search is not None
    lines = [f"search: {sweep.search.kind}, {trial_count(sweep)} trials, seed {sweep.search.seed}"]
    entries = [(i, s) for i, s in enumerate(sweep.optimizers) if s.kind != "none"]
    for label, (_, spec) in zip(_labels(entries), entries, strict=True):
        shown = [f"{k}: {d.describe() if (d := parse(v, k)) else repr(v)}" for k, v in spec.settings.items()]
        lines.append(f"  {label}: " + ("; ".join(shown) or "defaults"))
    for role, options in (
        ("student", [s.name for s in sweep.students]),
        ("teacher", [t.name for t in sweep.teachers]),
        ("seed", list(sweep.seeds)),
    ):
        if len(options) > 1:
            lines.append(f"  {role}: one of {', '.join(map(str, options))}")
    if sweep.prune is not None:
        lines.append(f"prune: {sweep.prune.kind} {sweep.prune.settings or ''}".rstrip())
    return lines


# -- pruners -------------------------------------------------------------------------------


def build_pruner(prune: Prune | None) -> Any:
    """Optuna's pruner for `prune:`, its settings bound to the real signature (SweepError names the field)."""
    import optuna

    if prune is None:
        return optuna.pruners.NopPruner()
    cls = getattr(optuna.pruners, PRUNERS[prune.kind])
    params = [p for p in inspect.signature(cls).parameters if p != "self"]
    for key in prune.settings:
        if key not in params:
            raise SweepError(f"prune.{key}: {cls.__name__} takes no setting '{key}' (valid: {', '.join(params)})")
    try:
        return cls(**prune.settings)
    except (TypeError, ValueError) as exc:
        field = next((k for k in prune.settings if k in str(exc)), None)
        raise SweepError(f"prune{'.' + field if field else ''}: {exc}") from None
