"""Read a W&B offline run (`run-*.wandb`) back in tests: history rows, summary, config, job type.

wandb 0.31 ships no Python reader for its offline files. They are a LevelDB-style log: a 7-byte
file header (`:W&B`, a 2-byte magic, a version byte), then 32 KiB blocks of chunks, each behind a
7-byte header (CRC-32, length as 2 bytes little-endian, type: FULL=1, FIRST=2, MIDDLE=3, LAST=4).
A block with fewer than 7 bytes left is padded. Chunks join into W&B's protobuf `Record`s.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B"
FILE_HEADER_SIZE = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineArtifact:
    """An artifact a run logged (`used`: with `use_artifact`, as an input) and its files' local copies."""

    name: str
    type: str
    digest: str
    aliases: list[str]
    used: bool
    files: dict[str, Path]  # path in the artifact -> the staged copy W&B uploads at `wandb sync`
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class OfflineRun:
    run_id: str
    name: str
    job_type: str
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    artifacts: list[OfflineArtifact] = field(default_factory=list)


def records(path: Path) -> list[Any]:
    """Every `Record` in the file, in order; a CRC mismatch or a chunk out of order fails loudly."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == HEADER, f"{path}: not a W&B offline run file"
    out, pending, pos = [], b"", FILE_HEADER_SIZE
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # the block's tail is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        payload = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == crc, f"{path}: bad CRC at byte {pos}"
        pos += CHUNK_HEADER + length
        if kind == FULL:
            out.append(pb.Record.FromString(payload))
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            out.append(pb.Record.FromString(pending + payload))
            pending = b""
        else:
            raise AssertionError(f"{path}: unknown chunk type {kind} at byte {pos}")
    return out


def _item(item: Any) -> tuple[str, Any]:
    key = item.key or "/".join(item.nested_key)
    return key, json.loads(item.value_json) if item.value_json else None


def read_run(run_dir: Path) -> OfflineRun:
    """An offline run folder (`offline-run-*`) as history rows, summary and config."""
    (path,) = run_dir.glob("run-*.wandb")
    run = OfflineRun(run_id="", name="", job_type="")
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.job_type = record.run.run_id, record.run.display_name, record.run.job_type
            run.config.update(_item(i) for i in record.run.config.update)
        elif kind == "config":
            run.config.update(_item(i) for i in record.config.update)
        elif kind == "history":
            run.history.append(dict(_item(i) for i in record.history.item))
        elif kind == "summary":
            run.summary.update(_item(i) for i in record.summary.update)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "artifact":
            a = record.artifact
            files = {e.path: Path(e.local_path) for e in a.manifest.contents}
            meta = json.loads(a.metadata) if a.metadata else {}
            run.artifacts.append(
                OfflineArtifact(a.name, a.type, a.digest, list(a.aliases), a.use_after_commit, files, meta)
            )
    return run


def read_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under a W&B dir (the folder holding `offline-run-*`), oldest first."""
    return [read_run(d) for d in sorted(wandb_dir.glob("offline-run-*"))]
