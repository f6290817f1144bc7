"""Resolve `module:attr` paths (programs, metrics) with errors that name the sweep field."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from dspy_sweeps.errors import SweepError


def load_object(path: str, field: str) -> Any:
    """Import `pkg.module:Name` (dotted attribute paths allowed after the colon)."""
    module_name, _, attr_path = path.partition(":")
    # `pipelines/` lives in the project, not in site-packages: import it from the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SweepError(f"{field}: cannot import module '{module_name}' ({exc})") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise SweepError(f"{field}: module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, attr)
    return obj


def build_program(path: str) -> Any:
    """Instantiate the sweep's program: a dspy.Module subclass or a zero-argument factory."""
    import dspy

    factory = load_object(path, "program")
    if callable(factory):
        try:
            inspect.signature(factory).bind()
        except TypeError as exc:  # e.g. the Signature or the metric named instead of the module
            raise SweepError(
                f"program: '{path}' cannot be called without arguments ({exc}); name a dspy.Module subclass"
            ) from None
        except ValueError:  # no readable signature: let the call itself decide
            pass
    program = factory() if callable(factory) else factory
    if not isinstance(program, dspy.Module):
        raise SweepError(f"program: '{path}' gave a {type(program).__name__}, not a dspy.Module")
    return program


def restore_program(path: str, program_json: str, embedder: Any = None) -> Any:
    """The program at `path` with a saved JSON state loaded into it (DSPy's load_state: no pickle);
    an Ensemble or KNNFewShot program is rebuilt from its members' states (spec/composite.py)."""
    import json

    from dspy_sweeps.spec.composite import restore

    return restore(lambda: build_program(path), json.loads(program_json), embedder)
