"""Deterministic reply logic of the SIMULATED LM endpoint (a test/demo double, not a real model).

Pure functions: `reply(key, model, messages)` reads a DSPy-formatted chat request (ChatAdapter
or JSONAdapter, MIPROv2 proposer prompts, GEPA reflection prompts) and returns the text a
student or teacher model "would" answer. Correctness is drawn from a quality model driven by
the prompt's few-shot demos and instruction hints, so optimisers make real, repeatable
differences offline. Used by `dspy_sweeps_sim.server`; tested in tests/unit/test_sim_answers.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspy_sweeps.data import Dataset

# Generic, task-agnostic hints. Counting them in the system message is how the simulator
# judges instruction quality; proposers "discover" them when writing instructions.
HINTS: tuple[str, ...] = (
    "Read the question carefully and identify exactly what is asked.",
    "Work step by step, writing down each intermediate result.",
    "Double-check every calculation before answering.",
    "Put only the final answer in the answer field, with no units or extra words.",
    "Follow the format of the worked examples.",
    "When several answers seem possible, choose the one most consistent with the facts given.",
)

NOT_SUPPLIED = "Not supplied for this"  # DSPy's filler for demo fields that were not supplied
GEPA_MARKER = "Your task is to write a new instruction for the assistant"
_GEPA_CURRENT = re.compile(r"following instructions to perform a task for me:\s*```\n(.*?)\n```", re.DOTALL)
# Input fields holding the instruction being improved: dspy GEPA's InstructionProposer,
# MIPROv2's instruction generator, and GEPA's CompressInstruction.
_CURRENT_INSTRUCTION_FIELDS = ("current_instruction", "basic_instruction", "instruction")
_FIELD_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \(")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")

_REASONING_STEPS: tuple[str, ...] = (
    "First, I identify exactly what is being asked.",
    "I list the relevant facts given in the input.",
    "Next, I work through the problem one step at a time.",
    "I write down each intermediate result so that nothing is lost.",
    "Then I check that the intermediate results are consistent with each other.",
    "I consider whether any detail in the input changes the approach.",
    "Re-reading the input confirms the key quantities and names.",
    "I double-check the calculation before committing to an answer.",
    "Only one answer fits all of the constraints stated in the input.",
    "Putting these steps together gives the final result.",
    "Nothing in the input suggests a trick, so the direct reading holds.",
    "The worked examples follow the same pattern, which supports this approach.",
)
_GENERIC_SENTENCES: tuple[str, ...] = (
    "The inputs describe a well-defined task with a single expected output per example.",
    "Each example pairs a short input with a concise answer in a consistent format.",
    "The program reads the inputs, reasons about them, and returns a concise answer.",
    "The data consists of short, self-contained problems with unambiguous answers.",
)


@dataclass(frozen=True)
class Profile:
    """Accuracy range of a simulated model: `base` with a bare prompt, `ceiling` with a perfect one."""

    name: str
    base: float
    ceiling: float


STUDENT = Profile("student", base=0.30, ceiling=0.85)
TEACHER = Profile("teacher", base=0.75, ceiling=0.95)


def profile_for(model: str) -> Profile:
    return TEACHER if "teacher" in model.lower() else STUDENT


def normalise(text: str) -> str:
    return " ".join(text.split())


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _digest(*parts: Any) -> int:
    """Stable hash (sha256) of any JSON-serialisable parts, so replies never depend on the process."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest(), "big")


def _unit(*parts: Any) -> float:
    return _digest(*parts) / 2**256


