"""The `sweep` command line: validate, plan, run, results, pull, ask, serve; submit, status, logs, stop.

Only the standard library and Typer load at import, so `sweep --help` answers at once;
each command imports what it needs. Bad input exits 2 with one line on stderr.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dspy_sweeps.errors import SweepError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=__doc__.splitlines()[0],
    rich_markup_mode=None,  # plain help: Rich's help renderer alone costs ~0.3 s of start-up
)

SweepFile = Annotated[Path, typer.Argument(help="Sweep file, e.g. sweeps/demo.yaml")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Dotted override KEY=VALUE (repeatable)")]
StateDir = Annotated[Path | None, typer.Option(help="State directory (default: $DSPY_SWEEPS_STATE or ./.sweeps)")]
Storage = Annotated[
    str | None, typer.Option(help="Trial checkpoints, reached by every node: a path or s3:// URI (default: state dir)")
]
TrackingUri = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: the state dir's SQLite file)")]


def exits_on_bad_input(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SweepError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def _library_logs(state_dir: Path | None) -> None:
    """MLflow's, Alembic's and DSPy's log lines ("Creating initial MLflow database tables", "LM
    response was truncated") and MLflow's download bars are not the user's business: the lines go to
    `<state>/logs/libraries.log`. DSPy adds a console handler of its own when imported: see
    `_dspy_console_off`."""
    from dspy_sweeps.state import State

    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow adds no stderr handler of its own
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    folder = State.at(state_dir).root / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder / "libraries.log")
    except OSError:  # a state directory that cannot be written is reported where it is used
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("mlflow", "alembic", "dspy"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _dspy_console_off() -> None:
    """Take DSPy's console handler (named "dspy_handler", put on its logger when DSPy is imported) off
    that logger, leaving `_library_logs`' file. Imports DSPy: call it once DSPy may be imported, after
    DSPY_CACHEDIR is set, since DSPy reads its cache folder at import."""
    import dspy as _  # noqa: F401

    logger = logging.getLogger("dspy")
    for console in [h for h in logger.handlers if h.get_name() == "dspy_handler"]:
        logger.removeHandler(console)


def _console():
    from rich.console import Console

    # Piped output (CI logs, `| tee`) gets wide tables instead of Rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 160)


def _prepare(path: Path, overrides: list[str] | None):
    from dotenv import load_dotenv

    from dspy_sweeps.spec.preflight import prepare
    from dspy_sweeps.spec.schema import load_sweep

    load_dotenv(".env", override=False)  # keys named by api_key_env may live in .env; the environment wins
    return prepare(load_sweep(path, overrides or []))


@app.command()
@exits_on_bad_input
def validate(sweep_file: SweepFile, set_: Overrides = None) -> None:
    """Check a sweep file against its data and code without starting Ray or calling an LM."""
    prepared = _prepare(sweep_file, set_)
    print(f"{sweep_file}: ok ({len(prepared.trials)} trials, about {prepared.estimated_calls:,} LM calls)")


@app.command()
@exits_on_bad_input
def plan(sweep_file: SweepFile, set_: Overrides = None) -> None:
    """Print the trials a sweep would run, with their estimated LM calls."""
    from dspy_sweeps.cli.tables import plan_table

    prepared = _prepare(sweep_file, set_)
    if prepared.sweep.search is not None:
        from dspy_sweeps.spec.search import space_lines

        print("\n".join(space_lines(prepared.sweep)))  # the space; the table previews its first trials
    _console().print(plan_table(prepared))


@app.command()
@exits_on_bad_input
def run(
    sweep_file: SweepFile,
    set_: Overrides = None,
    state_dir: StateDir = None,
    address: Annotated[str | None, typer.Option(help="Ray address to join (default: start a local Ray)")] = None,
    resume: Annotated[bool, typer.Option(help="Keep trials that already finished; run only the rest")] = False,
    rerun: Annotated[
        bool, typer.Option(help="Run every trial again, also those an earlier run finished unchanged")
    ] = False,
    storage: Storage = None,
) -> None:
    """Run every trial of a sweep in parallel on Ray, track them, and promote the winner.

    A trial an earlier run finished, unchanged since (same settings, models, data and code), is
    reused, not run: the LM cache would answer its every call the same."""
    from dspy_sweeps.cli.tables import decision_line, leaderboard_table
    from dspy_sweeps.jobs.secrets import load_job_secrets
    from dspy_sweeps.run.engine import run_sweep
    from dspy_sweeps.run.storage import check_storage, publish_results
    from dspy_sweeps.state import State
    from dspy_sweeps.track.registry import save_decision

    if resume and rerun:
        raise SweepError("--resume keeps the trials that finished and --rerun runs them again: give one of them")
    load_job_secrets()  # in a job from `sweep submit`: the secrets it was sent, before anything reads keys
    _library_logs(state_dir)
    # A library's log line that cannot be written (a full disk, a closed pipe) must not print a
    # traceback over the one-line error the sweep gives: Python's logging then drops it silently.
    logging.raiseExceptions = False
    console = _console()
    state = State.at(state_dir)
    # DSPy's own disk cache (a library's LM built outside the gateway would use it) stays in the state
    # directory: set before DSPy is first imported, and inherited by the trial hosts (run/runner.py).
    os.environ["DSPY_CACHEDIR"] = str(state.dspy_cache)
    prepared = _prepare(sweep_file, [*(set_ or []), *([f"storage={storage}"] if storage else [])])
    _dspy_console_off()  # the program's import above brought DSPy in
    console.print(
        f"[bold]{prepared.sweep.name}[/]: {len(prepared.trials)} trials, about {prepared.estimated_calls:,} LM calls"
    )
    results = state.results(prepared.sweep.name)
    if prepared.sweep.storage:
        check_storage(prepared.sweep.storage)  # before the results are published there, whatever happens
    try:
        outcome = run_sweep(prepared, state, address, console, resume=resume, rerun=rerun)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise SweepError(
            f"the state directory {state.root} is full ({exc.strerror}); free space, then run again with --resume"
        ) from None
    finally:
        if prepared.sweep.storage and results.is_file():  # read by `sweep results --storage` from anywhere
            publish_results(prepared.sweep.storage, [results, results.with_suffix(".decision.json")])
    console.print(leaderboard_table([r.__dict__ for r in outcome.records]))
    if outcome.decision is not None:
        console.print(decision_line(outcome.decision), soft_wrap=True)  # one line, however long
        save_decision(results, outcome.decision)
        if prepared.sweep.storage:
            publish_results(prepared.sweep.storage, [results.with_suffix(".decision.json")])
    if not any(r.status == "ok" for r in outcome.records):
        raise typer.Exit(1)


@app.command()
@exits_on_bad_input
def results(
    name: Annotated[str | None, typer.Argument(help="Sweep name (default: every sweep)")] = None,
    state_dir: StateDir = None,
    storage: Annotated[
        str | None, typer.Option(help="Read the results a sweep run with this storage published (e.g. a job's)")
    ] = None,
) -> None:
    """Print a sweep's leaderboard from its results file, and its last promotion decision."""
    import tempfile

    from dspy_sweeps.cli.tables import decision_line, leaderboard_table
    from dspy_sweeps.state import State
    from dspy_sweeps.track.registry import saved_decision
    from dspy_sweeps.track.results import leaderboard

    if storage:
        from dspy_sweeps.run.storage import fetch_results

        state_dir = fetch_results(storage, Path(tempfile.mkdtemp(prefix="sweep-results-")))
    state = State.at(state_dir)
    paths = [state.results(name)] if name else sorted((state.root / "results").glob("*.parquet"))
    if not paths or not paths[0].is_file():
        raise SweepError(f"no results for {name or 'any sweep'} under {state.root}")
    console = _console()
    for path in paths:
        console.print(leaderboard_table(leaderboard(path), title=path.stem))
        decision = saved_decision(path)
        if decision is not None:
            console.print(decision_line(decision), soft_wrap=True)


