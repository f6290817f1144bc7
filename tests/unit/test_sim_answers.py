"""Unit tests for the simulated endpoint's reply logic (`dspy_sweeps_sim.answers`).

Run: ``python -m pytest tests/unit/test_sim_answers.py -q``. Requests are built with DSPy's own
adapters and GEPA's own prompt renderer, and replies are parsed back with them, so a change in
either side's format fails here.
"""

import json

import dspy
import pytest
from dspy.propose.dataset_summary_generator import DatasetDescriptor
from dspy.propose.grounded_proposer import DescribeProgram, generate_instruction_class
from dspy.teleprompt.gepa.instruction_proposal import ProposeInstruction
from gepa.strategies.instruction_proposal import InstructionProposalSignature

from dspy_sweeps_sim.answers import HINTS, AnswerKey, demo_score, instruction_score, parse_adapter_prompt, reply

QUESTIONS = [f"What is {a} plus {b}?" for a in range(20) for b in range(10)]  # 200 keyed questions
COT = dspy.ChainOfThought("question -> answer").predict.signature


def gold(question: str) -> str:
    words = question.split()
    return str(int(words[2]) + int(words[4].rstrip("?")))


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> AnswerKey:
    path = tmp_path_factory.mktemp("key") / "key.jsonl"
    rows = [{"inputs": {"question": q}, "labels": {"answer": gold(q)}} for q in QUESTIONS]
    rows.append({"inputs": {"question": "Capital of France?", "topic": "geo"}, "labels": {"capital": "Paris"}})
    rows.append({"inputs": {"question": "Capital of Spain?", "topic": "geo"}, "labels": {"capital": "Madrid"}})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return AnswerKey.from_jsonl(path)


def good_demos(n: int = 4) -> list[dict[str, str]]:
    # Demos come from the end of the key so they do not overlap the questions being scored.
    return [{"question": q, "reasoning": "Add the two numbers.", "answer": gold(q)} for q in QUESTIONS[-n:]]


def accuracy(key: AnswerKey, model: str, demos: list[dict[str, str]], instructions: str) -> float:
    signature = COT.with_instructions(instructions)
    right = 0
    for question in QUESTIONS[:150]:
        messages = dspy.ChatAdapter().format(signature, demos, {"question": question})
        right += dspy.ChatAdapter().parse(signature, reply(key, model, messages))["answer"] == gold(question)
    return right / 150


def test_key_lookup_normalises_whitespace_and_matches_field_names(key: AnswerKey) -> None:
    assert key.lookup({"question": "  What is 3\n plus 4? "}) == {"answer": "7"}
    assert key.lookup({"topic": "geo", "question": "Capital of Spain?"}) == {"capital": "Madrid"}
    assert key.lookup({"question": "Not in the key"}) is None


def test_accuracy_follows_profile_demos_and_hints(key: AnswerKey) -> None:
    bare = "Given the fields `question`, produce the fields `answer`."
    hinted = "Add the numbers. " + " ".join(HINTS)
    student_bare = accuracy(key, "student", [], bare)
    student_best = accuracy(key, "student", good_demos(), hinted)
    teacher_bare = accuracy(key, "teacher", [], bare)
    assert 0.2 <= student_bare <= 0.4  # base 0.30
    assert 0.75 <= student_best <= 0.95  # ceiling 0.85
    assert 0.65 <= teacher_bare <= 0.85  # base 0.75
    assert accuracy(key, "student", good_demos(), bare) > student_bare + 0.15


def test_same_request_gives_same_reply_and_sampled_variants_differ(key: AnswerKey) -> None:
    messages = dspy.ChatAdapter().format(COT, [], {"question": QUESTIONS[0]})
    assert reply(key, "student", messages) == reply(key, "student", messages)
    assert reply(key, "student", messages, variant=1) != reply(key, "student", messages, variant=2)


def test_reasoning_is_a_chain_of_thought_of_40_to_120_words(key: AnswerKey) -> None:
    for question in QUESTIONS[:30]:
        messages = dspy.ChatAdapter().format(COT, [], {"question": question})
        words = len(dspy.ChatAdapter().parse(COT, reply(key, "teacher", messages))["reasoning"].split())
        assert 40 <= words <= 130


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_demo_score_rewards_reasoned_correct_demos_and_penalises_wrong_ones(
    key: AnswerKey, adapter: dspy.Adapter
) -> None:
    def score(demos: list[dict[str, str]]) -> float:
        prompt = parse_adapter_prompt(adapter.format(COT, demos, {"question": QUESTIONS[0]}))
        assert prompt is not None
        return demo_score(prompt, key)

    labelled_only = [{"question": d["question"], "answer": d["answer"]} for d in good_demos()]
    wrong = [{**d, "answer": str(int(d["answer"]) + 1)} for d in good_demos()]
    unknown = [{"question": "Unknown?", "reasoning": "r", "answer": "1"}] * 4
    assert score(good_demos()) == 1.0
    assert score(labelled_only) == 0.5
    assert score(good_demos(2) + wrong[:1]) == pytest.approx(0.375)
    assert score(wrong) == 0.0
    assert score(unknown) == 0.0


def test_instruction_score_counts_distinct_hints() -> None:
    assert instruction_score("Solve it.") == 0
    assert instruction_score(f"Solve it. {HINTS[0]} {HINTS[0]}\n{HINTS[3]}") == pytest.approx(2 / 6)


