"""Unit tests for sweep files: loading, `--set` overrides, `${VAR}` interpolation, error messages.

Run: ``.venv/bin/python -m pytest tests/unit/test_config.py -q``. Pure config logic: no data
is read and nothing heavy is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dspy_sweeps.errors import SweepError
from dspy_sweeps.lm.endpoints import plugin_name, simulated
from dspy_sweeps.spec.kinds import KIND_NAMES
from dspy_sweeps.spec.schema import load_sweep

SweepFile = Callable[..., Path]


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(SweepError) as info:
        load_sweep(path, overrides or [])
    message = str(info.value)
    assert "\n" not in message, "the CLI prints a SweepError as one line"
    return message


# --- the shipped demo ---------------------------------------------------------------------


def test_demo_sweep_loads_and_runs_offline(repo: Path) -> None:
    sweep = load_sweep(repo / "sweeps" / "demo.yaml")
    assert sweep.name == "demo"
    assert sweep.program == "pipelines.arith:Solve"
    assert sweep.data.sources == ["datasets/demo/arith.parquet"]
    assert (sweep.data.split.train, sweep.data.split.val, sweep.data.split.test) == (100, 50, 100)
    assert [o.kind for o in sweep.optimizers] == ["bootstrap_fewshot", "mipro_v2", "gepa"]
    assert sweep.optimizers[0].settings == {"max_bootstrapped_demos": [2, 4]}
    # The demo must run on a fresh machine: every model is the simulated endpoint (the `sim` plugin).
    assert sweep.models and all(plugin_name(m) == "sim" and simulated(m) for m in sweep.models)
    assert sweep.promote is not None and sweep.promote.model == "demo"


def test_demo_sweep_opens_with_the_command_that_runs_it(repo: Path) -> None:
    first_line = (repo / "sweeps" / "demo.yaml").read_text().splitlines()[0]
    assert first_line == "# sweep run sweeps/demo.yaml"


def test_missing_sweep_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"{path}: no such sweep file"


# --- --set overrides ----------------------------------------------------------------------


def test_set_overrides_nested_keys_and_list_items(sweep_file: SweepFile) -> None:
    sweep = load_sweep(
        sweep_file(),
        ["data.split.seed=7", "students.0.model=sim/other", "optimizers.1.auto=medium", "teachers.0.temperature=0.7"],
    )
    assert sweep.data.split.seed == 7
    assert sweep.students[0].model == "sim/other"
    assert sweep.optimizers[1].settings == {"auto": "medium"}
    assert sweep.teachers[0].temperature == 0.7


def test_set_values_are_parsed_as_yaml(sweep_file: SweepFile) -> None:
    sweep = load_sweep(
        sweep_file(),
        ["seeds=[1, 2, 3]", "num_threads=4", "budget.max_lm_calls=null", "optimizers.0.max_bootstrapped_demos=[1, 8]"],
    )
    assert sweep.seeds == [1, 2, 3]
    assert sweep.num_threads == 4
    assert sweep.budget.max_lm_calls is None
    assert sweep.optimizers[0].settings == {"max_bootstrapped_demos": [1, 8]}


def test_set_creates_a_missing_section(sweep_file: SweepFile) -> None:
    assert "endpoints" not in load_sweep(sweep_file()).model_fields_set
    assert load_sweep(sweep_file(), ["endpoints.sim.time_scale=0.5"]).endpoints == {"sim": {"time_scale": 0.5}}


def test_set_leaves_the_file_alone(sweep_file: SweepFile) -> None:
    path = sweep_file()
    before = path.read_text()
    load_sweep(path, ["name=other"])
    assert path.read_text() == before
    assert load_sweep(path).name == "demo"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("students.3.model=sim/x", "--set students.3.model=sim/x: '3' is not an index of a 1-item list"),
        ("optimizers.first.kind=gepa", "--set optimizers.first.kind=gepa: 'first' is not an index of a 3-item list"),
        ("name.first=x", "--set name.first=x: 'first' is inside a value that is not a mapping or list"),
        ("name.a.b=x", "--set name.a.b=x: 'a' is inside a value that is not a mapping or list"),
        ("seeds=[1, 2", "--set seeds=[1, 2: the value is not valid YAML"),
        ("seeds", "--set seeds: expected KEY=VALUE"),
        ("=3", "--set =3: expected KEY=VALUE"),
    ],
)
def test_bad_set_is_named(sweep_file: SweepFile, override: str, expected: str) -> None:
    assert error_of(sweep_file(), [override]).startswith(expected)


def test_set_of_an_unknown_key_is_caught_like_a_typo_in_the_file(sweep_file: SweepFile) -> None:
    assert "data.qurey: unknown key 'qurey' (did you mean 'query'?)" in error_of(sweep_file(), ["data.qurey=x"])


# --- ${VAR} interpolation -----------------------------------------------------------------


def test_variables_come_from_the_environment(
    sweep_file: SweepFile, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORPUS_DIR", str(corpus.parent))
    monkeypatch.setenv("STUDENT_URL", "http://10.0.0.5:8000/v1")
    path = sweep_file(
        {
            "data": {"source": "${CORPUS_DIR}/" + corpus.name},
            "students": [{"name": "s", "model": "openai/qwen", "api_base": "${STUDENT_URL}"}],
        }
    )
    sweep = load_sweep(path)
    assert sweep.data.sources == [str(corpus)]
    assert sweep.students[0].api_base == "http://10.0.0.5:8000/v1"


def test_default_applies_only_when_the_variable_is_unset(
    sweep_file: SweepFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STUDENT_MODEL", raising=False)
    path = sweep_file({"students": [{"name": "s", "model": "${STUDENT_MODEL:-sim/student}"}]})
    assert load_sweep(path).students[0].model == "sim/student"
    monkeypatch.setenv("STUDENT_MODEL", "sim/other")
    assert load_sweep(path).students[0].model == "sim/other"


def test_variables_come_from_dotenv_in_the_working_directory(
    sweep_file: SweepFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STUDENT_MODEL", raising=False)
    path = sweep_file({"students": [{"name": "s", "model": "${STUDENT_MODEL}"}]})
    (tmp_path / ".env").write_text("STUDENT_MODEL=sim/from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    assert load_sweep(path).students[0].model == "sim/from-dotenv"
    # The process environment wins over the file.
    monkeypatch.setenv("STUDENT_MODEL", "sim/from-env")
    assert load_sweep(path).students[0].model == "sim/from-env"


def test_dotenv_elsewhere_is_not_read(sweep_file: SweepFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STUDENT_MODEL", raising=False)
    path = sweep_file({"students": [{"name": "s", "model": "${STUDENT_MODEL}"}]})
    (tmp_path / ".env").write_text("STUDENT_MODEL=sim/from-dotenv\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert "environment variable STUDENT_MODEL is not set" in error_of(path)


def test_missing_variable_names_the_field_and_the_variable(
    sweep_file: SweepFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_URL_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    path = sweep_file({"students": [{"name": "s", "model": "openai/q", "api_base": "${NO_SUCH_URL_VAR}"}]})
    message = error_of(path)
    assert message.startswith(f"{path}: students.0.api_base: environment variable NO_SUCH_URL_VAR is not set")
    assert "${NO_SUCH_URL_VAR:-default}" in message


# --- every bad-input message --------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nprogram: a:b\nseeds: [0, 1\noptimizers:\n  - {kind: none}\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: YAML syntax error")


def test_a_sweep_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n")
    assert error_of(path).startswith(f"{path}: a sweep file is a mapping")


@pytest.mark.parametrize(
    ("typo", "right"),
    [("optimisers", "optimizers"), ("studnets", "students"), ("teacher", "teachers"), ("seed", "seeds")],
)
def test_unknown_top_level_key_names_the_nearest_valid_key(
    sweep_file: SweepFile, sweep_dict: dict, typo: str, right: str
) -> None:
    path = sweep_file({typo: sweep_dict[right]}, remove=[right])
    assert error_of(path) == f"{path}: {typo}: unknown key '{typo}' (did you mean '{right}'?)"


@pytest.mark.parametrize(
    ("changes", "field", "right"),
    [
        ({"data": {"qurey": "SELECT * FROM corpus"}}, "data.qurey", "query"),
        ({"data": {"split": {"sed": 1}}}, "data.split.sed", "seed"),
        ({"budget": {"max_lm_call": 10}}, "budget.max_lm_call", "max_lm_calls"),
        ({"tracking": {"wandb": {"projet": "x"}}}, "tracking.wandb.projet", "project"),
    ],
)
def test_unknown_nested_key_names_the_nearest_valid_key(
    sweep_file: SweepFile, changes: dict, field: str, right: str
) -> None:
    key = field.rsplit(".", 1)[1]
    assert error_of(sweep_file(changes)).endswith(f": {field}: unknown key '{key}' (did you mean '{right}'?)")


def test_unknown_key_in_a_list_item_names_its_index(sweep_file: SweepFile) -> None:
    path = sweep_file({"students": [{"name": "s", "model": "sim/student"}, {"name": "t", "modle": "sim/x"}]})
    assert error_of(path).endswith("students.1.modle: unknown key 'modle' (did you mean 'model'?)")


def test_unknown_key_with_no_near_match_lists_valid_keys(sweep_file: SweepFile) -> None:
    message = error_of(sweep_file({"budget": {"dollars": 3}}))
    assert "budget.dollars: unknown key 'dollars' (valid keys: " in message
    assert "max_lm_calls" in message.split("valid keys: ")[1]


def test_unknown_optimizer_kind_names_the_nearest_and_lists_valid_kinds(sweep_file: SweepFile) -> None:
    path = sweep_file({"optimizers": [{"kind": "bootstrap_fewshot"}, {"kind": "coppro"}]})
    message = error_of(path)
    assert message.startswith(f"{path}: optimizers.1.kind: unknown optimizer kind 'coppro' (did you mean 'copro'?")
    assert all(kind in message for kind in KIND_NAMES)
    assert "by import path" in message


@pytest.mark.parametrize("kind", [*KIND_NAMES, "mypkg.opt:MyTeleprompter"])
def test_every_kind_and_any_import_path_is_accepted(sweep_file: SweepFile, kind: str) -> None:
    assert load_sweep(sweep_file({"optimizers": [{"kind": kind}]})).optimizers[0].kind == kind


@pytest.mark.parametrize("role", ["students", "teachers"])
def test_api_key_in_a_sweep_file_points_to_api_key_env(sweep_file: SweepFile, role: str) -> None:
    secret = "sk-live-0123456789abcdef"
    path = sweep_file({role: [{"name": "m", "model": "openai/gpt-4o-mini", "api_key": secret}]})
    message = error_of(path)
    assert message.startswith(f"{path}: {role}.0.api_key: keys never go in sweep files")
    assert "api_key_env" in message
    assert secret not in message


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ({"column": "split", "train": 10, "val": 10, "test": 10}, "give either column or train/val/test, not both"),
        ({"train": 0, "val": 10, "test": 10}, "must each be greater than 0"),
        ({"train": 10, "val": -0.5, "test": 10}, "must each be greater than 0"),
        ({"train": 10, "val": 10}, "give train, val and test (counts or fractions), or column"),
    ],
)
def test_bad_split_is_explained(sweep_file: SweepFile, split: dict, expected: str) -> None:
    message = error_of(sweep_file({"data": {"split": split}}, remove=["data.split"]))
    assert ": data.split: " in message
    assert expected in message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"name": "my sweep"}, "name: String should match pattern"),
        ({"program": "pipelines.arith.Solve"}, "program: String should match pattern"),
        ({"students": []}, "students: List should have at least 1 item"),
        ({"teachers": [{"name": "t", "model": "sim/teacher", "temperature": "hot"}]}, "teachers.0.temperature:"),
        ({"tracking": {"wandb": {"mode": "loud"}}}, "tracking.wandb.mode:"),
    ],
)
def test_invalid_values_name_their_field(sweep_file: SweepFile, changes: dict, expected: str) -> None:
    assert expected in error_of(sweep_file(changes))


def test_missing_required_field_is_named(sweep_file: SweepFile) -> None:
    path = sweep_file(remove=["metric"])
    assert error_of(path) == f"{path}: metric: required field is missing"


# --- retries and fallbacks ------------------------------------------------------------------


def test_retries_default_to_four_within_a_minute_and_fallbacks_load_in_order(sweep_file: SweepFile) -> None:
    backups = [{"name": "b1", "model": "openai/gpt-4o-mini", "retries": 1}, {"name": "b2", "model": "sim/student"}]
    sweep = load_sweep(sweep_file({"teachers": [{"name": "t", "model": "sim/teacher", "fallbacks": backups}]}))
    teacher = sweep.teachers[0]
    assert (teacher.retries, teacher.max_retry_s) == (4, 60.0)
    assert [(f.model, f.retries) for f in teacher.fallbacks] == [("openai/gpt-4o-mini", 1), ("sim/student", 4)]
    assert [where for where, _ in sweep.roles()] == [
        "students.0",
        "teachers.0",
        "teachers.0.fallbacks.0",
        "teachers.0.fallbacks.1",
    ]
    assert [m.model for m in sweep.models][-2:] == ["openai/gpt-4o-mini", "sim/student"]


@pytest.mark.parametrize(
    ("teacher", "expected"),
    [
        ({"retries": -1}, "teachers.0.retries: Input should be greater than or equal to 0"),
        ({"max_retry_s": 0}, "teachers.0.max_retry_s: Input should be greater than 0"),
        ({"fallbacks": [{"model": "sim/student"}]}, "teachers.0.fallbacks.0.name: required field is missing"),
        ({"fallbacks": [{"name": "b", "model": "sim/student", "retry": 2}]}, "did you mean 'retries'?"),
        (
            {"fallbacks": [{"name": "b", "model": "sim/a", "fallbacks": [{"name": "c", "model": "sim/b"}]}]},
            "teachers.0.fallbacks.0.fallbacks: a fallback has none of its own; list them all in order",
        ),
        (
            {"fallbacks": [{"name": "b", "model": "openai/x", "serve": {"engine": "vllm", "model": "x"}}]},
            "teachers.0.fallbacks.0.serve: a fallback is not served by the sweep",
        ),
    ],
)
def test_bad_retry_and_fallback_settings_name_their_field(sweep_file: SweepFile, teacher: dict, expected: str) -> None:
    assert expected in error_of(sweep_file({"teachers": [{"name": "t", "model": "sim/teacher", **teacher}]}))
