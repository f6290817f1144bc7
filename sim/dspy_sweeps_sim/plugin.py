"""The simulator as a dspy-sweeps endpoint plugin: what a sweep's `sim/...` models are served by.

Registered in this distribution's entry points (`dspy_sweeps.endpoints: sim`), so the engine finds
it by name and imports nothing of it until a sweep names a `sim/` model. A sweep starts one
simulated endpoint for all its `sim/` models, with an answer key written from the sweep's own data
into the plugin's folder in the state directory; `sweep ask` and `sweep serve` start it again
over that key. Its latency model is set in the sweep file:

    endpoints: {sim: {time_scale: 0.02, max_num_seqs: 64, ttft_ms: 40, per_token_ms: 4.5}}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dspy_sweeps.errors import SweepError
from dspy_sweeps_sim.answers import write_answer_key
from dspy_sweeps_sim.launch import SimServer

if TYPE_CHECKING:
    from dspy_sweeps.lm.endpoints import EndpointRequest

KEY_FILE = "answer_key.jsonl"


class Settings(BaseModel):
    """The simulated endpoint's latency model (see `dspy_sweeps_sim.server.LatencyModel`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    time_scale: float = Field(default=0.02, gt=0, description="multiplies every simulated duration")
    max_num_seqs: int = Field(default=64, gt=0, description="requests running at once per model")
    ttft_ms: float = Field(default=40.0, ge=0, description="time to first token")
    per_token_ms: float = Field(default=4.5, ge=0, description="decode time per output token")


class Simulator:
    """The `sim` plugin (dspy_sweeps.lm.endpoints.EndpointPlugin)."""

    simulated = True

    def check(self, settings: Mapping[str, Any]) -> str | None:
        try:
            Settings.model_validate(dict(settings))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"]) or "(settings)"
            valid = ", ".join(Settings.model_fields)
            hint = f" (valid: {valid})" if error["type"] == "extra_forbidden" else f" (got {error['input']!r})"
            return f"{field}: {error['msg']}{hint}"
        return None

    @contextlib.contextmanager
    def start(self, request: EndpointRequest) -> Iterator[str]:
        key = request.workdir / KEY_FILE
        if request.data is not None:
            write_answer_key(request.data, key)
        elif not key.is_file():
            raise SweepError(
                f"the simulated endpoint's answer key {key} is missing (run the sweep again, or pass the "
                "--api-base of a running `python -m dspy_sweeps_sim`)"
            )
        settings = Settings.model_validate(dict(request.settings))
        # Started again for a registered program: its own log and port file, beside a sweep that may be running.
        folder = request.workdir if request.data is not None else request.workdir / "again"
        with SimServer(key, folder, models=request.models, **settings.model_dump()) as sim:
            yield sim.base_url


PLUGIN = Simulator()