def test_wrong_answers_look_plausible(key: AnswerKey) -> None:
    wrong = []
    for question in QUESTIONS[:40]:
        messages = dspy.ChatAdapter().format(COT, [], {"question": question})
        answer = dspy.ChatAdapter().parse(COT, reply(key, "student", messages))["answer"]
        if answer != gold(question):
            wrong.append((int(answer), int(gold(question))))
    assert wrong, "a bare student must miss some questions"
    assert all(1 <= abs(a - g) <= 9 for a, g in wrong)

    signature = dspy.Signature("question, topic -> capital")
    misses = set()
    for variant in range(20):
        messages = dspy.ChatAdapter().format(signature, [], {"question": "Capital of France?", "topic": "geo"})
        misses.add(dspy.ChatAdapter().parse(signature, reply(key, "student", messages, variant=variant))["capital"])
    assert misses == {"Paris", "Madrid"}


def test_unknown_question_gets_a_wrong_style_answer(key: AnswerKey) -> None:
    messages = dspy.ChatAdapter().format(COT, [], {"question": "What is the meaning of life?"})
    answer = dspy.ChatAdapter().parse(COT, reply(key, "teacher", messages))["answer"]
    assert answer in key.label_values["answer"]


def test_json_adapter_requests_get_json_replies(key: AnswerKey) -> None:
    messages = dspy.JSONAdapter().format(COT, good_demos(), {"question": QUESTIONS[1]})
    text = reply(key, "teacher", messages)
    assert set(json.loads(text)) == {"reasoning", "answer"}
    assert dspy.JSONAdapter().parse(COT, text)["answer"].isdigit()


def test_response_format_asks_for_json_even_from_a_chat_prompt(key: AnswerKey) -> None:
    messages = dspy.ChatAdapter().format(COT, [], {"question": QUESTIONS[1]})
    assert set(json.loads(reply(key, "teacher", messages, json_requested=True))) == {"reasoning", "answer"}


def gepa_prompt(current: str, feedback: str) -> str:
    dataset = [{"Inputs": {"question": QUESTIONS[0]}, "Generated Outputs": {"answer": "3"}, "Feedback": feedback}]
    return InstructionProposalSignature.prompt_renderer(
        {"current_instruction_doc": current, "dataset_with_feedback": dataset}
    )


def test_gepa_teacher_reflection_keeps_existing_hints_inside_a_code_block(key: AnswerKey) -> None:
    current = f"Add the two numbers. {HINTS[1]} {HINTS[4]}"
    for i in range(20):
        text = reply(key, "teacher", [{"role": "user", "content": gepa_prompt(current, f"wrong, try {i}")}])
        assert text.count("```") == 2
        instruction = InstructionProposalSignature.output_extractor(text)["new_instruction"]
        assert instruction.startswith("Add the two numbers.")
        hints = [h for h in HINTS if h in instruction]
        assert HINTS[1] in hints and HINTS[4] in hints and len(hints) >= 2


def test_dspy_gepa_proposer_gets_json_with_the_current_instructions_hints(key: AnswerKey) -> None:
    # dspy.GEPA's default InstructionProposer asks through a JSONAdapter-formatted ProposeInstruction.
    inputs = {
        "current_instruction": f"Add the two numbers. {HINTS[5]}",
        "examples_with_feedback": [{"inputs": {"question": QUESTIONS[0]}, "feedback": "wrong"}],
    }
    messages = dspy.JSONAdapter().format(ProposeInstruction, [], inputs)
    new = dspy.JSONAdapter().parse(ProposeInstruction, reply(key, "teacher", messages))["new_instruction"]
    assert new.startswith("Add the two numbers.") and HINTS[5] in new
    assert sum(h in new for h in HINTS) >= 2


def test_gepa_student_reflection_adds_at_most_one_hint(key: AnswerKey) -> None:
    for i in range(10):
        text = reply(key, "student", [{"role": "user", "content": gepa_prompt("Add the two numbers.", str(i))}])
        instruction = InstructionProposalSignature.output_extractor(text)["new_instruction"]
        assert sum(h in instruction for h in HINTS) <= 1


def test_mipro_proposer_gets_an_instruction_that_keeps_the_basic_instructions_hints(key: AnswerKey) -> None:
    signature = generate_instruction_class().signature
    inputs = {name: "Not available" for name in signature.input_fields}
    inputs["basic_instruction"] = f"Add the two numbers. {HINTS[2]}"
    messages = dspy.ChatAdapter().format(signature, [], inputs)
    proposed = dspy.ChatAdapter().parse(signature, reply(key, "teacher", messages))["proposed_instruction"]
    assert proposed.startswith("Add the two numbers.") and HINTS[2] in proposed
    assert sum(h in proposed for h in HINTS) >= 2


@pytest.mark.parametrize("signature", [DescribeProgram, DatasetDescriptor, dspy.Signature("observations -> summary")])
def test_other_proposer_prompts_get_parseable_replies(key: AnswerKey, signature: type[dspy.Signature]) -> None:
    inputs = {name: "Some text." for name in signature.input_fields}
    for adapter in (dspy.ChatAdapter(), dspy.JSONAdapter()):
        parsed = adapter.parse(signature, reply(key, "teacher", adapter.format(signature, [], inputs)))
        assert all(isinstance(parsed[name], str) and parsed[name] for name in signature.output_fields)
