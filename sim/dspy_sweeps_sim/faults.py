"""Fault injection for the SIMULATED LM endpoint: a TEST FACILITY, never a production feature.

The platform's reliability tests make the simulator misbehave on purpose, deterministically:
answer 500, 503 (down or overloaded), 429 with `Retry-After`, 401, garbage text, or hang. A fault schedule is an ordered
list of `Fault` rules; each completion request takes the first rule whose `model` matches (or
that targets every model), and a rule with a `count` is used up after that many requests. A
rule of mode `ok` answers normally, so `[ok x2, error500 x1]` fails exactly the third request.

Three ways in, all with the same fields (mode, count, retry_after, model, hang_seconds):
- at startup: `python -m dspy_sweeps_sim --fault rate_limit:3:retry_after=1 --fault error500::model=teacher`
  (syntax `MODE[:COUNT][:key=value]...`; an empty or `*` COUNT means "until changed");
- `SimServer(..., faults=["hang:1"])`, then `sim.set_faults("error500", count=2)`;
- HTTP: `POST /sim/faults {"mode": "error500", "count": 2}` (replaces the schedule; add
  `"append": true` to queue behind it, or POST a JSON list of rules), `GET /sim/faults`.

Standard library only: `dspy_sweeps_sim.launch` imports it and must stay fast to import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MODES: tuple[str, ...] = ("ok", "error500", "error503", "rate_limit", "garbage", "hang", "unauthorized")
FAULT_MODES: tuple[str, ...] = MODES[1:]  # the modes counted as faults in /sim/stats and /metrics
DEFAULT_RETRY_AFTER = 1.0  # seconds, for rate_limit
DEFAULT_HANG_SECONDS = 3600.0  # real seconds (not time-scaled), for hang
_FIELDS = ("mode", "count", "retry_after", "model", "hang_seconds")
_UNLIMITED = ("", "*", "inf", "none", "null")


class FaultError(ValueError):
    """A fault rule that cannot be understood; the message says which field is wrong."""


@dataclass
class Fault:
    """One rule of the schedule. `count=None` applies until the schedule is changed."""

    mode: str
    count: int | None = None
    retry_after: float | None = None
    model: str | None = None
    hang_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FaultError(f"fault mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)):
            raise FaultError(f"fault count must be a positive integer or null, not {self.count!r}")
        if self.count is not None and self.count < 1:
            raise FaultError(f"fault count must be a positive integer or null, not {self.count}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise FaultError(f"fault model must be a non-empty model name or null, not {self.model!r}")
        self.retry_after = self._seconds("retry_after", "rate_limit", DEFAULT_RETRY_AFTER, minimum=0.0)
        self.hang_seconds = self._seconds("hang_seconds", "hang", DEFAULT_HANG_SECONDS, minimum=None)

    def _seconds(self, name: str, mode: str, default: float, minimum: float | None) -> float | None:
        value = getattr(self, name)
        if self.mode != mode:
            if value is not None:
                raise FaultError(f"{name} applies only to mode {mode}, not {self.mode}")
            return None
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise FaultError(f"{name} must be a number of seconds, not {value!r}")
        if value < 0 or (minimum is None and value == 0):
            raise FaultError(f"{name} must be {'at least 0' if minimum is not None else 'positive'}, not {value}")
        return float(value)

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Read the command-line form `MODE[:COUNT][:key=value]...`, e.g. `rate_limit:3:retry_after=1`."""
        mode, *rest = spec.strip().split(":")
        fields: dict[str, Any] = {"mode": mode.strip()}
        for position, part in enumerate(rest):
            name, sep, value = part.partition("=")
            if not sep:
                if position != 0:
                    raise FaultError(f"fault {spec!r}: expected key=value after the count, got {part!r}")
                name, value = "count", part
            name, value = name.strip(), value.strip()
            if name not in _FIELDS[1:]:
                raise FaultError(f"fault {spec!r}: unknown field {name!r} (use {', '.join(_FIELDS[1:])})")
            if name in fields:
                raise FaultError(f"fault {spec!r}: {name} given twice")
            fields[name] = _parse_value(spec, name, value)
        return cls(**fields)

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        if not isinstance(data, Mapping):
            raise FaultError(f'a fault must be a JSON object like {{"mode": "error500"}}, not {data!r}')
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise FaultError(f"unknown fault field(s) {', '.join(unknown)} (use {', '.join(_FIELDS)})")
        if "mode" not in data:
            raise FaultError(f"a fault needs a mode: one of {', '.join(MODES)}")
        return cls(**{k: data[k] for k in _FIELDS if k in data})

    @classmethod
    def coerce(cls, value: Fault | str | Mapping[str, Any]) -> Fault:
        if isinstance(value, Fault):
            return dataclasses.replace(value)
        if isinstance(value, str):
            return cls.parse(value)
        return cls.from_json(value)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def to_cli(self) -> str:
        """The `--fault` argument that recreates this rule."""
        parts = [self.mode, "" if self.count is None else str(self.count)]
        for name in ("retry_after", "hang_seconds", "model"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}")
        return ":".join(parts)

    def matches(self, model: str) -> bool:
        return self.model is None or self.model == model


def _parse_value(spec: str, name: str, value: str) -> Any:
    try:
        if name == "count":
            return None if value.lower() in _UNLIMITED else int(value)
        if name == "model":
            return value or None
        return float(value)
    except ValueError:
        raise FaultError(f"fault {spec!r}: {name}={value!r} is not a valid {name}") from None


class FaultSchedule:
    """The ordered fault rules of one server; `take(model)` picks (and uses up) the rule for one request."""

    def __init__(self, faults: Iterable[Fault | str | Mapping[str, Any]] = ()) -> None:
        self.rules: list[Fault] = []
        self.replace(faults)

    def replace(self, faults: Iterable[Fault | str | Mapping[str, Any]]) -> None:
        rules = [Fault.coerce(f) for f in faults]
        # "ok until changed" as the whole schedule is simply no faults.
        self.rules = [] if len(rules) == 1 and rules[0].mode == "ok" and rules[0].count is None else rules

    def append(self, faults: Iterable[Fault | str | Mapping[str, Any]]) -> None:
        self.rules += [Fault.coerce(f) for f in faults]

    def take(self, model: str) -> Fault | None:
        """The rule this request gets (None: answer normally), with its count reduced by one."""
        for index, rule in enumerate(self.rules):
            if rule.matches(model):
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count == 0:
                        del self.rules[index]
                return None if rule.mode == "ok" else rule
        return None

    def to_json(self) -> list[dict[str, Any]]:
        return [rule.to_json() for rule in self.rules]
