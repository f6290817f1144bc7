"""`sweep ask`: load a registered program in this process and ask it one question.

A student on a local endpoint plugin (the simulator) gets that endpoint started again from the
folder its sweep left; a student the sweep served on llama.cpp gets a fresh `llama-server` for the
same GGUF file (`sweep serve` too).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dspy_sweeps.errors import SweepError
from dspy_sweeps.spec.schema import ModelSpec
from dspy_sweeps.state import State
from dspy_sweeps.track.registry import load_pulled, pull
from dspy_sweeps.track.uri import tracking_uri as default_uri


def ask_program(
    ref: str, inputs: dict[str, str], *, api_base: str | None, state_dir: Path | None, tracking_uri: str | None
) -> dict[str, Any]:
    state = State.at(state_dir)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pull(ref, Path(tmp), tracking_uri or default_uri(None, state))
        meta = json.loads((folder / "metadata.json").read_text())
        missing = [name for name in meta["inputs"] if name not in inputs]
        if missing:
            raise SweepError(f"{ref}: missing input {missing[0]}=... (inputs: {', '.join(meta['inputs'])})")
        from dspy_sweeps.lm.endpoints import simulated

        if meta.get("student_simulated") or simulated(ModelSpec(**meta["student"])):
            print(f"{ref}: SIMULATED student (a test/demo double, not a real model)", file=sys.stderr)
        with student_endpoint(meta, state, api_base) as base:
            program = load_pulled(folder, api_base=base)
            return dict(program(**inputs).items())


@contextlib.contextmanager
def student_endpoint(meta: dict[str, Any], state: State, api_base: str | None) -> Iterator[str | None]:
    """The student endpoint to call: `api_base` if given; for a student on a local endpoint plugin
    without one, that endpoint started again (the simulator, over its sweep's answer key), and for a
    student its sweep served on llama.cpp a fresh llama-server, each stopped on exit; otherwise None
    (the sweep's own spec)."""
    serve = meta["student"].get("serve") or {}
    if not api_base and serve.get("engine") == "llama_cpp":
        from dspy_sweeps.lm.served import local_server
        from dspy_sweeps.spec.schema import ServeSpec

        with local_server(ServeSpec(**serve), state.root / "serve" / meta["sweep"]) as base:
            yield base
        return
    from dspy_sweeps.lm.endpoints import plugin_name, restarted

    student = ModelSpec(**meta["student"])
    if api_base or plugin_name(student) is None:
        yield api_base
        return
    embedder = (ModelSpec(**meta["embedder"]),) if meta.get("embedder") else ()
    with restarted(student, meta["sweep"], state, embedder) as base:
        yield base