@dataclass(frozen=True)
class AnswerKey:
    """Gold labels by normalised input values, as written by the platform (one JSON object per line)."""

    rows: Mapping[tuple[str, ...], Mapping[str, str]]
    input_orders: tuple[tuple[str, ...], ...]  # distinct input-field name orders seen in the file
    label_values: Mapping[str, tuple[str, ...]]  # every distinct value of each label column

    @classmethod
    def from_jsonl(cls, path: Path) -> AnswerKey:
        rows: dict[tuple[str, ...], dict[str, str]] = {}
        orders: dict[tuple[str, ...], None] = {}
        values: dict[str, set[str]] = {}
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            inputs = {k: normalise(_as_text(v)) for k, v in record["inputs"].items()}
            labels = {k: normalise(_as_text(v)) for k, v in record["labels"].items()}
            orders[tuple(inputs)] = None
            rows[tuple(inputs.values())] = labels
            for column, value in labels.items():
                values.setdefault(column, set()).add(value)
        return cls(rows, tuple(orders), {c: tuple(sorted(v)) for c, v in values.items()})

    def lookup(self, inputs: Mapping[str, str]) -> Mapping[str, str] | None:
        """Labels for these inputs: matched by the key's field names, else by the values in prompt order."""
        given = {k: normalise(v) for k, v in inputs.items()}
        candidates = [tuple(given[n] for n in order) for order in self.input_orders if set(order) <= set(given)]
        candidates.append(tuple(given.values()))
        return next((self.rows[c] for c in candidates if c in self.rows), None)


@dataclass(frozen=True)
class Demo:
    inputs: dict[str, str]
    outputs: dict[str, str]


@dataclass(frozen=True)
class AdapterPrompt:
    """A request formatted by a DSPy ChatAdapter or JSONAdapter."""

    json_style: bool
    system: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    demos: tuple[Demo, ...]
    inputs: dict[str, str]


def message_text(message: Mapping[str, Any]) -> str:
    """Text of a chat message whose content is a string or a list of OpenAI content parts."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))


def _listed_fields(system: str, heading: str) -> tuple[str, ...]:
    """Field names of a numbered "Your ... fields are:" list; description lines do not match."""
    start = system.find(heading)
    if start < 0:
        return ()
    names: list[str] = []
    for line in system[start + len(heading) :].splitlines()[1:]:
        if line.startswith("Your ") or line.startswith("All interactions"):
            break
        if match := _FIELD_LINE.match(line):
            names.append(match.group(1))
    return tuple(names)


def _sections(text: str, names: Sequence[str]) -> dict[str, str]:
    """Values of `[[ ## name ## ]]` sections, split line by line the way DSPy's ChatAdapter parses."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if match := _FIELD_HEADER.match(line.strip()):
            current = found.setdefault(match.group(1), []) if match.group(1) in names else None
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in found.items()}


def _strip_output_request(text: str) -> str:
    # The main request ends with "Respond with ..." after the last input field's value.
    cut = text.rfind("\n\nRespond with ")
    return text[:cut] if cut >= 0 else text


def _assistant_outputs(text: str, names: Sequence[str], json_style: bool) -> dict[str, str]:
    if json_style:
        try:
            data = json.loads(text)
            return {k: _as_text(v) for k, v in data.items() if k in names}
        except (json.JSONDecodeError, AttributeError):
            pass  # JSONAdapter falls back to chat format, so demos may be in either form
    return _sections(text, names)


def parse_adapter_prompt(messages: Sequence[Mapping[str, Any]], json_requested: bool = False) -> AdapterPrompt | None:
    """Parse a DSPy adapter request; None when the messages were not formatted by a DSPy adapter."""
    if not messages or messages[0].get("role") != "system":
        return None
    system = message_text(messages[0])
    outputs = _listed_fields(system, "Your output fields are:")
    if not outputs:
        return None
    inputs = _listed_fields(system, "Your input fields are:")
    json_style = json_requested or "Outputs will be a JSON object with the following fields." in system
    turns = [m for m in messages[1:] if m.get("role") in ("user", "assistant")]
    demos = tuple(
        Demo(
            _sections(message_text(user), inputs),
            _assistant_outputs(message_text(assistant), outputs, json_style),
        )
        for user, assistant in zip(turns[0:-1:2], turns[1:-1:2])
        if user.get("role") == "user" and assistant.get("role") == "assistant"
    )
    last = _strip_output_request(message_text(turns[-1])) if turns else ""
    return AdapterPrompt(json_style, system, inputs, outputs, demos, _sections(last, inputs))


def _same(a: str, b: str) -> bool:
    a, b = normalise(a), normalise(b)
    if _NUMBER.match(a) and _NUMBER.match(b):
        return float(a) == float(b)
    return a == b


def _supplied(value: str | None) -> bool:
    return value is not None and not value.startswith(NOT_SUPPLIED)


