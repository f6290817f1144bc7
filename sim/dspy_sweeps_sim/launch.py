"""Start and stop the SIMULATED OpenAI-compatible LM endpoint as a subprocess (test/demo double).

    with SimServer(Path("key.jsonl"), workdir, time_scale=0.001) as sim:
        lm = dspy.LM("openai/student", api_base=sim.base_url, api_key="sim-key")

The server runs `python -m dspy_sweeps_sim` in its own process group and logs to
`workdir/sim.log`. Standard library only, so importing this module stays fast for the CLI.

Fault injection (a TEST FACILITY, see `dspy_sweeps_sim.faults`):

    with SimServer(key, workdir, faults=["rate_limit:2:retry_after=0.5"]) as sim:
        sim.set_faults("error500", count=3, model="student")   # replaces the schedule
        sim.set_faults("ok")                                     # back to normal
        sim.stats()["models"]["student"]["faults"]["error500"]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from dspy_sweeps_sim.faults import Fault

API_KEY_ENV = "DSPY_SWEEPS_SIM_API_KEY"  # read by `python -m dspy_sweeps_sim`; keeps the key out of `ps`


class SimServer:
    """Context manager owning one simulated endpoint process."""

    def __init__(
        self,
        answer_key: Path,
        workdir: Path,
        *,
        models: Sequence[str] = ("student", "teacher"),
        max_num_seqs: int = 64,
        ttft_ms: float = 40.0,
        per_token_ms: float = 4.5,
        time_scale: float = 1.0,
        startup_timeout: float = 30.0,
        faults: Sequence[Fault | str | dict[str, Any]] = (),
        api_key: str | None = None,
    ) -> None:
        """`faults`: the starting fault schedule (test facility); `api_key`: required on /v1 if set."""
        self.answer_key = Path(answer_key)
        self.workdir = Path(workdir)
        self.models = tuple(models)
        self.max_num_seqs = max_num_seqs
        self.ttft_ms = ttft_ms
        self.per_token_ms = per_token_ms
        self.time_scale = time_scale
        self.startup_timeout = startup_timeout
        self.faults = tuple(Fault.coerce(f) for f in faults)  # parse now, so a typo fails here
        self.api_key = api_key
        self.log_path = self.workdir / "sim.log"
        self.port_file = self.workdir / "sim.port"
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("SimServer is not running; call start() first.")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        """The server without /v1: /health, /metrics and the /sim test-facility API live here."""
        return self.base_url.removesuffix("/v1")

    @property
    def pid(self) -> int | None:
        """Process (and process group) id of the running server."""
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "dspy_sweeps_sim", "--answer-key", str(self.answer_key)]
        cmd += ["--host", "127.0.0.1", "--port", "0", "--port-file", str(self.port_file)]
        for model in self.models:
            cmd += ["--model", model]
        cmd += ["--max-num-seqs", str(self.max_num_seqs), "--ttft-ms", str(self.ttft_ms)]
        cmd += ["--per-token-ms", str(self.per_token_ms), "--time-scale", str(self.time_scale)]
        for fault in self.faults:
            cmd += ["--fault", fault.to_cli()]
        return cmd  # the API key travels in the environment, never on the command line

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        env["DSPY_SWEEPS_SIM_FOLLOW_PARENT"] = "1"  # exit with this process, even if it is SIGKILLed
        if self.api_key:
            env[API_KEY_ENV] = self.api_key
        return env

    def start(self) -> SimServer:
        """Launch the server and return once /health answers 200; RuntimeError with the log tail if not."""
        if self._process is not None:
            raise RuntimeError("SimServer already started.")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)  # a stale file would report a dead server's port
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self._environment(),
        )
        try:
            self._wait_until_ready(time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self, deadline: float) -> None:
        while not self.port_file.exists():
            self._check_alive(deadline, "write its port file")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        while not self._healthy():
            self._check_alive(deadline, "answer GET /health")
            time.sleep(0.02)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _check_alive(self, deadline: float, step: str) -> None:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(
                f"Simulated LM server exited with code {self._process.returncode} before it could {step}.\n"
                f"{self._log_tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Simulated LM server did not {step} within {self.startup_timeout:.0f} s.\n{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    # --- fault injection and counters (test facility) ---

    def set_faults(
        self,
        mode: str,
        count: int | None = None,
        retry_after: float | None = None,
        model: str | None = None,
        *,
        hang_seconds: float | None = None,
        append: bool = False,
    ) -> list[dict[str, Any]]:
        """Replace the fault schedule with one rule (or queue it behind the others with append=True).

        `mode` is ok, error500, error503, rate_limit, garbage, hang or unauthorized; `count` completion
        requests get it (None: until changed); `model` targets one served model (None: all).
        Returns the schedule now in force. `set_faults("ok")` clears every fault.
        """
        rule = Fault(mode, count, retry_after, model, hang_seconds).to_json()
        return self._admin("POST", "/sim/faults", {**rule, "append": append})["faults"]

    def get_faults(self) -> list[dict[str, Any]]:
        """The fault rules in force, in order, with their remaining counts."""
        return self._admin("GET", "/sim/faults")["faults"]

    def stats(self) -> dict[str, Any]:
        """Counters: {"auth_rejected": n, "latency": {max_num_seqs, ttft_ms, per_token_ms, time_scale},
        "models": {name: {requests, ok, faults: {mode: n}, invalid, prompt_tokens, completion_tokens,
        peak_running, running, waiting, hanging, unique_requests, unique_decode_tokens, slot_seconds}}}.

        `unique_requests` counts distinct answered request bodies and `unique_decode_tokens` the
        tokens they decoded; `slot_seconds` is busy slot-seconds (answered requests' service time
        plus the elapsed part of running ones)."""
        return self._admin("GET", "/sim/stats")

    def requests(self, since: int = 0) -> dict[str, list[list[Any]]]:
        """Answered requests per model from the `since`-th on: [slot start, slot end (Unix s),
        decode tokens, body digest, sampled (temperature > 0)]."""
        return self._admin("GET", f"/sim/requests?since={since}")["models"]

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.root_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise RuntimeError(f"simulated endpoint refused {method} {path}: HTTP {error.code} {detail}") from None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers; safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self.port = None

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)  # start_new_session made the pid the group id
        except ProcessLookupError:
            pass  # the group has already exited

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
