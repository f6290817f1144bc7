"""Unit tests for corpus loading: DuckDB queries, deterministic splits, fingerprints, the sandbox.

Run: ``.venv/bin/python -m pytest tests/unit/test_data.py -q``. Parquet files are written in
tmp_path; the remote case serves them from a loopback HTTP server through DuckDB's httpfs.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dspy_sweeps.data import Dataset, load_dataset
from dspy_sweeps.errors import SweepError
from dspy_sweeps.spec.schema import DataSpec

ParquetFile = Callable[..., Path]


def spec(source: Path | str, **fields: Any) -> DataSpec:
    fields.setdefault("inputs", ["question"])
    fields.setdefault("split", {"train": 10, "val": 10, "test": 10})
    return DataSpec.model_validate({"source": str(source), **fields})


def error_of(data: DataSpec) -> str:
    with pytest.raises(SweepError) as info:
        load_dataset(data)
    message = str(info.value)
    assert "\n" not in message, "the CLI prints a SweepError as one line"
    return message


def questions(rows: list[dict]) -> list[str]:
    return [row["question"] for row in rows]


# --- splits -------------------------------------------------------------------------------


def test_corpus_loads_into_three_disjoint_splits(corpus: Path) -> None:
    data = load_dataset(spec(corpus))
    assert (len(data.train), len(data.val), len(data.test)) == (10, 10, 10)
    assert data.inputs == ("question",) and data.labels == ("answer",)
    assert len(set(questions(data.rows))) == 30
    assert all(int(row["answer"]) == 2 * int(row["question"].split()[2]) + 7 for row in data.rows)


def test_same_seed_gives_the_same_split(corpus: Path) -> None:
    first = load_dataset(spec(corpus, split={"train": 10, "val": 10, "test": 10, "seed": 3}))
    again = load_dataset(spec(corpus, split={"train": 10, "val": 10, "test": 10, "seed": 3}))
    assert (first.train, first.val, first.test) == (again.train, again.val, again.test)


def test_another_seed_gives_another_split(corpus: Path) -> None:
    first = load_dataset(spec(corpus, split={"train": 10, "val": 10, "test": 10, "seed": 0}))
    other = load_dataset(spec(corpus, split={"train": 10, "val": 10, "test": 10, "seed": 1}))
    assert set(questions(first.train)) != set(questions(other.train))
    assert sorted(questions(first.rows)) == sorted(questions(other.rows))


def test_split_does_not_depend_on_row_order_in_the_file(corpus_columns: dict, parquet_file: ParquetFile) -> None:
    forward = parquet_file(corpus_columns, "forward.parquet")
    backward = parquet_file({k: v[::-1] for k, v in corpus_columns.items()}, "backward.parquet")
    assert load_dataset(spec(forward)).train == load_dataset(spec(backward)).train


def test_fractions_are_of_the_query_result(corpus: Path) -> None:
    data = load_dataset(spec(corpus, split={"train": 0.5, "val": 0.2, "test": 0.3}))
    assert (len(data.train), len(data.val), len(data.test)) == (15, 6, 9)


def test_a_split_can_leave_rows_unused(corpus: Path) -> None:
    data = load_dataset(spec(corpus, split={"train": 5, "val": 3, "test": 2}))
    assert (len(data.train), len(data.val), len(data.test)) == (5, 3, 2)


def test_split_larger_than_the_data_names_both_counts(corpus: Path) -> None:
    message = error_of(spec(corpus, split={"train": 20, "val": 10, "test": 5}))
    assert message == "data.split: train+val+test = 35 rows but the query returned only 30"


def test_split_that_rounds_to_no_rows_is_refused(corpus: Path) -> None:
    message = error_of(spec(corpus, split={"train": 0.5, "val": 0.01, "test": 0.3}))
    assert message == "data.split.val: 0.01 of 30 rows is an empty split"


def test_column_split_follows_the_column(parquet_file: ParquetFile, corpus_columns: dict) -> None:
    names = ["TRAIN"] * 12 + ["validation"] * 8 + ["dev"] * 2 + ["test"] * 8
    path = parquet_file({**corpus_columns, "part": names})
    data = load_dataset(spec(path, split={"column": "part"}))
    assert (len(data.train), len(data.val), len(data.test)) == (12, 10, 8)
    assert set(questions(data.test)) == set(corpus_columns["question"][22:])
    assert data.labels == ("answer",), "the split column is not a label"


def test_column_split_names_a_bad_value(parquet_file: ParquetFile, corpus_columns: dict) -> None:
    names = ["train"] * 10 + ["val"] * 10 + ["test"] * 9 + ["holdout"]
    path = parquet_file({**corpus_columns, "part": names})
    message = error_of(spec(path, split={"column": "part"}))
    assert message.startswith("data.split.column: row ")
    assert message.endswith("has part='holdout'; expected train, val or test")


def test_column_split_with_a_missing_part_is_refused(parquet_file: ParquetFile, corpus_columns: dict) -> None:
    path = parquet_file({**corpus_columns, "part": ["train"] * 20 + ["val"] * 10})
    assert error_of(spec(path, split={"column": "part"})) == "data.split.column: no row has part=test"


def test_split_column_must_exist(corpus: Path) -> None:
    message = error_of(spec(corpus, split={"column": "part"}))
    assert message == "data.split.column: column 'part' is not in the query result"


# --- bad data -----------------------------------------------------------------------------


def test_missing_input_column_lists_the_columns(corpus: Path) -> None:
    message = error_of(spec(corpus, inputs=["question", "context"]))
    assert message == "data.inputs: column 'context' is not in the query result (columns: question, answer)"


def test_nothing_left_to_learn_is_refused(corpus: Path) -> None:
    message = error_of(spec(corpus, query="SELECT question FROM corpus"))
    assert message.startswith("data.query: the result has no column besides the inputs")


def test_sql_error_is_a_data_query_error(corpus: Path) -> None:
    message = error_of(spec(corpus, query="SELEC question, answer FROM corpus"))
    assert message.startswith("data.query: Parser Error: syntax error")


def test_query_naming_an_unknown_column_is_a_data_query_error(corpus: Path) -> None:
    message = error_of(spec(corpus, query="SELECT question, solution FROM corpus"))
    assert message.startswith("data.query: ") and "solution" in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.parquet"
    assert error_of(spec(path)) == f"data.source: no such file '{path}'"


def test_a_glob_that_matches_nothing_is_a_source_error(tmp_path: Path) -> None:
    assert error_of(spec(tmp_path / "*.parquet")).startswith(f"data.source: cannot read {tmp_path}/*.parquet")


def test_a_file_that_is_not_parquet_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    path.write_text("question,answer\nWhat is 1 plus 1?,2\n")
    assert error_of(spec(path)).startswith(f"data.source: cannot read {path} as Parquet: ")


def test_a_truncated_parquet_file_is_a_source_error(corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.parquet"
    content = corpus.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    assert error_of(spec(path)).startswith(f"data.source: cannot read {path} as Parquet: ")


def test_a_query_returning_no_rows_is_refused(corpus: Path) -> None:
    message = error_of(spec(corpus, query="SELECT question, answer FROM corpus WHERE answer = 'none'"))
    assert message == "data: the query returned no rows"


def test_sources_can_be_a_list_and_a_glob(corpus_columns: dict, parquet_file: ParquetFile, tmp_path: Path) -> None:
    half = {k: v[:15] for k, v in corpus_columns.items()}
    rest = {k: v[15:] for k, v in corpus_columns.items()}
    first, second = parquet_file(half, "part-1.parquet"), parquet_file(rest, "part-2.parquet")
    listed = load_dataset(DataSpec.model_validate({**spec(first).model_dump(), "source": [str(first), str(second)]}))
    globbed = load_dataset(spec(tmp_path / "part-*.parquet"))
    assert len(listed.rows) == len(globbed.rows) == 30
    assert listed.train == globbed.train


# --- fingerprint --------------------------------------------------------------------------


def test_fingerprint_is_stable_on_reload(corpus: Path) -> None:
    assert load_dataset(spec(corpus)).fingerprint == load_dataset(spec(corpus)).fingerprint


def test_fingerprint_follows_query_split_and_data(
    corpus: Path, corpus_columns: dict, parquet_file: ParquetFile
) -> None:
    base = load_dataset(spec(corpus)).fingerprint
    same_rows_other_query = load_dataset(spec(corpus, query="SELECT question, answer FROM corpus")).fingerprint
    other_split = load_dataset(spec(corpus, split={"train": 10, "val": 10, "test": 10, "seed": 1})).fingerprint
    edited = dict(corpus_columns, answer=[*corpus_columns["answer"][:-1], "-1"])
    other_data = load_dataset(spec(parquet_file(edited))).fingerprint
    assert len({base, same_rows_other_query, other_split, other_data}) == 4


def test_fingerprint_sees_a_file_rewritten_in_place(corpus_columns: dict, parquet_file: ParquetFile) -> None:
    path = parquet_file(corpus_columns)
    before = load_dataset(spec(path)).fingerprint
    parquet_file(dict(corpus_columns, answer=["0"] * 30))
    assert load_dataset(spec(path)).fingerprint != before


# --- the query sandbox --------------------------------------------------------------------

# Each query is wrapped as `SELECT * FROM (<query>) ORDER BY ALL`, so a bare statement fails to
# parse; the `) t; ...; SELECT * FROM (` forms break out of the wrapper and reach the sandbox.
BREAK_OUT = "SELECT * FROM corpus) t; {}; SELECT * FROM (SELECT * FROM corpus"
ESCAPES = {
    "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
    "read_text": "SELECT content AS question, 'x' AS answer FROM read_text('/etc/passwd')",
    "read_parquet_elsewhere": "SELECT * FROM read_parquet('{corpus}')",
    "glob": "SELECT file AS question, 'x' AS answer FROM glob('/etc/*')",
    "copy": "COPY corpus TO '{out}/copy.csv'",
    "copy_breakout": BREAK_OUT.format("COPY corpus TO '{out}/copy.csv'"),
    "export_breakout": BREAK_OUT.format("EXPORT DATABASE '{out}/export'"),
    "attach": "ATTACH '{out}/db.duckdb' AS other",
    "attach_breakout": BREAK_OUT.format("ATTACH '{out}/db.duckdb' AS other"),
    "install": "INSTALL httpfs",
    "install_breakout": BREAK_OUT.format("INSTALL httpfs"),
    "load": "LOAD httpfs",
    "load_breakout": BREAK_OUT.format("LOAD httpfs"),
    "getenv": "SELECT getenv('HOME') AS question, 'x' AS answer FROM corpus",
    "set": "SET enable_external_access=true",
    "set_breakout": BREAK_OUT.format("SET enable_external_access=true; COPY corpus TO '{out}/after-set.csv'"),
    "unlock_breakout": BREAK_OUT.format(
        "SET lock_configuration=false; SET enable_external_access=true; COPY corpus TO '{out}/after-unlock.csv'"
    ),
}


@pytest.mark.reliability
@pytest.mark.parametrize("query", ESCAPES.values(), ids=ESCAPES.keys())
def test_queries_cannot_leave_the_sandbox(
    query: str, corpus_columns: dict, parquet_file: ParquetFile, tmp_path: Path
) -> None:
    source = parquet_file(corpus_columns, "source.parquet")
    other = parquet_file(corpus_columns, "other.parquet")
    out = tmp_path / "out"
    out.mkdir()
    message = error_of(spec(source, query=query.format(out=out, corpus=other)))
    assert message.startswith("data.query: ")
    assert "root:" not in message, "nothing read from /etc/passwd reaches the message"
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.parquet", "out", "source.parquet"]


# --- remote Parquet over HTTP -------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server over a folder: (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_remote_parquet_loads_like_the_local_file(http_root: tuple[Path, str], corpus: Path) -> None:
    root, url = http_root
    (root / "x.parquet").write_bytes(corpus.read_bytes())
    remote: Dataset = load_dataset(spec(f"{url}/x.parquet"))
    local = load_dataset(spec(corpus))
    assert (remote.train, remote.val, remote.test) == (local.train, local.val, local.test)


def test_remote_source_does_not_open_the_query_to_other_urls(http_root: tuple[Path, str], corpus: Path) -> None:
    root, url = http_root
    (root / "x.parquet").write_bytes(corpus.read_bytes())
    (root / "private.parquet").write_bytes(corpus.read_bytes())
    message = error_of(spec(f"{url}/x.parquet", query=f"SELECT * FROM read_parquet('{url}/private.parquet')"))
    assert message.startswith("data.query: ")


def test_missing_remote_file_is_a_source_error(http_root: tuple[Path, str]) -> None:
    _, url = http_root
    message = error_of(spec(f"{url}/missing.parquet"))
    assert message.startswith(f"data.source: cannot read {url}/missing.parquet as Parquet: ")
    assert "404" in message
