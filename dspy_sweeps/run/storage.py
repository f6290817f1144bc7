"""Trial storage every node reaches, as Ray Train's `storage_path`: a local folder, a shared path, or `s3://`.

A trial's folder (`trials/<sweep>/<trial id>/` under the sweep's storage URI) holds what the trial
needs to survive its node: GEPA's state after each iteration, the `attempts` counter, the host that
ran it, and at the end the compiled program and the per-example scores. A host never works in
storage: `TrialFolder.restore()` copies the trial's folder into a node-local working folder, the
optimizer writes there, and `push()` copies what changed back up (the host pushes after each of the
trial's events and at its end). A trial retried on any node restores what the last push saved.

The driver's records, the Optuna study and the results stay in the driver's state directory; only
trial checkpoints come here. Reads and writes go through `pyarrow.fs`, so any URI it knows works (the
AWS variables configure `s3://`, as for DuckDB's and MLflow's S3 access).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspy_sweeps.errors import SweepError

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

ATTEMPTS = "attempts"
SKIPPED_SUFFIXES = (".tmp",)  # files an optimizer is still writing (GEPA writes x.tmp, then renames it)


def filesystem(uri: str) -> tuple[FileSystem, str]:
    """`pyarrow.fs` for `uri` and the path inside it; a plain path is a local folder."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    filesys, path = fs.FileSystem.from_uri(uri)
    return filesys, path.rstrip("/")


def check_storage(uri: str) -> None:
    """Bad input before Ray starts: a storage URI that cannot be opened or written, named in one line."""
    try:
        filesys, base = filesystem(uri)
        filesys.create_dir(f"{base}/trials", recursive=True)
        filesys.get_file_info(f"{base}/trials")
    except Exception as exc:  # pyarrow raises OSError, ValueError or ArrowInvalid by scheme
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SweepError(f"storage: cannot use {uri} ({message[:300]})") from None


def check_storage_for_cluster(explicit: bool, uri: str) -> None:
    """Refuse the default storage (the driver's state dir) when Ray has more than one alive node:
    a trial retried on another node would find none of its checkpoints. Call after Ray starts."""
    if explicit:
        return
    import ray

    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    if alive > 1:
        raise SweepError(
            f"storage: the default, the state dir {uri}, is on the driver's disk, which the other nodes of this "
            f"{alive}-node cluster do not see; give `storage:` (or --storage) an s3:// URI or a path every node mounts"
        )


