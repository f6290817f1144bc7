"""The promotion gate and the way back: MLflow Model Registry in, `pull`/`load` out.

A sweep's best trial (by validation score; ties: fewer LM calls) takes the alias only if, on
the same test examples as the current champion, the lower end of its gain's interval (a paired
bootstrap, track/gate.py) is above `min_gain`. Simulated and real programs are never compared:
a registered model holds one kind. Programs come back as DSPy JSON state: nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dspy_sweeps.errors import SweepError, first_line
from dspy_sweeps.lm.build import portable_lm
from dspy_sweeps.spec.schema import ModelSpec, Promote
from dspy_sweeps.track.gate import Interval, paired_gain
from dspy_sweeps.track.results import TrialRecord

CHALLENGER = "challenger"
SCORES_ARTIFACT = "scores/test_scores.json"  # in the trial's MLflow run: the champion's per-example test scores

Rescore = Callable[[str], list[float | None]]  # program JSON -> per-example scores on this sweep's test split


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    version: str | None = None
    alias: str | None = None
    simulated: bool = False  # the challenger's scores came from the simulated endpoint
    gain: Interval | None = None  # test-score gain over the champion, on the same examples


def save_decision(results: Path, decision: Decision) -> None:
    """Beside the sweep's results file, so `sweep results` repeats the promotion line."""
    results.with_suffix(".decision.json").write_text(json.dumps(asdict(decision)))


def saved_decision(results: Path) -> Decision | None:
    path = results.with_suffix(".decision.json")
    if not path.is_file():
        return None
    fields = json.loads(path.read_text())
    gain = fields.pop("gain")
    return Decision(**fields, gain=Interval(**gain) if gain else None)


def best(records: list[TrialRecord]) -> TrialRecord | None:
    """The promotion candidate. A pruned trial never is: the pruner stopped it as a loser at its
    spend, its val score is its best candidate's during a search cut short, and it has no test score."""
    finished = [r for r in records if r.status == "ok" and r.val_score is not None]
    return min(finished, key=lambda r: (-r.val_score, r.lm_calls, r.trial_id), default=None)


def program_sha(program_json: str) -> str:
    return hashlib.sha256(program_json.encode()).hexdigest()[:16]


def promote(
    promote: Promote,
    winner: TrialRecord,
    run_id: str,
    program: Any,
    tracking_uri: str,
    rescore: Rescore,
    baseline: Callable[[], list[float | None]] | None = None,
) -> Decision:
    """Register the winner and move the alias if its gain over the champion is above `min_gain` with
    `confidence`; `rescore` scores a program on this sweep's test split when its scores are not known.

    With no champion yet, `baseline()` (the per-example test scores of the winner's student without
    compiling; a sweep always passes it) stands in for it: the first version takes the alias only
    if it beats the uncompiled program by as much."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    program_json = Path(winner.program_path).read_text()
    sha, simulated = program_sha(program_json), winner.simulated
    champion = _version_by_alias(client, promote.model, promote.alias)
    if champion is not None and version_simulated(champion) != simulated:
        return Decision(False, _mixed(promote, champion, simulated), simulated=simulated)
    if champion is not None and champion.tags.get("program_sha") == sha:
        return Decision(
            False,
            f"{winner.trial_id} is the same program as {promote.alias} v{champion.version}; nothing registered",
            simulated=simulated,
        )
    scores = winner.test_scores or rescore(program_json)  # a record from before per-example scores were kept
    gain = None
    if champion is None and baseline is None:
        passed, why = True, f"no {promote.alias} yet: {winner.trial_id} is the first"
    elif champion is None:
        gain = paired_gain(scores, baseline(), promote.confidence)
        passed, why = _judge(promote, winner, None, gain)
    else:
        held = _champion_test_scores(client, champion, winner.data_fingerprint, len(scores), rescore)
        gain = paired_gain(scores, held, promote.confidence)
        passed, why = _judge(promote, winner, champion, gain)
    registration = Registration(winner, run_id, sha, scores, gain)
    if not passed:
        return _register_challenger(client, promote.model, registration, program, tracking_uri, why)
    version = _register(promote.model, registration, program, tracking_uri, gate="passed")
    holder = _settle(client, promote.model, promote.alias, winner.data_fingerprint, simulated)
    if holder != version:
        return Decision(
            False,
            f"{why}, but v{holder}, promoted meanwhile, scores higher; v{version} registered without the alias",
            version,
            simulated=simulated,
            gain=gain,
        )
    _register_prompts(client, promote, program_json, version, registration)
    return Decision(True, why, version, promote.alias, simulated, gain)


def _register_prompts(client: Any, promote: Promote, program_json: str, version: str, reg: Registration) -> None:
    from dspy_sweeps.track.prompts import register_prompts

    tags = {"sweep": reg.winner.sweep, "trial": reg.winner.trial_id, "program_sha": reg.sha}
    register_prompts(
        client, promote.model, promote.alias, program_json, version, logged_model_id(client, reg.run_id), tags
    )


def logged_model_id(client: Any, run_id: str) -> str | None:
    """The trial's LoggedModel (`track/mlflow_runs.py`); None for a run tracked before there was one."""
    from dspy_sweeps.track.mlflow_runs import MODEL_ID_TAG

    return client.get_run(run_id).data.tags.get(MODEL_ID_TAG)


