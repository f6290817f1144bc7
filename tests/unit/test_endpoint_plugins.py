"""The plugin point for local endpoints a sweep starts, seen through the simulator's plugin (`sim`).

Run: ``.venv/bin/python -m pytest tests/unit/test_endpoint_plugins.py -q``. Nothing is started.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dspy_sweeps.errors import SweepError
from dspy_sweeps.lm.endpoints import check_settings, installed, plugin, plugin_name, requested, resolve
from dspy_sweeps.spec.schema import ModelSpec, load_sweep

DEMO = Path(__file__).resolve().parents[2] / "sweeps" / "demo.yaml"


def test_the_simulator_is_found_by_its_entry_point_and_serves_its_prefix() -> None:
    assert installed()["sim"].value == "dspy_sweeps_sim.plugin:PLUGIN"
    assert plugin("sim").simulated
    assert plugin_name(ModelSpec(name="s", model="sim/student")) == "sim"
    assert plugin_name(ModelSpec(name="s", model="openai/student")) is None
    assert plugin_name(ModelSpec(name="s", model="gpt-4o-mini")) is None


def test_a_plugins_model_is_called_at_its_endpoint_as_an_openai_compatible_model() -> None:
    spec = ModelSpec(name="s", model="sim/student", api_key_env="NOT_FOR_A_LOCAL_ENDPOINT")
    called = resolve(spec, {"sim": "http://127.0.0.1:5/v1"})
    assert (called.model, called.api_bases, called.api_key_env) == ("openai/student", ("http://127.0.0.1:5/v1",), None)
    other = ModelSpec(name="t", model="openai/gpt-4o-mini")
    assert resolve(other, {"sim": "http://127.0.0.1:5/v1"}) is other
    with pytest.raises(SweepError, match="needs the 'sim' endpoint, which is not running"):
        resolve(spec, {})


def test_one_endpoint_per_plugin_serves_every_model_of_its_prefix() -> None:
    sweep = load_sweep(DEMO, ["students=[{name: a, model: sim/student}, {name: b, model: sim/student2}]"])
    assert requested(sweep) == {"sim": ("student", "student2", "teacher")}


@pytest.mark.parametrize(
    ("endpoints", "message"),
    [
        ("{sim: {timescale: 0.1}}", "endpoints.sim.timescale: Extra inputs are not permitted (valid: time_scale, "),
        ("{sim: {max_num_seqs: many}}", "endpoints.sim.max_num_seqs: Input should be a valid integer"),
        ("{simulator: {}}", "endpoints.simulator: no endpoint plugin named 'simulator' (installed: sim)"),
    ],
)
def test_the_plugin_checks_its_own_settings(endpoints: str, message: str) -> None:
    with pytest.raises(SweepError) as error:
        check_settings(load_sweep(DEMO, [f"endpoints={endpoints}"]))
    assert str(error.value).startswith(message)


def test_sound_settings_pass() -> None:
    check_settings(load_sweep(DEMO, ["endpoints={sim: {time_scale: 0.5, max_num_seqs: 8}}"]))
