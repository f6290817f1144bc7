"""Local endpoints a sweep starts itself, from plugins: the one way the engine reaches a simulator.

A distribution registers a plugin in the entry-point group `dspy_sweeps.endpoints`, named for the
provider prefix of the models it serves; the simulator's distribution (`sim/` in this repository,
`dspy-sweeps-sim`) registers `sim`, so a sweep's `sim/student` model is served by it:

    [project.entry-points."dspy_sweeps.endpoints"]
    sim = "dspy_sweeps_sim.plugin:PLUGIN"

The sweep starts each plugin its models name once, on the driver, before anything else, with the
sweep's data (a simulator builds its answers from it, and no other endpoint is given the labels),
its settings from the sweep file's `endpoints: {NAME: {...}}` (checked by the plugin itself) and a
folder of its own in the state directory; a model `NAME/x` is then called as the OpenAI-compatible
model `x` at the URL the plugin yields. Whether the plugin's answers are a real model's is the
plugin's to declare (`simulated`), and every record, run and registered version says so.

Nothing of a plugin is imported until a sweep names it. Standard library at import.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dspy_sweeps.errors import SweepError

if TYPE_CHECKING:
    from dspy_sweeps.data import Dataset
    from dspy_sweeps.spec.schema import ModelSpec, Sweep
    from dspy_sweeps.state import State

GROUP = "dspy_sweeps.endpoints"
SERVED_PREFIX = "openai/"  # how a plugin's model is called: LiteLLM's OpenAI-compatible route


@dataclass(frozen=True)
class EndpointRequest:
    """What a plugin is asked to serve: `models` by the names after its prefix (`sim/student` →
    `student`), `settings` as its `check` accepted them, `workdir` kept across runs of the sweep.
    `data` is the sweep's corpus; None when a registered program is asked again (`sweep ask`,
    `sweep serve`): the plugin then serves from what it kept in `workdir`."""

    sweep: str
    models: tuple[str, ...]
    workdir: Path
    settings: Mapping[str, Any] = field(default_factory=dict)
    data: Dataset | None = None


class EndpointPlugin(Protocol):
    """A local OpenAI-compatible endpoint a sweep starts and stops."""

    simulated: bool  # its answers are not a real model's: scores from it are labelled SIMULATED

    def check(self, settings: Mapping[str, Any]) -> str | None:
        """Why `settings` are wrong, as `field: what would be right`; None if they are sound."""

    def start(self, request: EndpointRequest) -> AbstractContextManager[str]:
        """Start the endpoint, yield its base URL (`http://host:port/v1`), stop it on exit."""


@functools.cache
def installed() -> dict[str, EntryPoint]:
    """The installed plugins by name (entry points are read once per process, nothing imported)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


@functools.cache
def plugin(name: str) -> EndpointPlugin:
    """The plugin `name`, imported; SweepError naming the installed ones if there is none."""
    if name not in installed():
        have = ", ".join(sorted(installed())) or "none is installed"
        raise SweepError(f"no endpoint plugin named '{name}' (installed: {have})")
    return installed()[name].load()


def plugin_name(spec: ModelSpec) -> str | None:
    """The plugin serving this model (its provider prefix names an installed plugin), if any."""
    provider, sep, _ = spec.model.partition("/")
    return provider if sep and provider in installed() else None


def simulated(spec: ModelSpec) -> bool:
    """The model is served by a plugin that declares its answers simulated."""
    name = plugin_name(spec)
    return name is not None and plugin(name).simulated


def resolve(spec: ModelSpec, urls: Mapping[str, str]) -> ModelSpec:
    """A plugin's model becomes the OpenAI-compatible model at its endpoint's URL (`urls` by plugin);
    any other model is returned as it is."""
    name = plugin_name(spec)
    if name is None:
        return spec
    if name not in urls:
        raise SweepError(f"{spec.name}: model {spec.model} needs the '{name}' endpoint, which is not running")
    served = SERVED_PREFIX + spec.model.partition("/")[2]
    return spec.model_copy(update={"model": served, "api_base": urls[name], "api_key_env": None})  # a local endpoint


def check_settings(sweep: Sweep) -> None:
    """Every `endpoints:` entry names an installed plugin that accepts its settings (one line if not)."""
    for name, settings in sweep.endpoints.items():
        try:
            error = plugin(name).check(settings)
        except SweepError as exc:  # no such plugin
            raise SweepError(f"endpoints.{name}: {exc}") from None
        if error is not None:
            raise SweepError(f"endpoints.{name}.{error}")


def workdir(state: State, name: str, sweep: str) -> Path:
    """A plugin's folder for one sweep: kept, so a registered program's endpoint can start again."""
    return state.root / "endpoints" / name / sweep


def requested(sweep: Sweep) -> dict[str, tuple[str, ...]]:
    """The plugins a sweep's models name, each with the model names it must serve."""
    wanted: dict[str, set[str]] = {}
    for spec in sweep.models:
        if (name := plugin_name(spec)) is not None:
            wanted.setdefault(name, set()).add(spec.model.partition("/")[2])
    return {name: tuple(sorted(models)) for name, models in sorted(wanted.items())}


@contextlib.contextmanager
def local_endpoints(sweep: Sweep, data: Dataset, state: State, console: Any) -> Iterator[dict[str, str]]:
    """Start every plugin the sweep's models name, yield {plugin name: base URL}, stop them on exit."""
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        for name, models in requested(sweep).items():
            folder = workdir(state, name, sweep.name)
            request = EndpointRequest(sweep.name, models, folder, sweep.endpoints.get(name, {}), data)
            urls[name] = stack.enter_context(plugin(name).start(request))
            console.print(announce(name, urls[name]))
        yield urls


def announce(name: str, url: str) -> str:
    """The line a started endpoint is announced with: a simulated one says so."""
    if plugin(name).simulated:
        return f"[yellow]SIMULATED[/] LM endpoint '{name}' (test/demo double, not a real model) at {url}"
    return f"local LM endpoint '{name}' at {url}"


@contextlib.contextmanager
def restarted(spec: ModelSpec, sweep: str, state: State, also: tuple[ModelSpec, ...] = ()) -> Iterator[str]:
    """A registered program's plugin endpoint started again from its folder (no data), for `sweep
    ask` and `sweep serve`; `also` are other models of the same plugin it must serve (the embedder)."""
    name = plugin_name(spec)
    assert name is not None
    models = tuple(sorted({m.model.partition("/")[2] for m in (spec, *also) if plugin_name(m) == name}))
    with plugin(name).start(EndpointRequest(sweep, models, workdir(state, name, sweep))) as url:
        yield url