def _judge(promote: Promote, winner: TrialRecord, champion: Any, gain: Interval | None) -> tuple[bool, str]:
    """Whether the gain clears the gate, and the reason in words; no champion: the gain is over the
    uncompiled baseline of the winner's student."""
    versus = f"{promote.alias} v{champion.version}" if champion is not None else f"the uncompiled {winner.student}"
    if gain is None:
        return False, f"{winner.trial_id} and {versus} share no scored test example, so their gain is unknown"
    measured = f"gain {gain.signed()} over {versus} on {gain.n} test examples ({gain.confidence:.0%} interval)"
    if champion is None:
        measured = f"no {promote.alias} yet: {measured}"
    if gain.low > promote.min_gain:
        return True, f"{measured}: above min_gain {promote.min_gain}"
    if gain.value > promote.min_gain:
        return False, f"{measured}: the gain is within noise (min_gain {promote.min_gain})"
    return False, f"{measured}: no gain above min_gain {promote.min_gain}"


def _mixed(promote: Promote, champion: Any, simulated: bool) -> str:
    """One line refusing to compare a simulated score with a real one, naming the remedy."""
    held, ours = ("SIMULATED", "real") if version_simulated(champion) else ("real", "SIMULATED")
    remedy = f"{promote.model}-sim" if simulated else f"{promote.model}-real"
    return (
        f"{promote.model}@{promote.alias} v{champion.version} is a {held} model's program and this sweep's scores "
        f"are {ours}; they are never compared: promote to another registered model (promote.model: {remedy})"
    )


def version_simulated(version: Any) -> bool:
    """A registered version's scores were simulated (versions from before the tag: a student whose
    local endpoint plugin declares its answers simulated)."""
    from dspy_sweeps.lm.endpoints import simulated

    tag = version.tags.get("simulated")
    return (
        tag == "true"
        if tag is not None
        else simulated(ModelSpec(name="student", model=version.tags.get("student", "")))
    )


@dataclass(frozen=True)
class Registration:
    """What a registered version records about the trial it comes from."""

    winner: TrialRecord
    run_id: str
    sha: str
    test_scores: list[float | None]
    gain: Interval | None


def _register_challenger(
    client: Any, name: str, registration: Registration, program: Any, uri: str, why: str
) -> Decision:
    simulated, gain = registration.winner.simulated, registration.gain
    challenger = _version_by_alias(client, name, CHALLENGER)
    if challenger is not None and challenger.tags.get("program_sha") == registration.sha:
        return Decision(
            False, f"{why}; already registered as {CHALLENGER} v{challenger.version}", simulated=simulated, gain=gain
        )
    version = _register(name, registration, program, uri, gate=CHALLENGER)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return Decision(False, f"{why}; registered as {CHALLENGER} v{version}", version, CHALLENGER, simulated, gain)