@app.command()
@exits_on_bad_input
def pull(
    ref: Annotated[str, typer.Argument(help="name@alias or name/version, e.g. demo@champion")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder to write program.json and metadata.json")],
    state_dir: StateDir = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Write a registered program as DSPy JSON state plus its metadata (never unpickles)."""
    from dspy_sweeps.state import State
    from dspy_sweeps.track.registry import pull as pull_program
    from dspy_sweeps.track.uri import tracking_uri as default_uri

    _library_logs(state_dir)
    folder = pull_program(ref, out, tracking_uri or default_uri(None, State.at(state_dir)))
    print(f"{ref} -> {folder}/program.json, {folder}/metadata.json")


@app.command()
@exits_on_bad_input
def ask(
    ref: Annotated[str, typer.Argument(help="name@alias, e.g. demo@champion")],
    inputs: Annotated[list[str], typer.Argument(help="Input fields as key=value")],
    api_base: Annotated[
        str | None, typer.Option(help="Student endpoint (default: the one it was compiled for)")
    ] = None,
    state_dir: StateDir = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Load a registered program and ask it one question."""
    _library_logs(state_dir)
    _dspy_console_off()
    from dspy_sweeps.cli.ask import ask_program

    kwargs = dict(_key_value(item) for item in inputs)
    prediction = ask_program(ref, kwargs, api_base=api_base, state_dir=state_dir, tracking_uri=tracking_uri)
    for key, value in prediction.items():
        print(f"{key}: {value}")


@app.command()
@exits_on_bad_input
def serve(
    ref: Annotated[str, typer.Argument(help="name@alias (followed as it moves) or name/version, e.g. demo@champion")],
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (0: any free port, printed at start)")] = 8000,
    api_base: Annotated[
        str | None, typer.Option(help="Student endpoint (default: the one it was compiled for)")
    ] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Variable holding the student's key")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Predictions running at once; more wait")] = 32,
    poll_seconds: Annotated[float, typer.Option(min=0.05, help="How often the alias is checked")] = 10.0,
    lm_retries: Annotated[int, typer.Option(min=0, help="DSPy's retries of a failed LM call")] = 3,
    lm_timeout: Annotated[float | None, typer.Option(help="Seconds per LM call (default: the student's)")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run as a Ray Serve deployment")] = False,
    address: Annotated[str | None, typer.Option(help="With --ray: the cluster to join (default: local)")] = None,
    replicas: Annotated[int | None, typer.Option(min=1, help="With --ray: fixed replicas")] = None,
    min_replicas: Annotated[int | None, typer.Option(min=0, help="With --ray: autoscaling lower bound")] = None,
    max_replicas: Annotated[int | None, typer.Option(min=1, help="With --ray: autoscaling upper bound")] = None,
    state_dir: StateDir = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Serve a registered program over HTTP (/predict, /health, /ready, /metrics), following its alias."""
    from dspy_sweeps.cli.serve import serve_program
    from dspy_sweeps.serve.program import StudentConfig
    from dspy_sweeps.serve.ray_serve import Replicas

    student = StudentConfig(api_base=api_base, api_key_env=api_key_env, lm_retries=lm_retries, timeout_s=lm_timeout)
    serve_program(
        ref,
        host=host,
        port=port,
        student=student,
        concurrency=concurrency,
        poll_s=poll_seconds,
        state_dir=state_dir,
        tracking_uri=tracking_uri,
        ray=ray,
        address=address,
        replicas=Replicas(num=replicas, min=min_replicas, max=max_replicas),
    )


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise SweepError(f"input '{item}': expected key=value, e.g. question='What is 2+2?'")
    return key, value


# --- Ray Jobs: sweep submit / status / logs / stop ----------------------------------------
# A sweep runs on a cluster as a Ray job whose driver is `sweep run`; see dspy_sweeps/jobs/
# for what is shipped and how named secrets travel without entering the job's metadata.

JobAddress = Annotated[
    str | None,
    typer.Option("--address", help="Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"),
]
JobId = Annotated[str, typer.Argument(help="Job id printed by `sweep submit`")]


@app.command()
@exits_on_bad_input
def submit(
    sweep_file: SweepFile,
    address: JobAddress = None,
    set_: Overrides = None,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            "--secret",
            help="Environment variable passed to the job as a secret (repeatable); "
            "every api_key_env of the sweep and WANDB_API_KEY/MLFLOW_TRACKING_TOKEN go too when set",
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Stream the job's log; exit 0 if it succeeds, else 1")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Resume the sweep an earlier job of it left in its state dir")] = False,
    rerun: Annotated[bool, typer.Option(help="Run every trial again, also those an earlier job finished")] = False,
    storage: Storage = None,
    state_dir: Annotated[
        str | None, typer.Option(help="The job's state dir on the head (default: $DSPY_SWEEPS_STATE or ~/.dspy-sweeps)")
    ] = None,
) -> None:
    """Submit a sweep to a Ray cluster as a Ray job and print the job id."""
    from dspy_sweeps.jobs import client as jobs

    request = jobs.job_request(
        sweep_file, set_ or [], secret or [], state_dir=state_dir, storage=storage, resume=resume, rerun=rerun
    )
    job_id = jobs.submit(request, address)
    print(job_id)
    names = ", ".join(request.secret_names) or "none"
    print(f"submitted {request.sweep} as {job_id} (secrets passed by name: {names})", file=sys.stderr)
    for name in request.missing:
        print(f"note: {name} is not set here; the job needs it from the cluster's environment", file=sys.stderr)
    if follow:
        final = jobs.follow(job_id, address)
        print(f"job {job_id}: {final}", file=sys.stderr)
        raise typer.Exit(0 if final == "SUCCEEDED" else 1)
    print(f"follow it with: sweep logs {job_id} --follow", file=sys.stderr)


@app.command()
@exits_on_bad_input
def status(job_id: JobId, address: JobAddress = None) -> None:
    """Print a submitted sweep's job status (PENDING, RUNNING, ...) and, while it runs, its running trials."""
    from dspy_sweeps.jobs import client as jobs

    report = jobs.status(job_id, address)
    print(f"{report.job_id}: {report.status}" + (f" ({report.message})" if report.message else ""))
    snapshot = jobs.progress(job_id, address) if report.status != "PENDING" else None
    if snapshot is not None:
        from dspy_sweeps.cli.tables import progress_view

        _console().print(progress_view(snapshot, running=report.status == "RUNNING"))


@app.command()
@exits_on_bad_input
def logs(
    job_id: JobId,
    address: JobAddress = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep streaming until the job ends")] = False,
) -> None:
    """Print a submitted sweep's job log."""
    from dspy_sweeps.jobs import client as jobs

    if follow:
        jobs.follow(job_id, address)
    else:
        print(jobs.logs(job_id, address), end="")


@app.command()
@exits_on_bad_input
def stop(job_id: JobId, address: JobAddress = None) -> None:
    """Stop a submitted sweep's job."""
    from dspy_sweeps.jobs import client as jobs

    stopped = jobs.stop(job_id, address)
    print(f"{job_id}: " + ("stop requested" if stopped else "already finished"))


# --- end of Ray Jobs ------------------------------------------------------------------------


def main() -> None:
    """`sweep`: the command, then an exit without Python's teardown of every module loaded.

    That teardown frees what DSPy, LiteLLM, MLflow and W&B built, object by object: about 2 s on
    2 cores, after the command's work is done and its output printed (a quarter of a `sweep run`
    with nothing to run). What an exit is for still happens, in Python's order: other threads are waited
    for, exit handlers run (W&B's and Ray's shutdown, logging's flush, temporary folders' clean-up),
    and the output streams are flushed; then the process ends with the command's status."""
    import atexit
    import threading

    try:
        app()
        status: int | str | None = 0
    except SystemExit as exc:
        status = exc.code
    # Python's own first steps of an exit, private (there is no public way): pinned by tests/unit/test_cli_exit.py.
    threading._shutdown()  # thread pools told to stop, then every other non-daemon thread waited for
    atexit._run_exitfuncs()
    if isinstance(status, str):  # SystemExit("message"): printed, status 1, as Python does
        print(status, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status or 0)


if __name__ == "__main__":
    main()
