"""The promotion gate's arithmetic and words: paired bootstrap intervals, the decision it reads,
what the leaderboard shows (intervals, SIMULATED, each student's own baseline), and a record's
identity and simulation flags.

Run: ``.venv/bin/python -m pytest tests/unit/test_gate.py -q``. No server, no LM: the registry
side runs against a real `mlflow server` in tests/integration/test_promotion.py.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from dspy_sweeps.cli.tables import decision_line, leaderboard_table
from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import ModelSpec, Promote
from dspy_sweeps.track.gate import mean_interval, paired_gain
from dspy_sweeps.track.registry import Decision, _judge, version_simulated
from dspy_sweeps.track.results import TrialRecord


def flips(n: int, wins: int, losses: int) -> tuple[list[float], list[float]]:
    """Challenger and champion scores on `n` examples: the challenger alone right on `wins`,
    the champion alone right on `losses`, both right on a third of the rest."""
    challenger, champion = [], []
    for i in range(n):
        if i < wins:
            challenger.append(1.0), champion.append(0.0)
        elif i < wins + losses:
            challenger.append(0.0), champion.append(1.0)
        else:
            both = float(i % 3 == 0)
            challenger.append(both), champion.append(both)
    return challenger, champion


def test_a_clear_gain_has_its_whole_interval_above_zero() -> None:
    gain = paired_gain(*flips(100, wins=15, losses=0), confidence=0.95)
    assert gain is not None and gain.value == pytest.approx(0.15) and gain.n == 100
    assert 0 < gain.low < gain.value < gain.high


def test_a_small_gain_on_100_examples_is_within_noise() -> None:
    # +0.04 from 7 wins and 3 losses: one standard error is about 0.03, so 0 is inside the interval.
    gain = paired_gain(*flips(100, wins=7, losses=3), confidence=0.95)
    assert gain is not None and gain.value == pytest.approx(0.04)
    assert gain.low < 0 < gain.value < gain.high


def test_the_interval_is_the_same_every_time_and_widens_with_confidence() -> None:
    scores = flips(100, wins=7, losses=3)
    assert paired_gain(*scores, confidence=0.95) == paired_gain(*scores, confidence=0.95)
    narrow, wide = paired_gain(*scores, confidence=0.5), paired_gain(*scores, confidence=0.99)
    assert wide.low < narrow.low and narrow.high < wide.high


def test_only_examples_both_scored_are_paired() -> None:
    gain = paired_gain([1.0, None, 1.0, 0.0], [0.0, 1.0, None, 0.0], confidence=0.95)
    assert gain.n == 2 and gain.value == pytest.approx(0.5)
    assert paired_gain([1.0, 0.0], [1.0], confidence=0.95) is None, "different examples are not paired"
    assert paired_gain([None], [1.0], confidence=0.95) is None


def test_a_score_interval_brackets_the_mean() -> None:
    val = mean_interval([1.0] * 31 + [0.0] * 19, confidence=0.95)
    assert val.value == pytest.approx(0.62) and val.low < 0.62 < val.high
    assert val.plain().startswith("0.620 [")
    assert mean_interval([1.0] * 10, confidence=0.95).plain() == "1.000 [1.000, 1.000]"
    assert mean_interval([None], confidence=0.95) is None


def champion(version: str = "3", **tags: str) -> SimpleNamespace:
    return SimpleNamespace(version=version, tags=tags)


def winner() -> TrialRecord:
    return record("gepa-small", "small", val=[1.0, 0.0])


def test_the_gate_promotes_only_when_the_lower_bound_clears_min_gain() -> None:
    gate = Promote(model="demo")
    clear = paired_gain(*flips(100, wins=15, losses=0), confidence=gate.confidence)
    noisy = paired_gain(*flips(100, wins=7, losses=3), confidence=gate.confidence)
    worse = paired_gain(*flips(100, wins=0, losses=5), confidence=gate.confidence)
    passed, why = _judge(gate, winner(), champion(), clear)
    assert passed and why.startswith("gain +0.150 [+0.") and "over champion v3 on 100 test examples" in why
    passed, why = _judge(gate, winner(), champion(), noisy)
    assert not passed and why.endswith("the gain is within noise (min_gain 0.0)")
    assert why.startswith(f"gain +0.040 [{noisy.low:+.3f}, {noisy.high:+.3f}]")
    assert not _judge(gate, winner(), champion(), worse)[0]
    assert not _judge(Promote(model="demo", min_gain=0.2), winner(), champion(), clear)[0]
    assert not _judge(gate, winner(), champion(), None)[0], "no shared example: no promotion"


def test_promote_defaults_to_a_95_percent_interval_and_min_gain_zero() -> None:
    gate = Promote(model="demo")
    assert (gate.confidence, gate.min_gain) == (0.95, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        Promote(model="demo", confidence=1.0)


def test_a_version_says_whether_it_is_simulated() -> None:
    assert version_simulated(champion(simulated="true")) and not version_simulated(champion(simulated="false"))
    assert version_simulated(champion(student="sim/student")), "versions from before the tag: a sim/ student"
    assert not version_simulated(champion(student="openai/gpt-4o-mini"))


def test_the_decision_line_shows_simulated_and_the_gain_with_its_interval() -> None:
    noisy = paired_gain(*flips(100, wins=7, losses=3), confidence=0.95)
    _, why = _judge(Promote(model="demo"), winner(), champion(), noisy)
    line = decision_line(Decision(False, why, simulated=True, gain=noisy))
    assert line.startswith("[yellow]not promoted[/] ([yellow]SIMULATED[/] scores): gain +0.040 [")
    promoted = decision_line(Decision(True, "no champion yet", "1", "champion", simulated=True))
    assert promoted.startswith("[green]promoted[/] v1 as @champion ([yellow]SIMULATED[/] scores): no champion")
    assert "SIMULATED" not in decision_line(Decision(True, "no champion yet", "1", "champion"))


def record(trial_id: str, student: str, val: list[float], kind: str = "bootstrap_fewshot", **extra) -> TrialRecord:
    fields = dict(
        sweep="s",
        trial_id=trial_id,
        kind=kind,
        settings="{}",
        student=student,
        teacher=None,
        seed=0,
        status="ok",
        error=None,
        reason=None,
        val_score=sum(val) / len(val),
        test_score=0.5,
        lm_calls=1,
        calls_requested=1,
        cache_hits=0,
        merged_calls=0,
        failed_calls=0,
        failed_examples=0,
        estimated_calls=1,
        prompt_tokens=0,
        completion_tokens=0,
        latency_s=0.0,
        cost_usd=0.0,
        duration_s=0.0,
        program_path=None,
        data_fingerprint="fp",
        student_model="openai/llama",
        val_scores=val,
    )
    return TrialRecord(**{**fields, **extra})


def rendered(rows: list[TrialRecord]) -> str:
    out = io.StringIO()
    Console(file=out, width=300).print(leaderboard_table([r.__dict__ for r in rows]))
    return out.getvalue()


def test_two_students_with_one_model_string_get_their_own_baselines() -> None:
    """Each trial's gain is over its own student's baseline, on the held-out test examples; the val
    column, the split the optimizers tuned on, is labelled in-sample and never feeds the gain."""
    rows = [
        record("none-a", "a", [0.0] * 10, kind="none", test_scores=[0.0] * 10, test_score=0.0),
        record(
            "none-b",
            "b",
            [1.0] * 5 + [0.0] * 5,
            kind="none",
            student_simulated=True,
            test_scores=[1.0] * 5 + [0.0] * 5,
            test_score=0.5,
        ),
        # a val score far above its test score: an overfit to val must not show as gain
        record("fewshot-a", "a", [1.0] * 10, test_scores=[1.0] * 4 + [0.0] * 6, test_score=0.4),
        record("fewshot-b", "b", [1.0] * 10, student_simulated=True, test_scores=[1.0] * 6 + [0.0] * 4, test_score=0.6),
    ]
    text = rendered(rows)
    assert "val (in-sample)" in text and "over the held-out test examples" in " ".join(text.split())
    lines = {line.split("│")[2].strip(): line for line in text.splitlines() if "│" in line}
    assert "0.000" in lines["fewshot-a"].split("│")[5] and "+0.400 [" in lines["fewshot-a"].split("│")[6]
    assert "0.500" in lines["fewshot-b"].split("│")[5] and "+0.100 [" in lines["fewshot-b"].split("│")[6]
    assert "SIMULATED" in lines["fewshot-b"] and "SIMULATED" not in lines["fewshot-a"]
    assert "1.000 [" in lines["fewshot-b"].split("│")[3], "the val score shows its interval"


def test_a_record_is_keyed_by_the_student_name_and_says_what_was_simulated() -> None:
    a = ModelSpec(name="a", model="openai/llama", api_base="http://127.0.0.1:1/v1")
    b = ModelSpec(name="b", model="openai/llama", api_base="http://127.0.0.1:2/v1")
    teacher = ModelSpec(name="big", model="sim/teacher")
    simulated = {a.model_dump_json(): False, b.model_dump_json(): True, teacher.model_dump_json(): True}
    result = TrialResult("t", "ok", val_score=0.5, test_score=0.5, val_scores=[1.0, 0.0], test_scores=[None, 1.0])
    records = [
        TrialRecord.of("s", Trial(f"t-{s.name}", "p:P", "m:f", "gepa", s, teacher, 0), result, None, "fp", simulated)
        for s in (a, b)
    ]
    assert [(r.student, r.student_model, r.student_simulated) for r in records] == [
        ("a", "openai/llama", False),
        ("b", "openai/llama", True),
    ]
    assert all(r.teacher == "big" and r.teacher_simulated and r.simulated for r in records)
    assert records[0].test_scores == [None, 1.0] and json.dumps(records[0].val_scores) == "[1.0, 0.0]"


def test_w_and_b_and_mlflow_are_told_what_was_simulated() -> None:
    """The trial's config names its student and model from its start; whether they were simulated is
    known once its endpoints answered, and goes on the run at its end (W&B config, MLflow tags)."""
    from dspy_sweeps.track.figures import simulation_flags, simulation_tags, trial_config

    student = ModelSpec(name="small", model="openai/student", api_base="http://127.0.0.1:1/v1")
    trial = Trial("t", "p:P", "m:f", "none", student, None, 0)
    config = trial_config(trial, "fp")
    assert (config["student"], config["student_model"]) == ("small", "openai/student")
    marked = TrialRecord.of("s", trial, TrialResult("t", "ok"), None, "fp", {student.model_dump_json(): True})
    assert simulation_flags(marked) == {"simulated": True, "student_simulated": True, "teacher_simulated": False}
    assert simulation_tags(marked) == {"simulated": "true", "student_simulated": "true", "teacher_simulated": "false"}
    real = TrialRecord.of("s", trial, TrialResult("t", "ok"), None, "fp", {student.model_dump_json(): False})
    assert simulation_tags(real)["simulated"] == "false" and not simulation_flags(real)["student_simulated"]


def test_sweep_results_repeats_the_last_decision(tmp_path) -> None:
    from dspy_sweeps.track.registry import save_decision, saved_decision

    results = tmp_path / "demo.parquet"
    assert saved_decision(results) is None
    noisy = paired_gain(*flips(100, wins=7, losses=3), confidence=0.95)
    decision = Decision(False, "the gain is within noise", "2", "challenger", simulated=True, gain=noisy)
    save_decision(results, decision)
    assert saved_decision(results) == decision


def test_with_no_champion_the_first_version_must_beat_its_uncompiled_baseline() -> None:
    """A 135M model's small gain over its baseline on 40 examples is noise: no alias for it."""
    gate = Promote(model="m", min_gain=0.0, confidence=0.95)
    winner = SimpleNamespace(trial_id="labeled_fewshot-smol", student="smol")
    noisy = paired_gain(*flips(40, wins=3, losses=2), 0.95)
    passed, why = _judge(gate, winner, None, noisy)
    assert not passed
    assert why.startswith("no champion yet: gain +0.025") and "over the uncompiled smol on 40 test examples" in why
    clear = paired_gain(*flips(40, wins=20, losses=0), 0.95)
    passed, why = _judge(gate, winner, None, clear)
    assert passed and "above min_gain 0.0" in why