def demo_score(prompt: AdapterPrompt, key: AnswerKey) -> float:
    """Strength of the few-shot demos: reasoned correct demos help most, wrong ones hurt."""
    total = 0.0
    for demo in prompt.demos:
        labels = (key.lookup(demo.inputs) if demo.inputs else None) or {}
        label_fields = [f for f in prompt.output_names if f in labels]
        if not label_fields:
            continue  # a demo the key cannot grade neither helps nor hurts
        given = [demo.outputs.get(f) for f in label_fields]
        if any(_supplied(v) and not _same(v, labels[f]) for f, v in zip(label_fields, given)):
            total -= 0.5
        elif all(_supplied(v) for v in given):
            extras = [demo.outputs.get(f) for f in prompt.output_names if f not in label_fields]
            total += 1.0 if any(_supplied(v) for v in extras) else 0.5
    return min(max(total / 4, 0.0), 1.0)


def hints_in(text: str) -> tuple[str, ...]:
    flat = normalise(text)
    return tuple(h for h in HINTS if h in flat)


def instruction_score(system: str) -> float:
    return len(hints_in(system)) / len(HINTS)


def p_correct(profile: Profile, demo: float, instruction: float) -> float:
    return profile.base + (profile.ceiling - profile.base) * (0.55 * demo + 0.45 * instruction)


def _difficulty_draw(question: Sequence[str], request: Sequence[Any]) -> float:
    """u = 0.6*h(question) + 0.4*h(request), mapped through its own CDF so that P(u < p) = p.

    The question term makes hard questions hard for every prompt; the request term makes the
    outcome depend on the prompt. A weighted sum of uniforms is not uniform, so without the
    CDF the accuracy would not equal p (a bare student would score ~19% instead of 30%).
    """
    x = 0.6 * _unit("question", list(question)) + 0.4 * _unit("request", list(request))
    if x < 0.4:
        return x * x / 0.48
    if x < 0.6:
        return (x - 0.2) / 0.6
    return 1 - (1 - x) ** 2 / 0.48


def _wrong_answer(gold: str | None, column_values: Sequence[str], seed: int) -> str:
    if gold is not None and _NUMBER.match(gold):
        # Decimal keeps the gold's formatting: "5" -> "8", "2.50" -> "5.50".
        return str(Decimal(gold) + (1 + seed % 9) * (1 if (seed >> 8) % 2 else -1))
    others = [v for v in column_values if v != gold]
    return others[seed % len(others)] if others else "I am not sure."


def _reasoning(question: Sequence[str], final: str | None, seed: int) -> str:
    """A plausible chain of thought of roughly 40-120 words, varying with the seed."""
    snippet = " ".join(" ".join(question).split()[:15])
    sentences = [f'Let me restate the problem: "{snippet}".' if snippet else "Let me restate the problem."]
    order = sorted(range(len(_REASONING_STEPS)), key=lambda i: _digest(seed, i))
    target = 40 + seed % 61
    for i in order:
        if sum(len(s.split()) for s in sentences) >= target:
            break
        sentences.append(_REASONING_STEPS[i])
    sentences.append(f"So the answer is {final}." if final else "That settles it.")
    return " ".join(sentences)


def _generic_sentence(field: str, seed: int) -> str:
    return _GENERIC_SENTENCES[_digest(field, seed) % len(_GENERIC_SENTENCES)]


def write_instruction(profile: Profile, current: str, seed: int) -> str:
    """A new instruction: the current one without hints plus hints picked by the proposer's strength.

    The teacher keeps every hint already present, so reflection improves and never regresses;
    the student adds at most one hint.
    """
    task = normalise(current)
    kept = hints_in(current)
    for hint in kept:
        task = task.replace(hint, "")
    task = normalise(task) or "Solve the task described by the input fields."
    if profile is TEACHER:
        wanted, chosen = 2 + seed % 5, set(kept)
    else:
        wanted, chosen = seed % 2, set()
    for i in sorted(range(len(HINTS)), key=lambda i: _digest(seed, "hint", i)):
        if len(chosen) >= wanted:
            break
        chosen.add(HINTS[i])
    return " ".join([task, *(h for h in HINTS if h in chosen)])


def _gepa_reply(profile: Profile, prompt: str, seed: int) -> str:
    match = _GEPA_CURRENT.search(prompt)
    instruction = write_instruction(profile, match.group(1) if match else "", seed)
    return f"Here is the improved instruction:\n```\n{instruction}\n```"