def _settle(client: Any, name: str, alias: str, fingerprint: str, simulated: bool) -> str:
    """Compare-and-set for concurrent promotions: of the versions of this kind (simulated or real)
    that passed the gate on this data, the best test score (ties: the earlier version) holds the
    alias. Every promoting sweep settles after registering, so the last one to settle sees all of
    them: the better program wins, not the last writer."""
    passed = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if v.tags.get("gate") == "passed"
        and v.tags.get("data_fingerprint") == fingerprint
        and version_simulated(v) == simulated
    ]
    best = max(passed, key=lambda v: (float(v.tags["test_score"]), -int(v.version)))
    current = _version_by_alias(client, name, alias)
    if current is None or str(current.version) != str(best.version):
        client.set_registered_model_alias(name, alias, best.version)
    return str(best.version)


def _version_by_alias(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _champion_test_scores(
    client: Any, champion: Any, fingerprint: str, examples: int, rescore: Rescore
) -> list[float | None]:
    """The champion's per-example scores on the winner's test examples: those it was registered with
    when it was scored on the same data, else (other data, or none kept) its program re-scored."""
    with tempfile.TemporaryDirectory() as tmp:
        if champion.tags.get("data_fingerprint") == fingerprint:
            kept = _kept_scores(client, champion.run_id, Path(tmp))
            if kept is not None and len(kept) == examples:
                return kept
        program_json = (_download(client, champion.run_id, Path(tmp)) / "program.json").read_text()
    return rescore(program_json)


def _kept_scores(client: Any, run_id: str, tmp: Path) -> list[float | None] | None:
    from mlflow.exceptions import MlflowException

    try:
        path = client.download_artifacts(run_id, SCORES_ARTIFACT, str(tmp))
    except (MlflowException, OSError):  # registered before per-example scores were kept
        return None
    return json.loads(Path(path).read_text())["test_scores"]


def _register(name: str, registration: Registration, program: Any, uri: str, gate: str) -> str:
    """Save the program with `mlflow.dspy` into the trial's LoggedModel (so `mlflow.dspy.load_model`
    works), with its per-example test scores in the run (the next challenger is compared on them),
    and register the LoggedModel (`models:/m-...`, so the version's `model_id` leads to the trial,
    its data and metrics), through a client for `uri`: MLflow's global URI is left alone. A run
    tracked before trials had LoggedModels registers its run's `model` folder instead.

    Idempotent: a promotion retried after a tracking-server outage finds the version it
    already registered (by its promotion id) instead of creating a second one."""
    import dspy
    import mlflow.dspy
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client, run_id, winner = MlflowClient(uri), registration.run_id, registration.winner
    promotion_id = hashlib.sha256(f"{run_id}:{registration.sha}:{gate}".encode()).hexdigest()[:16]
    for existing in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if existing.tags.get("promotion_id") == promotion_id:
            return str(existing.version)
    # Its pickle warning is about `mlflow.dspy.load_model`; `sweep pull`/`load` read the JSON state instead.
    logging.getLogger("mlflow.dspy.save").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        try:  # the program's metadata names its student; the artifacts go up before any version exists
            meta = json.loads((_download(client, run_id, Path(tmp) / "program") / "metadata.json").read_text())
        except (MlflowException, OSError) as exc:
            raise _store_refused(exc) from None
        # mlflow.dspy saves dspy.settings with the model, so `mlflow models serve` calls the student the
        # sweep compiled for: its model and endpoint, never a key (see `portable_lm`).
        with dspy.context(lm=portable_lm(ModelSpec(**meta["student"]))):
            mlflow.dspy.save_model(program, f"{tmp}/model", code_paths=project_code(meta["program"]))
        model_id = logged_model_id(client, run_id)
        try:
            if model_id:
                client.log_model_artifacts(model_id, f"{tmp}/model")
            else:
                client.log_artifacts(run_id, f"{tmp}/model", "model")
            scores = {"data_fingerprint": winner.data_fingerprint, "test_scores": registration.test_scores}
            client.log_dict(run_id, scores, SCORES_ARTIFACT)
        except (MlflowException, OSError) as exc:
            raise _store_refused(exc) from None
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another sweep registered it first: fine
            raise
    tags = {**_version_tags(registration, gate, promotion_id), **({"model_id": model_id} if model_id else {})}
    source = _source(client, uri, run_id, model_id)
    version = str(client.create_model_version(name, source, run_id=run_id, tags=tags, model_id=model_id).version)
    if model_id:
        _link_version(client, model_id, name, version)
    return version


def _source(client: Any, uri: str, run_id: str, model_id: str | None) -> str:
    """`models:/m-...` (the LoggedModel), which an `mlflow server` resolves itself. A local store's
    registry resolves such a source through MLflow's process-wide tracking URI (MLflow 3.17,
    `SqlAlchemyStore.create_model_version`), which the platform never sets: there the source is the
    LoggedModel's artifact location, the same files."""
    if not model_id:
        return f"{client.get_run(run_id).info.artifact_uri}/model"
    if uri.startswith(("http://", "https://")):
        return f"models:/{model_id}"
    return client.get_logged_model(model_id).artifact_location


def _link_version(client: Any, model_id: str, name: str, version: str) -> None:
    """The LoggedModel lists its registered versions, as `mlflow.register_model` records them (the
    OSS registry keeps no `model_id` on a version; the UI and `search_logged_models` read this tag)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if not any(v.get("name") == name and str(v.get("version")) == version for v in listed):  # a server adds it
        listed.append({"name": name, "version": int(version)})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})


def _store_refused(exc: Exception) -> SweepError:
    return SweepError(
        f"promote: the artifact store refused the program ({type(exc).__name__}: {first_line(exc)}); nothing was "
        "registered: fix the store, then run again with --resume"
    )


def project_code(program_path: str) -> list[str] | None:
    """The program's top-level package when it lives in the project (`pipelines/`), not in site-packages:
    MLflow copies it beside the model, so the pickled program imports wherever the model is served."""
    import importlib.util
    import os

    spec = importlib.util.find_spec(program_path.split(":")[0].split(".")[0])
    folders = list(spec.submodule_search_locations or []) if spec else []
    return [folders[0]] if folders and Path(folders[0]).resolve().is_relative_to(Path(os.getcwd()).resolve()) else None


def _version_tags(registration: Registration, gate: str, promotion_id: str) -> dict[str, str]:
    from importlib.metadata import version

    from dspy_sweeps.track.figures import simulation_tags

    winner, gain = registration.winner, registration.gain
    gained = {"gain": gain.signed(), "gain_low": str(gain.low), "gain_confidence": str(gain.confidence)} if gain else {}
    return {
        "sweep": winner.sweep,
        "trial": winner.trial_id,
        "optimizer": winner.kind,
        "settings": winner.settings,
        "student": winner.student_model or winner.student,
        "teacher": winner.teacher_model or winner.teacher or "",
        "student_name": winner.student,
        "teacher_name": winner.teacher or "",
        **simulation_tags(winner),
        "val_score": str(winner.val_score),
        "test_score": str(winner.test_score),
        **gained,
        "data_fingerprint": winner.data_fingerprint,
        "program_sha": registration.sha,
        "versions": json.dumps({p: version(p) for p in ("dspy", "dspy-sweeps", "mlflow")}),
        "gate": gate,
        "promotion_id": promotion_id,
    }


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`name@alias` or `name/version` → (name, alias, version)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, None, version
    return ref, "champion", None


def pull(ref: str, out: Path, tracking_uri: str) -> Path:
    """Write the registered program (DSPy JSON state + metadata.json) to `out`; returns `out`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    name, alias, version = parse_ref(ref)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        raise SweepError(f"{ref}: no such registered model version at {tracking_uri}") from None
    out.mkdir(parents=True, exist_ok=True)
    _download(client, mv.run_id, out)
    meta = json.loads((out / "metadata.json").read_text())
    meta["registry"] = {"name": name, "version": mv.version, "alias": alias, "tracking_uri": tracking_uri}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))
    return out


