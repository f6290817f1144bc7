"""Unit tests for the corpus builder scripts under ``datasets/``.

Run: ``python -m pytest tests/unit/test_datasets.py -q``. The builders are
scripts, so they run as subprocesses. The GSM8K and Banking77 tests read the
shared local mirror next to the repository (``../shared/datasets``); the
download path is exercised against a local HTTP server serving raw files
rebuilt from that mirror, so no internet is needed.
"""

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

REPO = Path(__file__).resolve().parents[2]
MIRROR = REPO.parent / "shared" / "datasets"
DEMO_BUILD = REPO / "datasets" / "demo" / "build.py"
CORPUS_BUILD = REPO / "datasets" / "build.py"
EXPECTED_ROWS = {"gsm8k": {"train": 7473, "test": 1319}, "banking77": {"train": 10003, "test": 3080}}


def run(script: Path, *args: str, mirror: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a builder script with the mirror variable set to `mirror` (or unset)."""
    env = {key: value for key, value in os.environ.items() if key != "DSPY_SWEEPS_DATA_MIRROR"}
    if mirror is not None:
        env["DSPY_SWEEPS_DATA_MIRROR"] = str(mirror)
    # The download test serves files on loopback; keep any proxy out of the way.
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def mirror() -> Path:
    if not MIRROR.is_dir():
        pytest.fail(
            f"shared dataset mirror not found at {MIRROR}; these tests need the local copy of gsm8k and banking77"
        )
    return MIRROR


def build_demo(out: Path, seed: int) -> pl.DataFrame:
    result = run(DEMO_BUILD, "--out", str(out), "--seed", str(seed))
    assert result.returncode == 0, result.stderr
    return pl.read_parquet(out)


def test_demo_builder_is_deterministic(tmp_path: Path) -> None:
    first = build_demo(tmp_path / "a.parquet", seed=0)
    assert_frame_equal(first, build_demo(tmp_path / "b.parquet", seed=0))
    assert not first.equals(build_demo(tmp_path / "c.parquet", seed=1))
    assert first.height == 400
    assert set(first["topic"]) == {"addition", "subtraction", "multiplication", "two_step"}
    assert first["id"].to_list() == list(range(400))
    assert first["answer"].str.contains(r"^\d+$").all()


def test_committed_demo_corpus_matches_a_fresh_build(tmp_path: Path) -> None:
    committed = pl.read_parquet(REPO / "datasets" / "demo" / "arith.parquet")
    assert_frame_equal(committed, build_demo(tmp_path / "fresh.parquet", seed=0))


@pytest.mark.parametrize("name", ["gsm8k", "banking77"])
def test_corpus_builder_copies_verified_mirror_files(name: str, mirror: Path, tmp_path: Path) -> None:
    result = run(CORPUS_BUILD, name, "--out", str(tmp_path), mirror=mirror)
    assert result.returncode == 0, result.stderr
    for split, rows in EXPECTED_ROWS[name].items():
        assert pl.read_parquet(tmp_path / f"{split}.parquet").height == rows
    assert (tmp_path / "_SUCCESS").exists()

    rerun = run(CORPUS_BUILD, name, "--out", str(tmp_path), mirror=mirror)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipping" in rerun.stdout


def test_corpus_builder_rejects_a_wrong_checksum(mirror: Path, tmp_path: Path) -> None:
    manifest = yaml.safe_load((REPO / "datasets" / "gsm8k" / "manifest.yaml").read_text())
    manifest["outputs"]["test.parquet"]["sha256"] = "0" * 64
    bad_manifest = tmp_path / "manifest.yaml"
    bad_manifest.write_text(yaml.safe_dump(manifest, sort_keys=False))
    out = tmp_path / "out"

    result = run(CORPUS_BUILD, "gsm8k", "--out", str(out), "--manifest", str(bad_manifest), mirror=mirror)

    assert result.returncode != 0
    assert "sha256 mismatch" in result.stderr
    assert str(mirror / "gsm8k" / "test.parquet") in result.stderr
    assert not (out / "test.parquet").exists()
    assert not (out / "_SUCCESS").exists()


def write_raw_files(name: str, mirror: Path, folder: Path) -> None:
    """Recreate upstream-format raw files from the mirror (GSM8K loses only its commas)."""
    for split in ("train", "test"):
        frame = pl.read_parquet(mirror / name / f"{split}.parquet")
        if name == "gsm8k":
            answer = pl.concat_str("rationale", pl.lit("\n#### "), "final_answer").alias("answer")
            frame.select("question", answer).write_ndjson(folder / f"{split}.jsonl")
        else:
            frame.select("text", pl.col("intent").alias("category")).write_csv(folder / f"{split}.csv")
    if name == "banking77":
        (folder / "categories.json").write_text((mirror / name / "categories.json").read_text())


@pytest.fixture
def raw_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serve a temp folder over loopback HTTP; yields its base URL and the folder."""
    folder = tmp_path / "raw"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", folder
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["gsm8k", "banking77"])
def test_corpus_builder_converts_downloads_to_mirror_columns(
    name: str, mirror: Path, tmp_path: Path, raw_server: tuple[str, Path]
) -> None:
    base_url, folder = raw_server
    write_raw_files(name, mirror, folder)
    manifest = yaml.safe_load((REPO / "datasets" / name / "manifest.yaml").read_text())
    manifest["sources"] = {key: f"{base_url}/{Path(url).name}" for key, url in manifest["sources"].items()}
    local_manifest = tmp_path / "manifest.yaml"
    local_manifest.write_text(yaml.safe_dump(manifest, sort_keys=False))
    out = tmp_path / "out"

    result = run(CORPUS_BUILD, name, "--out", str(out), "--manifest", str(local_manifest))

    assert result.returncode == 0, result.stderr
    for split in ("train", "test"):
        assert_frame_equal(
            pl.read_parquet(out / f"{split}.parquet"), pl.read_parquet(mirror / name / f"{split}.parquet")
        )
    assert (out / "_SUCCESS").exists()
