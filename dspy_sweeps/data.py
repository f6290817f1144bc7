"""Corpus loading: Parquet (local, glob, https://, s3://) → DuckDB SQL → deterministic splits.

The user's query runs in a DuckDB connection that holds only the sweep's own data: the
sources are copied into an in-memory table `corpus` first, then external access is turned
off and the configuration locked, so the query cannot read other files, write, attach
databases, load extensions or read the environment. An `s3://` source is read with the standard
AWS variables (keys, region, and `AWS_ENDPOINT_URL` for an S3-compatible store such as MinIO),
through a DuckDB secret that is dropped before the query runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dspy_sweeps.errors import SweepError, first_line
from dspy_sweeps.spec.schema import DataSpec, Split

_REMOTE = ("http://", "https://", "s3://", "gs://", "r2://", "hf://")
_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}


@dataclass(frozen=True)
class Dataset:
    """Rows as plain dicts, split three ways; `fingerprint` identifies data + query + split."""

    inputs: tuple[str, ...]
    labels: tuple[str, ...]
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    fingerprint: str

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [*self.train, *self.val, *self.test]


def load_dataset(spec: DataSpec) -> Dataset:
    """Run the sweep's query over its sources and split the rows; raises SweepError on bad data."""
    columns, rows = query_rows(spec)
    missing = [c for c in spec.inputs if c not in columns]
    if missing:
        raise SweepError(
            f"data.inputs: column '{missing[0]}' is not in the query result (columns: {', '.join(columns)})"
        )
    labels = tuple(c for c in columns if c not in spec.inputs and c != spec.split.column)
    if not labels:
        raise SweepError("data.query: the result has no column besides the inputs, so there is nothing to learn")
    if not rows:
        raise SweepError("data: the query returned no rows")
    _check_inputs_present(rows, spec.inputs)
    train, val, test = split_rows(rows, spec.split)
    return Dataset(tuple(spec.inputs), labels, train, val, test, _fingerprint(spec, rows))


def query_rows(spec: DataSpec) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows (in a stable order) of the sweep's query over its sources."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        _load_sources(con, spec.sources)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        query = (spec.query or "SELECT * FROM corpus").strip().rstrip(";")
        try:
            _check_one_select(duckdb.extract_statements(query))
            result = con.execute(f"SELECT * FROM ({query}) ORDER BY ALL")
        except duckdb.Error as exc:
            raise SweepError(f"data.query: {first_line(exc)}") from None
        columns = [d[0] for d in result.description]
        return columns, [dict(zip(columns, row, strict=True)) for row in result.fetchall()]
    finally:
        con.close()


def _check_one_select(statements: list[Any]) -> None:
    """The query reads; anything else (COPY, ATTACH, INSTALL, a second statement) is refused by name."""
    if len(statements) != 1:
        raise SweepError(f"data.query: one SELECT statement, not {len(statements)}")
    kind = statements[0].type.name
    if kind != "SELECT":
        raise SweepError(f"data.query: only a SELECT query may run over the corpus, not {kind}")


def _check_inputs_present(rows: list[dict[str, Any]], inputs: list[str]) -> None:
    """A NULL input would reach the LM as the text "None": refuse it, naming the row."""
    for row in rows:
        for column in inputs:
            if row[column] is None:
                shown = ", ".join(f"{k}={str(v)[:40]!r}" for k, v in row.items() if v is not None)[:200]
                raise SweepError(f"data: input '{column}' is NULL in the row with {shown or 'no values at all'}")


def _load_sources(con: Any, sources: list[str]) -> None:
    import duckdb

    if any(s.startswith(_REMOTE) for s in sources):
        _load_httpfs(con)
    for source in sources:
        if not source.startswith(_REMOTE) and not any(ch in source for ch in "*?[") and not Path(source).is_file():
            raise SweepError(f"data.source: no such file '{source}'")
    s3 = any(s.startswith("s3://") for s in sources) and _s3_secret(con)
    try:
        con.execute("CREATE TABLE corpus AS SELECT * FROM read_parquet(?)", [sources])
    except duckdb.Error as exc:
        raise SweepError(f"data.source: cannot read {', '.join(sources)} as Parquet: {first_line(exc)}") from None
    finally:
        if s3:
            con.execute("DROP SECRET corpus_s3")