def _download(client: Any, run_id: str, out: Path) -> Path:
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, "program", tmp))
        out.mkdir(parents=True, exist_ok=True)
        for name in ("program.json", "metadata.json"):
            shutil.copyfile(local / name, out / name)
    return out


def load_pulled(
    folder: Path,
    *,
    model: str | None = None,
    api_base: str | None = None,
    api_key_env: str | None = None,
    embedder: ModelSpec | None = None,
) -> Any:
    """A ready module from a pulled folder. The student is the one it was compiled for unless
    overridden; a student on a local endpoint plugin (`sim/...`) needs the `api_base` of one running."""
    from dspy_sweeps.lm.build import build_lm

    program, student = restore_pulled(
        folder, model=model, api_base=api_base, api_key_env=api_key_env, embedder=embedder
    )
    program.set_lm(build_lm(student))
    return program


def restore_pulled(
    folder: Path,
    *,
    model: str | None = None,
    api_base: str | None = None,
    api_key_env: str | None = None,
    embedder: ModelSpec | None = None,
) -> tuple[Any, ModelSpec]:
    """The program of a pulled folder with no LM of its own, and the resolved student spec to build
    one from. A program that finds neighbours (KNNFewShot) gets its embedder from `embedder`, else
    from the sweep's configuration in metadata.json (model and key variable, resolved here like the
    student's): never from the saved program."""
    from dspy_sweeps.lm.build import build_embedder
    from dspy_sweeps.lm.endpoints import plugin_name
    from dspy_sweeps.spec.composite import map_states, needs_embedder
    from dspy_sweeps.spec.imports import restore_program

    meta = json.loads((folder / "metadata.json").read_text())
    student = ModelSpec(**meta["student"])
    student = student.model_copy(update={k: v for k, v in {"model": model, "api_key_env": api_key_env}.items() if v})
    student = _at(student, api_base)
    state = map_states(json.loads((folder / "program.json").read_text()), without_lms)
    vectors = None
    if needs_embedder(state):
        spec = embedder or (ModelSpec(**meta["embedder"]) if meta.get("embedder") else None)
        if spec is None:
            raise SweepError(f"{folder}: the program finds neighbours with an embedder; give one (embedder=...)")
        vectors = build_embedder(_at(spec, api_base if plugin_name(spec) is not None else None))
    return restore_program(meta["program"], json.dumps(state), vectors), student


