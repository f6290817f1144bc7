"""What `pip install .` gives a user: the engine without the simulator, which is a distribution of its own.

A copy of the checkout is installed (not editable, `--no-deps`, offline from uv's cache) into a fresh
venv; the test reads what landed in its site-packages and asks the engine's plugin point what it
finds, then installs `sim/` beside it and asks again.

Run: `.venv/bin/python -m pytest tests/integration/test_packaging.py -q`
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).with_name("uv")
SKIP = shutil.ignore_patterns(".venv", ".git", ".sweeps", "build", "*.egg-info", "__pycache__", ".pytest_cache")
# Run in the fresh venv: the plugin point needs only the standard library, so --no-deps is enough.
PROBE = """
import importlib.util, json
from importlib.metadata import entry_points
from dspy_sweeps.lm.endpoints import GROUP, installed
print(json.dumps({
    "sim_module": importlib.util.find_spec("dspy_sweeps_sim") is not None,
    "entry_points": {ep.name: ep.value for ep in entry_points(group=GROUP)},
    "plugins": sorted(installed()),
}))
"""


def uv(*args: str) -> None:
    done = subprocess.run([str(UV), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"uv {' '.join(args)} exited {done.returncode}:\n{done.stderr}"


def probe(python: Path) -> dict:
    done = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_pip_install_dot_installs_no_simulator_and_the_sim_distribution_provides_it(tmp_path: Path) -> None:
    source = tmp_path / "checkout"
    shutil.copytree(REPO, source, ignore=SKIP)
    venv = tmp_path / "venv"
    uv("venv", "--quiet", "--offline", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    uv("pip", "install", "--quiet", "--offline", "--no-deps", "--python", str(python), str(source))

    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    installed = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    engine = {p for p in installed if p.startswith("dspy_sweeps/") and p.endswith(".py")}
    shipped = {str(p.relative_to(source)) for p in (source / "dspy_sweeps").rglob("*.py")}
    assert engine == shipped, "the install holds the engine's modules, all of them (it is not empty)"
    assert not [p for p in installed if "dspy_sweeps_sim" in p or p.startswith("dspy_sweeps/sim")]
    assert not [p for p in installed if "simulat" in p.lower() or "sim.py" in p]
    assert probe(python) == {"sim_module": False, "entry_points": {}, "plugins": []}

    uv("pip", "install", "--quiet", "--offline", "--no-deps", "--python", str(python), str(source / "sim"))
    assert probe(python) == {
        "sim_module": True,
        "entry_points": {"sim": "dspy_sweeps_sim.plugin:PLUGIN"},
        "plugins": ["sim"],
    }, "the simulator comes from its own distribution, found through its entry point"
