"""Every shipped sweep file validates, as `sweep validate` would check it, and says how it is run.

Run: ``python -m pytest tests/unit/test_sweep_files.py -q``. The real corpora are built
first from the local mirror (``../shared/datasets``) into the gitignored
``datasets/<name>/data/``; a completed build is kept, so later runs skip it.
"""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspy_sweeps.spec.preflight import prepare
from dspy_sweeps.spec.schema import load_sweep

REPO = Path(__file__).resolve().parents[2]
MIRROR = REPO.parent / "shared" / "datasets"
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
CORPORA = sorted(p.parent.name for p in (REPO / "datasets").glob("*/manifest.yaml"))


@pytest.fixture(scope="session")
def corpora() -> None:
    """Build every manifest-described corpus from the mirror, as `python datasets/build.py NAME` does."""
    if not MIRROR.is_dir():
        pytest.fail(
            f"shared dataset mirror not found at {MIRROR}; the sweep files read gsm8k and banking77 built from it"
        )
    env = {**os.environ, "DSPY_SWEEPS_DATA_MIRROR": str(MIRROR)}
    for name in CORPORA:
        cmd = [sys.executable, "datasets/build.py", name]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch, corpora: None) -> Iterator[None]:
    # Sweep files name their data relative to the repo root, where `sweep` is run from.
    monkeypatch.chdir(REPO)
    # Any value will do: validation checks that the teacher's key variable is set, never its value.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-dummy-for-validation")
    yield


def test_there_are_sweep_files() -> None:
    assert {p.name for p in SWEEPS} >= {"demo.yaml", "gsm8k.yaml", "banking77.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_validates(path: Path, in_repo: None) -> None:
    prepared = prepare(load_sweep(path.relative_to(REPO)))
    assert prepared.trials, f"{path.name}: the plan has no trials"
    assert prepared.trials[0].kind == "none", f"{path.name}: the baseline should come first"
    assert all(t.estimated_calls > 0 for t in prepared.trials)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_opens_with_its_run_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name}: the first line should be a comment with the command that runs it"
    assert f"sweep run sweeps/{path.name}" in first, (
        f"{path.name}: first line {first!r} lacks 'sweep run sweeps/{path.name}'"
    )


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_on_a_built_corpus_says_how_to_build_it(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    sources = load_sweep(path).data.sources
    for name in CORPORA:
        if any(s.startswith(f"datasets/{name}/data/") for s in sources):
            assert f"python datasets/build.py {name}" in first, f"{path.name}: first line should build {name} first"
