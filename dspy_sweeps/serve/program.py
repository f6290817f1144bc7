"""One registered version, loaded to serve: the program (JSON state, no pickle), its student LM
built from the caller's configuration, and the input and output fields of its signature."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dspy_sweeps.errors import SweepError
from dspy_sweeps.spec.schema import ModelSpec


class StudentConfig(BaseModel):
    """Where the served program's LM calls go; as for `sweep pull`, never from the artifact."""

    api_base: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    lm_retries: int = 3  # DSPy's own retry layer on 429, 5xx and dropped connections
    timeout_s: float | None = None  # None: the student spec's timeout_s


@dataclass(frozen=True)
class LoadedProgram:
    name: str
    version: str
    program: Any
    lm: Any
    student: ModelSpec
    inputs: dict[str, Any]  # field name -> type, in the order the program takes them
    outputs: dict[str, Any]

    @property
    def fields(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.inputs), tuple(self.outputs)


def alias_version(tracking_uri: str, name: str, alias: str) -> str:
    """The version the alias points at now; SweepError if there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        raise SweepError(f"{name}@{alias}: no such registered model version at {tracking_uri}") from None


def load_version(tracking_uri: str, name: str, version: str, student: StudentConfig) -> LoadedProgram:
    """Pull version `version` of `name` and build it as `sweep pull` + `dspy_sweeps.load` do."""
    from dspy_sweeps.lm.build import build_lm
    from dspy_sweeps.track.registry import pull, restore_pulled

    with tempfile.TemporaryDirectory() as tmp:
        folder = pull(f"{name}/{version}", Path(tmp), tracking_uri)
        inputs = json.loads((folder / "metadata.json").read_text())["inputs"]
        program, spec = restore_pulled(
            folder, model=student.model, api_base=student.api_base, api_key_env=student.api_key_env
        )
    # Every request counts the calls it sent, so DSPy's response cache is off.
    lm = build_lm(spec, cache=False).copy(num_retries=student.lm_retries, timeout=student.timeout_s or spec.timeout_s)
    ins, outs = signature_fields(program, inputs)
    return LoadedProgram(name, version, program, lm, spec, ins, outs)


def signature_fields(program: Any, inputs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input fields (the sweep's inputs, typed by the signature that takes them) and output fields (the
    last predictor's: the one that answers)."""
    signatures = [predictor.signature for _, predictor in program.named_predictors()]
    if not signatures:
        raise SweepError(f"{type(program).__name__}: the program has no predictor, so no signature to serve")
    known = {n: f.annotation for s in signatures for n, f in s.input_fields.items()}
    outputs = {n: f.annotation for n, f in signatures[-1].output_fields.items()}
    return {n: known.get(n, str) for n in inputs}, outputs
