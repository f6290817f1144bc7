"""dspy-sweeps: find the best compiled DSPy program by running optimizer trials in parallel on Ray.

`dspy_sweeps.load("demo@champion")` returns a promoted program; everything heavy is
imported on first use so `import dspy_sweeps` (and `sweep --help`) stay fast.
"""

from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from dspy_sweeps.track.registry import load

        return load
    raise AttributeError(f"module 'dspy_sweeps' has no attribute {name!r}")