def _adapter_reply(key: AnswerKey, profile: Profile, prompt: AdapterPrompt, request: Sequence[Any]) -> str:
    seed = _digest("reply", list(request))
    question = list(prompt.inputs.values())
    labels = key.lookup(prompt.inputs) if prompt.inputs else None
    p = p_correct(profile, demo_score(prompt, key), instruction_score(prompt.system))
    correct = labels is not None and _difficulty_draw(question, request) < p

    values: dict[str, str] = {}
    for field in prompt.output_names:
        if field in key.label_values:
            gold = labels.get(field) if labels else None
            values[field] = gold if correct and gold is not None else _wrong_answer(gold, key.label_values[field], seed)
    final = next(iter(values.values()), None)
    for field in prompt.output_names:
        if field in values:
            continue
        if "instruction" in field:
            current = next((prompt.inputs[f] for f in _CURRENT_INSTRUCTION_FIELDS if f in prompt.inputs), "")
            values[field] = write_instruction(profile, current, seed)
        elif final is not None or field in ("reasoning", "rationale"):
            # In a task prompt (one that asks for a labelled field) every other output is reasoning.
            values[field] = _reasoning(question, final, seed)
        else:
            values[field] = _generic_sentence(field, seed)

    ordered = {f: values[f] for f in prompt.output_names}
    if prompt.json_style:
        return json.dumps(ordered, indent=2)
    return "".join(f"[[ ## {f} ## ]]\n{v}\n\n" for f, v in ordered.items()) + "[[ ## completed ## ]]"


def reply(
    key: AnswerKey,
    model: str,
    messages: Sequence[Mapping[str, Any]],
    json_requested: bool = False,
    variant: int = 0,
) -> str:
    """The simulated completion for one chat request; `variant` > 0 gives a different sample."""
    profile = profile_for(model)
    request = [model, [[m.get("role"), message_text(m)] for m in messages], variant]
    if prompt := parse_adapter_prompt(messages, json_requested):
        return _adapter_reply(key, profile, prompt, request)
    last = message_text(messages[-1]) if messages else ""
    if GEPA_MARKER in last:
        return _gepa_reply(profile, last, _digest("reply", request))
    return _generic_sentence("text", _digest("reply", request))


EMBEDDING_DIMENSIONS = 64


def embed_text(text: str) -> list[float]:
    """A unit vector hashing the text's words (a bag of words): texts that share words lie close."""
    vector = [0.0] * EMBEDDING_DIMENSIONS
    for word in normalise(text).lower().split():
        digest = _digest("embed", word)
        vector[digest % EMBEDDING_DIMENSIONS] += 1.0 if (digest >> 8) % 2 else -1.0
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in vector]


# Fault injection (test facility): prose that no adapter can parse — no field markers, no JSON,
# no code fences, no field names followed by a colon.
_GARBAGE_SENTENCES: tuple[str, ...] = (
    "Honestly the weather has been lovely this week",
    "I keep thinking about that documentary on deep sea creatures",
    "There is a small bakery down the road that opens very early",
    "My cousin once tried to teach a parrot to sing opera",
    "Some people prefer tea while others insist on coffee",
    "The train was late again so I read half a novel on the platform",
    "Clouds drift slowly over the hills in the late afternoon",
    "Nobody remembers who first planted the old oak in the square",
)


def garbage_reply(model: str, messages: Sequence[Mapping[str, Any]], variant: int = 0) -> str:
    """Deterministic off-topic prose in no adapter format: what the `garbage` fault answers."""
    seed = _digest("garbage", model, [[m.get("role"), message_text(m)] for m in messages], variant)
    order = sorted(range(len(_GARBAGE_SENTENCES)), key=lambda i: _digest(seed, i))
    return ". ".join(_GARBAGE_SENTENCES[i] for i in order[: 3 + seed % 3]) + "."


def write_answer_key(data: Dataset, path: Path) -> Path:
    """The simulator's answer key: every row's inputs and labels, one JSON record a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in data.rows:
            record = {
                "inputs": {k: str(row[k]) for k in data.inputs},
                "labels": {k: str(row[k]) for k in data.labels},
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
