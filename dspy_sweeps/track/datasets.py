"""The sweep's data as a tracked input: one `mlflow.data` dataset per split (train, val, test),
whose source is the sweep's Parquet URI(s) and DuckDB query and whose digest is the data
fingerprint (data + query + split, `data.py`); in W&B the same facts as a `dataset` artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dspy_sweeps.spec.schema import DataSpec, Sweep

SPLITS = ("train", "val", "test")
SOURCE_TYPE = "duckdb_query"


@dataclass(frozen=True)
class SplitInput:
    """What MLflow records about one split: a name, the fingerprint as digest, the split as context."""

    name: str
    digest: str
    split: str
    uris: tuple[str, ...]
    query: str


def split_inputs(sweep: Sweep, fingerprint: str) -> list[SplitInput]:
    query = sweep.data.query or "SELECT * FROM corpus"
    uris = tuple(source_uri(s) for s in sweep.data.sources)
    return [SplitInput(f"{sweep.name}-{s}", fingerprint, s, uris, query) for s in SPLITS]


def source_uri(source: str) -> str:
    """A URL as it is; a local path (or glob) as an absolute file:// URI."""
    from pathlib import Path
    from urllib.parse import urlparse

    return source if len(urlparse(source).scheme) > 1 else Path(source).absolute().as_uri()


def mlflow_inputs(inputs: list[SplitInput]) -> list[Any]:
    """`DatasetInput`s for `MlflowClient.log_inputs`, each tagged with its split as context."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return [
        DatasetInput(
            MetaDataset(query_source(i.uris, i.query), name=i.name, digest=i.digest)._to_mlflow_entity(),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, i.split)],
        )
        for i in inputs
    ]


def query_source(uris: tuple[str, ...], query: str) -> Any:
    """An `mlflow.data` source for rows a DuckDB query selects from Parquet files."""
    from mlflow.data.dataset_source import DatasetSource

    class DuckDBQuerySource(DatasetSource):
        def __init__(self, uris: tuple[str, ...], query: str) -> None:
            self.uris, self.query = tuple(uris), query

        @staticmethod
        def _get_source_type() -> str:
            return SOURCE_TYPE

        def load(self) -> Any:
            raise NotImplementedError("load the sweep's data with `dspy_sweeps.data.load_dataset`")

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> DuckDBQuerySource:
            raise NotImplementedError

        def to_dict(self) -> dict[str, Any]:
            return {"uris": list(self.uris), "query": self.query}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> DuckDBQuerySource:
            return cls(tuple(source_dict["uris"]), source_dict["query"])

    return DuckDBQuerySource(uris, query)


def wandb_artifact(sweep: str, data: DataSpec, fingerprint: str) -> Any:
    """The data as a W&B artifact (type `dataset`): where it comes from, the query and the split,
    not a copy of the rows; its W&B digest changes when the fingerprint does."""
    import wandb

    artifact = wandb.Artifact(f"{sweep}-data", type="dataset", metadata={"data_fingerprint": fingerprint})
    with artifact.new_file("data.json") as f:
        f.write(
            json_text(
                {
                    "sources": [source_uri(s) for s in data.sources],
                    "query": data.query or "SELECT * FROM corpus",
                    "inputs": list(data.inputs),
                    "split": data.split.model_dump(),
                    "data_fingerprint": fingerprint,
                }
            )
        )
    return artifact


def json_text(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True, default=str)
