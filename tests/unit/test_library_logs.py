"""Library log lines go to the state directory's `logs/libraries.log`, not to the user's terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# What `sweep ask` printed on a real model whose answer stopped at max_tokens (issue 15).
DSPY_WARNING = "LM response was truncated due to exceeding max_tokens=40."


def test_dspy_warnings_go_to_the_state_logs_not_stderr(tmp_path: Path) -> None:
    code = (
        "import logging, pathlib\n"
        "from dspy_sweeps.cli.main import _dspy_console_off, _library_logs\n"
        f"_library_logs(pathlib.Path({str(tmp_path)!r}))\n"
        "import dspy\n"  # as `run` does next: loading the program imports DSPy
        "_dspy_console_off()\n"
        f"logging.getLogger('dspy.clients.lm').warning({DSPY_WARNING!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert DSPY_WARNING not in done.stderr + done.stdout
    assert DSPY_WARNING in (tmp_path / "logs" / "libraries.log").read_text()


def test_without_the_redirect_dspy_prints_the_warning(tmp_path: Path) -> None:
    """The case above proves something: DSPy alone does print this line to stderr."""
    code = f"import dspy, logging\nlogging.getLogger('dspy.clients.lm').warning({DSPY_WARNING!r})\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert DSPY_WARNING in done.stderr
