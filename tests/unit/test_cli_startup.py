"""The `sweep` CLI starts fast: importing it loads none of the heavy stack.

Run: ``.venv/bin/python -m pytest tests/unit/test_cli_startup.py -q``. Each check runs in a
fresh interpreter, since this test process may already have imported DSPy or DuckDB.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

HEAVY = ("ray", "dspy", "mlflow", "wandb", "litellm", "duckdb", "polars", "pandas", "pyarrow", "optuna")
COMMANDS = ("run", "plan", "validate", "results", "pull", "ask", "serve", "submit", "status", "logs", "stop")


def test_importing_the_cli_leaves_the_heavy_stack_unloaded(repo: Path) -> None:
    code = (
        "import json, sys\n"
        "import dspy_sweeps, dspy_sweeps.cli.main\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_help_lists_every_command(repo: Path) -> None:
    sweep = Path(sys.executable).with_name("sweep")
    done = subprocess.run([str(sweep), "--help"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # A command's row starts its line (inside the box); the docstring's list of names does not count.
    listed = re.findall(r"^[^\w-]*([a-z]+)\s{2,}\S", done.stdout, flags=re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS)


def test_no_arguments_shows_help(repo: Path) -> None:
    sweep = Path(sys.executable).with_name("sweep")
    done = subprocess.run([str(sweep)], cwd=repo, capture_output=True, text=True, timeout=60)
    assert "Usage: sweep" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