def _s3_secret(con: Any) -> bool:
    """DuckDB reads AWS_ENDPOINT_URL nowhere, so a secret made from the standard AWS variables tells it
    where and as whom to read; an endpoint of your own (MinIO, moto) is addressed path-style."""
    env = os.environ
    options = {
        "KEY_ID": env.get("AWS_ACCESS_KEY_ID"),
        "SECRET": env.get("AWS_SECRET_ACCESS_KEY"),
        "SESSION_TOKEN": env.get("AWS_SESSION_TOKEN"),
        "REGION": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
    }
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        url = urlparse(endpoint)
        options.update(ENDPOINT=url.netloc or url.path, URL_STYLE="path")
    values = [f"{name} '{value.replace(chr(39), chr(39) * 2)}'" for name, value in options.items() if value]
    if not values:
        return False  # DuckDB's defaults: public buckets on AWS
    if endpoint and urlparse(endpoint).scheme == "http":
        values.append("USE_SSL false")
    con.execute(f"CREATE TEMPORARY SECRET corpus_s3 (TYPE s3, {', '.join(values)})")
    return True


def _load_httpfs(con: Any) -> None:
    """Load httpfs from the `duckdb-ext-httpfs` wheel: DuckDB cannot download extensions offline."""
    import duckdb_ext

    directory = Path(duckdb_ext.__path__[0]) / "extensions"
    con.execute(f"SET extension_directory = '{directory}'")
    con.execute("LOAD httpfs")


def split_rows(rows: list[dict[str, Any]], split: Split) -> tuple[list[dict], list[dict], list[dict]]:
    if split.column is not None:
        return _split_by_column(rows, split.column)
    order = list(range(len(rows)))
    random.Random(split.seed).shuffle(order)
    sizes = [_size(getattr(split, name), len(rows), name) for name in ("train", "val", "test")]
    if sum(sizes) > len(rows):
        raise SweepError(f"data.split: train+val+test = {sum(sizes)} rows but the query returned only {len(rows)}")
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    train, val, test = ([rows[i] for i in order[bounds[k] : bounds[k + 1]]] for k in range(3))
    return train, val, test


def _size(value: int | float, total: int, name: str) -> int:
    size = value if isinstance(value, int) else round(value * total)
    if size <= 0:
        raise SweepError(f"data.split.{name}: {value} of {total} rows is an empty split")
    return size


def _split_by_column(rows: list[dict], column: str) -> tuple[list[dict], list[dict], list[dict]]:
    if column not in rows[0]:
        raise SweepError(f"data.split.column: column '{column}' is not in the query result")
    parts: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for i, row in enumerate(rows):
        name = _SPLIT_NAMES.get(str(row[column]).lower())
        if name is None:
            raise SweepError(f"data.split.column: row {i} has {column}={row[column]!r}; expected train, val or test")
        parts[name].append(row)
    for name, part in parts.items():
        if not part:
            raise SweepError(f"data.split.column: no row has {column}={name}")
    return parts["train"], parts["val"], parts["test"]


def _fingerprint(spec: DataSpec, rows: list[dict[str, Any]]) -> str:
    """Checksums of the local files, the query, the split and the rows it produced."""
    files = {s: _sha256(Path(s)) for s in spec.sources if Path(s).is_file()}
    rows_digest = hashlib.sha256(json.dumps(rows, default=str, sort_keys=True).encode()).hexdigest()
    record = {"files": files, "query": spec.query, "split": spec.split.model_dump(), "rows": rows_digest}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
