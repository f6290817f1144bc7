"""Unit tests for trial storage (run/storage.py) on a local path: what one node pushed, another
node's working folder restores; the attempts counter; a fresh run's clean start.

Run: ``.venv/bin/python -m pytest tests/unit/test_storage.py -q``. The s3:// case is in
tests/integration/test_s3.py (moto's server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspy_sweeps.errors import SweepError
from dspy_sweeps.run.storage import TrialFolder, check_storage, clear_sweep


def roundtrip(uri: str, tmp_path: Path) -> None:
    """One trial's life over two nodes (two working roots that share nothing but `uri`)."""
    first = TrialFolder(uri, "sw", "gepa-1", tmp_path / "node-a")
    work = first.restore()
    assert list(work.iterdir()) == []
    assert first.next_attempt() == 1
    (work / "gepa_state.bin").write_bytes(b"iteration 1")
    (work / "gepa_state.bin.tmp").write_bytes(b"half-written")  # never pushed: GEPA renames it when done
    (work / "generated" / "task_0").mkdir(parents=True)
    (work / "generated" / "task_0" / "out.json").write_text("{}")
    first.push()
    (work / "gepa_state.bin").write_bytes(b"iteration 2")
    first.push(wait=False)

    second = TrialFolder(uri, "sw", "gepa-1", tmp_path / "node-b")  # the node-a host died: retried elsewhere
    again = second.restore()
    files = sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    assert files == ["attempts", "generated/task_0/out.json", "gepa_state.bin"]
    assert (again / "gepa_state.bin").read_bytes() == b"iteration 2"
    assert second.next_attempt() == 2
    second.finish('{"demos": []}', [1.0, None], [0.0])
    assert not again.exists()  # the working folder goes; storage keeps everything
    assert second.read("attempts") == b"2"
    assert second.read("program.json") == b'{"demos": []}'
    assert second.read("scores.json") == b'{"val": [1.0, null], "test": [0.0]}'

    clear_sweep(uri, "sw")  # a fresh run
    fresh = TrialFolder(uri, "sw", "gepa-1", tmp_path / "node-c")
    assert list(fresh.restore().iterdir()) == [] and fresh.next_attempt() == 1


def test_a_trial_folder_survives_its_node_on_a_local_path(tmp_path: Path) -> None:
    roundtrip(str(tmp_path / "storage"), tmp_path)
    assert (tmp_path / "storage" / "trials" / "sw" / "gepa-1" / "attempts").read_text() == "1"


def test_a_restore_drops_what_an_earlier_attempt_left_on_the_node(tmp_path: Path) -> None:
    uri = str(tmp_path / "storage")
    folder = TrialFolder(uri, "sw", "t", tmp_path / "node")
    folder.restore()
    (folder.local / "stale.bin").write_text("not pushed")
    assert not (folder.restore() / "stale.bin").exists()


def test_an_unusable_storage_uri_is_one_line_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SweepError, match=r"^storage: cannot use .*file/below"):
        check_storage(str(tmp_path / "file" / "below"))
    with pytest.raises(SweepError, match=r"^storage: cannot use nope://x"):
        check_storage("nope://x")
