"""Build a public corpus (GSM8K or Banking77) as Parquet files from its manifest.

Run from anywhere:

    python datasets/build.py gsm8k|banking77 [--out DIR] [--manifest PATH]

The output goes to ``datasets/<name>/data/`` by default (gitignored). When
``DSPY_SWEEPS_DATA_MIRROR`` is set, the Parquet files are copied from
``$DSPY_SWEEPS_DATA_MIRROR/<name>/`` and checked against the manifest's sha256
values; otherwise the raw files are downloaded from the manifest's source URLs
and converted with Polars to the same columns. A ``_SUCCESS`` marker is written
last, so its presence means the build completed and a rerun does nothing.
"""

import argparse
import hashlib
import io
import json
import os
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

import polars as pl
import yaml

HERE = Path(__file__).resolve().parent
MIRROR_ENV = "DSPY_SWEEPS_DATA_MIRROR"
MARKER = "_SUCCESS"


class BuildError(Exception):
    """A corpus could not be built; the message says which file and why."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large files stay cheap."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temp file next to `dest`, then rename it into place.

    A crash or failed check leaves no half-written `dest` behind.
    """
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def copy_verified(src: Path, dest: Path, expected: str) -> None:
    """Copy a mirror file to `dest`, failing if its sha256 is not `expected`."""
    if not src.is_file():
        raise BuildError(f"mirror file {src} is missing")

    def copy_and_check(tmp: Path) -> None:
        shutil.copyfile(src, tmp)
        # Hash the copy rather than the source: it is what we are about to publish.
        actual = sha256_of(tmp)
        if actual != expected:
            raise BuildError(f"sha256 mismatch for {src}: manifest says {expected}, file has {actual}")

    write_atomically(dest, copy_and_check)


def convert_gsm8k(raw: dict[str, bytes], split: str) -> pl.DataFrame:
    """Turn an upstream GSM8K jsonl file (question, answer) into mirror columns."""
    parts = pl.col("answer").str.split_exact("####", 1)
    return pl.read_ndjson(io.BytesIO(raw[split])).select(
        "question",
        parts.struct.field("field_0").str.strip_chars_end().alias("rationale"),
        parts.struct.field("field_1").str.strip_chars().str.replace_all(",", "", literal=True).alias("final_answer"),
        pl.lit(split).alias("split"),
    )


def convert_banking77(raw: dict[str, bytes], split: str) -> pl.DataFrame:
    """Turn an upstream Banking77 csv file (text, category) into mirror columns."""
    frame = pl.read_csv(io.BytesIO(raw[split])).select(
        "text", pl.col("category").alias("intent"), pl.lit(split).alias("split")
    )
    unknown = set(frame["intent"]) - set(json.loads(raw["categories"]))
    if unknown:
        raise BuildError(f"{split}.csv has intents missing from categories.json: {sorted(unknown)}")
    return frame


CONVERTERS: dict[str, Callable[[dict[str, bytes], str], pl.DataFrame]] = {
    "gsm8k": convert_gsm8k,
    "banking77": convert_banking77,
}


def fetch(url: str) -> bytes:
    """Download one raw source file."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except OSError as error:  # URLError and HTTPError are OSErrors
        raise BuildError(f"download of {url} failed: {error}") from error


def build_from_mirror(manifest: dict, mirror: Path, out: Path) -> None:
    """Copy and verify every output file from the local mirror."""
    for filename, spec in manifest["outputs"].items():
        src = mirror / manifest["name"] / filename
        copy_verified(src, out / filename, spec["sha256"])
        print(f"{out / filename}: copied from {src}, sha256 ok")


def build_from_sources(manifest: dict, out: Path) -> None:
    """Download the raw files, convert each split and check it against the manifest."""
    raw = {key: fetch(url) for key, url in manifest["sources"].items()}
    convert = CONVERTERS[manifest["name"]]
    for filename, spec in manifest["outputs"].items():
        frame = convert(raw, spec["split"])
        if frame.columns != list(manifest["columns"]) or frame.height != spec["rows"]:
            raise BuildError(
                f"{filename}: got columns {frame.columns} and {frame.height} rows, "
                f"manifest expects {list(manifest['columns'])} and {spec['rows']}"
            )
        write_atomically(out / filename, frame.write_parquet)
        print(f"{out / filename}: converted {frame.height} rows from {manifest['sources'][spec['split']]}")


def build(manifest: dict, out: Path) -> None:
    """Build the corpus into `out` unless a previous build already completed there."""
    marker = out / MARKER
    if marker.exists():
        print(f"{out}: already built ({MARKER} present), skipping")
        return
    out.mkdir(parents=True, exist_ok=True)
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        build_from_mirror(manifest, Path(mirror), out)
    else:
        build_from_sources(manifest, out)
    source = f"mirror {mirror}" if mirror else "upstream sources"
    write_atomically(marker, lambda tmp: tmp.write_text(f"{manifest['name']} built from {source}\n"))
    print(f"{marker}: written")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(CONVERTERS))
    parser.add_argument("--out", type=Path, help="output folder (default: datasets/<name>/data/)")
    parser.add_argument("--manifest", type=Path, help="manifest to use (default: datasets/<name>/manifest.yaml)")
    args = parser.parse_args()
    manifest = yaml.safe_load((args.manifest or HERE / args.name / "manifest.yaml").read_text())
    try:
        build(manifest, args.out or HERE / args.name / "data")
    except BuildError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