def _at(spec: ModelSpec, api_base: str | None) -> ModelSpec:
    """A local endpoint plugin's model at that endpoint's `api_base`; any other model moved to `api_base`
    if given."""
    from dspy_sweeps.lm.endpoints import plugin_name, resolve

    if (name := plugin_name(spec)) is not None:
        return resolve(spec, {name: api_base} if api_base else {})
    return spec.model_copy(update={"api_base": api_base}) if api_base else spec


def without_lms(state: dict[str, Any]) -> dict[str, Any]:
    """A registry is not trusted to choose endpoints: clear any LM (class, model, api_base) a
    predictor's saved state names, so the student always comes from the caller's configuration."""
    return {
        name: {**part, "lm": None} if isinstance(part, dict) and "lm" in part else part for name, part in state.items()
    }


def load(
    ref: str,
    *,
    model: str | None = None,
    api_base: str | None = None,
    api_key_env: str | None = None,
    tracking_uri: str | None = None,
    embedder: ModelSpec | None = None,
) -> Any:
    """`dspy_sweeps.load("demo@champion")`: the registered program, ready to call."""
    from dspy_sweeps.state import State
    from dspy_sweeps.track.uri import tracking_uri as default_uri

    uri = tracking_uri or default_uri(None, State.at())
    with tempfile.TemporaryDirectory() as tmp:
        folder = pull(ref, Path(tmp), uri)
        return load_pulled(folder, model=model, api_base=api_base, api_key_env=api_key_env, embedder=embedder)