def clear_sweep(uri: str, sweep: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """A fresh run starts every trial folder of the sweep clean but those of the trials it `keep`s
    (reused, so they stay with their records); `--resume` keeps them all."""
    from pyarrow.fs import FileSelector, FileType

    filesys, base = filesystem(uri)
    if not keep:
        filesys.delete_dir_contents(f"{base}/trials/{sweep}", missing_dir_ok=True)
        return
    for info in filesys.get_file_info(FileSelector(f"{base}/trials/{sweep}", allow_not_found=True)):
        if info.base_name in keep:
            continue
        if info.type == FileType.Directory:
            filesys.delete_dir(info.path)
        else:
            filesys.delete_file(info.path)


@dataclass(frozen=True)
class Pushed:
    size: int
    mtime_ns: int


class TrialFolder:
    """One trial's folder in storage and its node-local working copy."""

    def __init__(self, uri: str, sweep: str, trial_id: str, local_root: Path | None = None) -> None:
        import os

        self.fs, base = filesystem(uri)
        self.remote = f"{base}/trials/{sweep}/{trial_id}"
        # One working folder per process: two hosts of one node never share one.
        root = local_root or Path(tempfile.gettempdir()) / "dspy-sweeps-trials"
        self.local = root / sweep / f"{trial_id}-{os.getpid()}"
        self._pushed: dict[str, Pushed] = {}
        self._lock = threading.Lock()

    def restore(self) -> Path:
        """The working folder, holding exactly what storage holds for this trial (nothing left from
        an earlier attempt on this node)."""
        from pyarrow.fs import FileSelector, FileType

        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        selector = FileSelector(self.remote, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type != FileType.File or info.path.endswith(SKIPPED_SUFFIXES):
                continue
            target = self.local / info.path[len(self.remote) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
            self._pushed[str(target.relative_to(self.local))] = _stamp(target)
        return self.local

    def next_attempt(self) -> int:
        """Count this attempt in storage: 1 for a trial's first run in this run of the sweep (a fresh
        run cleared its folder), more when it was retried after its host died, or resumed."""
        counter = self.local / ATTEMPTS
        attempt = int(counter.read_text().strip() or 0) + 1 if counter.is_file() else 1
        counter.write_text(str(attempt))
        self.push()
        return attempt

    def push(self, wait: bool = True) -> None:
        """Copy the files that changed since the last push up to storage. With `wait=False` (from
        the trial's own threads) a push already under way is not waited for: the next one catches up."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
                if path.name.endswith(SKIPPED_SUFFIXES):
                    continue
                name = str(path.relative_to(self.local))
                stamp = _stamp(path)
                if self._pushed.get(name) != stamp:
                    self._upload(path, f"{self.remote}/{name}")
                    self._pushed[name] = stamp
        finally:
            self._lock.release()

    def _upload(self, path: Path, target: str) -> None:
        from pyarrow.fs import LocalFileSystem

        parent = target.rpartition("/")[0]
        self.fs.create_dir(parent, recursive=True)
        # A local or shared folder gets the file whole or not at all (object stores' puts are atomic).
        staged = f"{target}.tmp" if isinstance(self.fs, LocalFileSystem) else target
        with path.open("rb") as source, self.fs.open_output_stream(staged) as out:
            shutil.copyfileobj(source, out)
        if staged != target:
            self.fs.move(staged, target)

    def finish(self, program: str | None, val_scores: list, test_scores: list) -> None:
        """The trial's outcome beside its checkpoints (the compiled program, the per-example
        scores), pushed; then the working folder goes."""
        if program is not None:
            (self.local / "program.json").write_text(program)
        scores = {"val": val_scores, "test": test_scores}
        (self.local / "scores.json").write_text(json.dumps(scores))
        self.push()
        shutil.rmtree(self.local, ignore_errors=True)

    def read(self, name: str) -> bytes | None:
        """A file of the trial's folder in storage, or None."""
        from pyarrow.fs import FileType

        path = f"{self.remote}/{name}"
        if self.fs.get_file_info(path).type != FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read()


def _stamp(path: Path) -> Pushed:
    stat = path.stat()
    return Pushed(stat.st_size, stat.st_mtime_ns)


def pushing(folder: TrialFolder, send: Any) -> Any:
    """`send` for a trial's events that pushes the trial's checkpoints after each event."""

    def send_and_push(event: Any) -> None:
        send(event)
        folder.push(wait=False)

    return send_and_push


def publish_results(uri: str, files: list[Path]) -> None:
    """Copy the driver's results files (the records, the promotion decision) to `<storage>/results/`,
    where `sweep results --storage` finds them from any machine after a submitted job has ended."""
    filesys, base = filesystem(uri)
    filesys.create_dir(f"{base}/results", recursive=True)
    for path in (p for p in files if p.is_file()):
        with path.open("rb") as source, filesys.open_output_stream(f"{base}/results/{path.name}") as out:
            shutil.copyfileobj(source, out)


def fetch_results(uri: str, into: Path) -> Path:
    """The results files in storage, copied into `into/results/` (a state dir `sweep results` reads)."""
    from pyarrow.fs import FileSelector, FileType

    filesys, base = filesystem(uri)
    (into / "results").mkdir(parents=True, exist_ok=True)
    for info in filesys.get_file_info(FileSelector(f"{base}/results", allow_not_found=True)):
        if info.type == FileType.File:
            with filesys.open_input_stream(info.path) as source, (into / "results" / info.base_name).open("wb") as out:
                shutil.copyfileobj(source, out)
    return into
