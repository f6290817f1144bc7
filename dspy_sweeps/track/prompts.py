"""The promoted program's prompts in MLflow's Prompt Registry, as `mlflow.genai.optimize_prompts`
leaves optimized prompts: one prompt per predictor, named `MODEL.PREDICTOR` (its attribute path in
the program's state), holding its instructions and its demos, with the registered model's alias.

`mlflow.genai.load_prompt("prompts:/demo.solve.predict@champion").template` is then the
champion's instruction for `solve.predict`, followed by its demos. Read from the program's JSON
state: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

DEMOS_HEADING = "Examples:"


@dataclass(frozen=True)
class PredictorPrompt:
    predictor: str  # attribute path in the program's state: "solve.predict", "members.0.solve.predict"
    instructions: str
    demos: list[dict[str, Any]]

    @property
    def template(self) -> str:
        if not self.demos:
            return self.instructions
        shown = "\n\n".join("\n".join(f"{k}: {v}" for k, v in demo.items() if k != "augmented") for demo in self.demos)
        return f"{self.instructions}\n\n{DEMOS_HEADING}\n\n{shown}"


def predictor_prompts(program_json: str) -> list[PredictorPrompt]:
    """Every predictor of a program's DSPy JSON state (composite programs' members too)."""
    found: list[PredictorPrompt] = []

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, dict):
            signature = value.get("signature")
            if isinstance(signature, dict) and isinstance(signature.get("instructions"), str):
                demos = [d for d in value.get("demos") or [] if isinstance(d, dict)]
                found.append(PredictorPrompt(".".join(path), signature["instructions"], demos))
                return
            for key, part in value.items():
                walk(part, (*path, str(key)))
        elif isinstance(value, list):
            for i, part in enumerate(value):
                walk(part, (*path, str(i)))

    state = json.loads(program_json)
    walk({k: v for k, v in state.items() if k != "metadata"}, ())
    return found


def prompt_name(model: str, predictor: str) -> str:
    """MLflow allows letters, digits, `_`, `-` and `.` in a prompt's name; anything else becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", f"{model}.{predictor}")


def register_prompts(
    client: Any, model: str, alias: str, program_json: str, version: str, model_id: str | None, tags: dict[str, str]
) -> list[str]:
    """Register each predictor's prompt as a new version, point `alias` at it and link it to the
    registered version's LoggedModel; returns the prompt URIs."""
    uris, versions = [], []
    for prompt in predictor_prompts(program_json):
        name = prompt_name(model, prompt.predictor)
        registered = client.register_prompt(
            name,
            prompt.template,
            commit_message=f"{model} v{version}: {prompt.predictor}",
            tags={**tags, "model_version": str(version), "predictor": prompt.predictor},
        )
        client.set_prompt_alias(name, alias, registered.version)
        versions.append(registered)
        uris.append(f"prompts:/{name}@{alias}")
    if model_id and versions:
        _link_to_model(client, model_id, versions)
    return uris


def _link_to_model(client: Any, model_id: str, versions: list[Any]) -> None:
    """What `MlflowClient.link_prompt_version_to_model` does (the model's linked-prompts tag), through
    this client: MLflow's own reads the LoggedModel from the process-wide tracking URI instead."""
    from mlflow.tracing.constant import TraceTagKey
    from mlflow.tracing.utils.prompt import update_linked_prompts_tag

    current = client.get_logged_model(model_id).tags.get(TraceTagKey.LINKED_PROMPTS)
    client.set_logged_model_tags(model_id, {TraceTagKey.LINKED_PROMPTS: update_linked_prompts_tag(current, versions)})
