"""Optimizer kinds and roles: the one table of what a sweep's `kind:` may name and what the platform hands it.

A kind is a short name for a DSPy teleprompter (`copro`) or any teleprompter class by import
path (`mypkg.opt:MyTeleprompter`). The platform fills an optimizer's parameters by role
(ROLES): which constructor or `compile` parameter receives the metric, the teacher, the
student LM, the data, the seed or the thread count is read from the signatures by name, so a
custom teleprompter gets the roles its signature names. KINDS holds only what a signature
cannot say. Nothing here imports DSPy: the schema reads the names, classes load on first use.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

BASELINE = "none"  # the uncompiled program: one trial per student
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class Role:
    """Something the platform supplies, and the parameter names that receive it."""

    name: str
    params: tuple[str, ...]
    gives: str


ROLES: tuple[Role, ...] = (
    Role("metric", ("metric",), "the sweep's metric"),
    Role("teacher", ("teacher_settings", "prompt_model", "reflection_lm"), "the teacher LM"),
    Role("teacher program", ("teacher",), "the program on the teacher LM (only where no parameter takes the LM)"),
    Role("student", ("task_model",), "the student LM"),
    Role("trainset", ("trainset",), "the train split"),
    Role("valset", ("valset",), "the val split"),
    Role("seed", ("seed",), "the trial's seed (without one, the trainset is shuffled by it)"),
    Role("threads", ("num_threads", "eval_kwargs"), "the sweep's num_threads"),
    Role("log_dir", ("log_dir",), "a folder in the trial's state (a retried trial resumes from it)"),
    Role("embedder", ("vectorizer",), "the sweep's `embedder:` model"),
)
# Parameters the platform owns without supplying them: tracking is the driver's, never a trial's.
OWNED = ("student", "programs", "requires_permission_to_run", "use_wandb", "wandb_api_key", "wandb_init_kwargs")
PLATFORM_PARAMS = frozenset({p for role in ROLES for p in role.params} | {*OWNED, "use_mlflow"})


@dataclass(frozen=True)
class Kind:
    """One optimizer: its class and what its signatures cannot tell."""

    name: str
    path: str  # "module:Class"
    feedback_metric: bool = False  # the metric is wrapped into GEPA's (score, feedback) form
    forwards_to: str | None = None  # the class that receives the constructor's **kwargs
    skip: tuple[str, ...] = ()  # role parameters left alone, with the reason in `note`
    trains_weights: bool = False  # fine-tunes the student: refused until a sweep hosts such a student
    steps: bool = False  # composes other kinds (BetterTogether): settings holding a `kind` are steps
    needs_avatar: bool = False  # reads program.actor and program.tools
    program_lm: bool = False  # wants the LM set on every predictor of the program
    composite: str | None = None  # how its compiled program is saved and rebuilt (see spec/composite.py)
    note: str = ""

    @property
    def class_name(self) -> str:
        return self.path.rpartition(":")[2]

    @property
    def custom(self) -> bool:
        return self.name not in KINDS


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("bootstrap_fewshot", "dspy:BootstrapFewShot"),
        Kind("bootstrap_rs", "dspy:BootstrapFewShotWithRandomSearch"),
        Kind("bootstrap_optuna", "dspy:BootstrapFewShotWithOptuna", note="needs `max_demos`"),
        Kind("labeled_fewshot", "dspy:LabeledFewShot", note="no LM calls to compile"),
        Kind(
            "knn_fewshot",
            "dspy:KNNFewShot",
            forwards_to="dspy:BootstrapFewShot",
            skip=("teacher_settings",),
            composite="knn_fewshot",
            note="needs `k` and `embedder:`; bootstraps on the k nearest train examples at every call, with the "
            "student (as the deployed program will)",
        ),
        Kind(
            "mipro_v2", "dspy:MIPROv2", skip=("log_dir",), note="`log_dir` is left unset: it would save every candidate"
        ),
        Kind("copro", "dspy:COPRO", note="`breadth` > 1"),
        Kind("simba", "dspy:SIMBA", note="`bsize` at most the train split"),
        Kind("gepa", "dspy:GEPA", feedback_metric=True, note="the metric is wrapped into a feedback metric"),
        Kind("infer_rules", "dspy:InferRules", forwards_to="dspy:BootstrapFewShot"),
        Kind(
            "better_together",
            "dspy:BetterTogether",
            steps=True,
            skip=("teacher",),
            program_lm=True,
            note="prompt steps only: `strategy: p -> q`, `p: {kind: ...}`; each step gets its own roles",
        ),
        Kind(
            "avatar",
            "dspy:AvatarOptimizer",
            needs_avatar=True,
            note="only for a dspy.Avatar program (an agent with tools)",
        ),
        Kind(
            "bootstrap_finetune",
            "dspy:BootstrapFinetune",
            trains_weights=True,
            note="refused: trains weights",
        ),
    )
}
KIND_NAMES: tuple[str, ...] = (BASELINE, *KINDS)


def is_import_path(kind: str) -> bool:
    return bool(IMPORT_PATH.match(kind))


def kind_error(kind: str) -> str | None:
    """Why `kind` names no optimizer (with the nearest valid name), or None if it does."""
    if kind in KIND_NAMES or is_import_path(kind):
        return None
    near = difflib.get_close_matches(kind, KIND_NAMES, n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return (
        f"unknown optimizer kind {kind!r} ({hint}valid: {', '.join(KIND_NAMES)}, "
        "or a teleprompter class by import path, mypkg.module:MyTeleprompter)"
    )


def kind_of(name: str) -> Kind:
    """The table's entry, or an entry for a custom teleprompter named by import path."""
    return KINDS.get(name) or Kind(name, name)


def weight_training_refusal(name: str) -> str:
    return (
        f"{name} trains the student's weights, which needs a student that can be fine-tuned; a sweep cannot host "
        "one yet (use a prompt optimizer)"
    )
