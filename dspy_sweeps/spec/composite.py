"""Programs built from other programs (an Ensemble of trials, a KNNFewShot program), saved as JSON and rebuilt without pickle.

A plain compiled program is saved as its DSPy JSON state. These two cannot be: an Ensemble
holds several programs, and KNNFewShot's program picks its demos at every call from the
train split with an embedder. Their saved form is one JSON object under the key `MARK`
holding what rebuilds them (the members' states; k, the train rows and the bootstrap
settings); the embedder is never saved: whoever loads the program supplies it.
Imported only where programs are built, so DSPy stays out of `sweep --help`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import dspy

from dspy_sweeps.errors import SweepError

MARK = "dspy_sweeps:composite"  # never a DSPy state key: those are attribute paths
REDUCERS: dict[str, Callable] = {"majority": dspy.majority}
_BUILDING = threading.Lock()  # module-level: a program holding a lock could not be pickled by mlflow.dspy


class EnsembleProgram(dspy.Module):
    """The members combined by DSPy's Ensemble: each answers, `reduce` picks the answer."""

    def __init__(self, members: list[dspy.Module], reduce: str = "majority") -> None:
        super().__init__()
        self.reduce = reduce
        self.ensemble = dspy.Ensemble(reduce_fn=REDUCERS[reduce]).compile(members)

    def forward(self, **inputs: Any) -> Any:
        return self.ensemble(**inputs)

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        members = [m.dump_state(json_mode) for m in self.ensemble.programs]
        return {MARK: {"kind": "ensemble", "reduce": self.reduce, "members": members}}


class KNNProgram(dspy.Module):
    """KNNFewShot's compiled program and what rebuilds it: at every call the k nearest train
    examples (by the embedder) are bootstrapped into demos by the student, as DSPy does."""

    def __init__(
        self,
        program: dspy.Module,
        *,
        k: int,
        trainset: list[dict[str, Any]],
        inputs: list[str],
        settings: dict[str, Any],
        metric: str,
        embedder: Any = None,
    ) -> None:
        super().__init__()
        self.program = program
        self.spec = SimpleNamespace(k=k, trainset=trainset, inputs=inputs, settings=settings, metric=metric)
        # Not a Module attribute, so DSPy does not walk it as a second copy of the predictors.
        self.built = SimpleNamespace(program=None, embedder=embedder)

    def forward(self, **inputs: Any) -> Any:
        lm = next((p.lm for p in self.program.predictors() if p.lm is not None), None)
        with dspy.context(lm=lm) if lm is not None else contextlib.nullcontext():
            return self._knn_program()(**inputs)

    def _knn_program(self) -> dspy.Module:
        with _BUILDING:
            if self.built.program is None:
                self.built.program = self._compile()
            return self.built.program

    def _compile(self) -> dspy.Module:
        from dspy_sweeps.spec.imports import load_object

        if self.built.embedder is None:
            raise SweepError("a KNNFewShot program needs an embedder: load it with the embedder of your configuration")
        examples = [dspy.Example(**row).with_inputs(*self.spec.inputs) for row in self.spec.trainset]
        metric = load_object(self.spec.metric, "metric")
        optimizer = dspy.KNNFewShot(self.spec.k, examples, self.built.embedder, metric=metric, **self.spec.settings)
        return optimizer.compile(self.program)

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        spec = {"kind": "knn_fewshot", **vars(self.spec)}
        return {MARK: spec, "program": self.program.dump_state(json_mode)}


def knn_program(
    compiled: Any, optimizer: Any, student: dspy.Module, settings: dict[str, Any], metric: str
) -> KNNProgram:
    """Wrap what KNNFewShot.compile returned with what rebuilds it (its k and train split)."""
    knn = optimizer.KNN
    trainset = [dict(example.items()) for example in knn.trainset]
    inputs = sorted(knn.trainset[0].inputs().keys()) if knn.trainset else []
    rest = {k: v for k, v in settings.items() if k != "k"}
    program = KNNProgram(
        student, k=knn.k, trainset=trainset, inputs=inputs, settings=rest, metric=metric, embedder=knn.embedding
    )
    program.built.program = compiled
    return program


def restore(build: Callable[[], dspy.Module], state: dict[str, Any], embedder: Any = None) -> dspy.Module:
    """A program from its saved state; `build` makes a fresh program of the sweep (DSPy's load_state: no pickle)."""
    spec = state.get(MARK) if isinstance(state, dict) else None
    if spec is None:
        program = build()
        program.load_state(state)
        return program
    if spec["kind"] == "ensemble":
        return EnsembleProgram([restore(build, m, embedder) for m in spec["members"]], spec["reduce"])
    fields = {k: v for k, v in spec.items() if k != "kind"}
    return KNNProgram(restore(build, state["program"], embedder), embedder=embedder, **fields)


def map_states(state: dict[str, Any], fn: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """`fn` applied to every plain DSPy state inside a saved program (itself, or its members)."""
    spec = state.get(MARK)
    if spec is None:
        return fn(state)
    if spec["kind"] == "ensemble":
        return {MARK: {**spec, "members": [map_states(m, fn) for m in spec["members"]]}}
    return {**state, "program": map_states(state["program"], fn)}


def needs_embedder(state: dict[str, Any]) -> bool:
    spec = state.get(MARK)
    if spec is None:
        return False
    if spec["kind"] == "ensemble":
        return any(needs_embedder(m) for m in spec["members"])
    return True
