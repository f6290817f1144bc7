"""One budget and one count for a whole sweep, through the real CLI against a simulator this test owns.

- `--resume` carries what the earlier run spent: the sweep stops at its budget, not at the earlier
  run's spend plus a fresh budget.
- Every LM call of a sweep (its trials, the Ensemble, promotion's re-scoring of the champion) goes
  through the sweep's gateway: an independent counting proxy in front of the endpoint sees exactly
  the calls the gateway counted, and DSPy's own disk cache is never written outside the state dir.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sweep_helpers import UNTRACKED, demo_answer_key, pointed_at, rows, sim_total, sweep_cli

from dspy_sweeps.run.spend import PROMOTION, SpendLog
from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow


class CountingProxy:
    """A plain HTTP proxy on loopback in front of `upstream`, counting the LM calls (POSTs to
    /chat/completions and /embeddings) that pass through it; anything else (model checks) passes uncounted."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.calls, self.lock = upstream, 0, threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                if self.path.endswith(("/chat/completions", "/embeddings")):
                    with proxy.lock:
                        proxy.calls += 1
                self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def _forward(self, body: bytes | None) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                request = urllib.request.Request(proxy.upstream + self.path, data=body, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, payload, kind = response.status, response.read(), response.headers.get("Content-Type")
                except urllib.error.HTTPError as exc:
                    status, payload, kind = exc.code, exc.read(), exc.headers.get("Content-Type")
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self) -> int:
        """The calls counted since the last take."""
        with self.lock:
            calls, self.calls = self.calls, 0
        return calls

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimServer]:
    with SimServer(demo_answer_key(tmp_path / "key.jsonl"), tmp_path / "sim", time_scale=0.02) as server:
        yield server


def test_resume_after_spending_60_percent_of_the_budget_stops_at_the_budget(sim: SimServer, tmp_path: Path) -> None:
    """The plan's estimate of a user's teleprompter is one pass over train and val; this one tries
    `candidates` demo sets on val, so it spends more than estimated (as real optimizers can), and
    only the gateway's budget stops it. The budget is the plan's estimate (212 calls, the most
    preflight accepts). The first run (the baseline and one candidate) spends 120 of it (57%); the
    resumed sweep adds a thirty-candidate trial, which must be cut when the sweep as a whole has sent
    212 calls, not when the resumed run alone has."""
    state = tmp_path / "state"
    kind = "tests.assets.teleprompters:BestLabeledDemos"

    def run(candidates: str, *flags: str):
        return sweep_cli(
            "run",
            "sweeps/demo.yaml",
            *pointed_at(sim),
            *UNTRACKED,
            "--set",
            "data.split={train: 6, val: 10, test: 50, seed: 0}",
            "--set",
            f"optimizers=[{{kind: '{kind}', k: 2, candidates: {candidates}}}]",
            "--set",
            "budget={max_lm_calls: 212}",
            *flags,
            state=state,
        )

    first = run("1")
    assert first.returncode == 0, first.stderr[-3000:]
    # the baseline's 60 (val and test) and the candidate's 10 on val and 50 on test (its val score is cached)
    assert sim_total(sim, "vllm:request_success_total") == 120
    resumed = run("[1, 30]", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: 2 finished trials kept, 1 to run" in resumed.stdout, resumed.stdout[-2000:]
    statuses = sorted(r["status"] for r in rows(state))
    assert statuses == ["cut", "ok", "ok"], statuses  # the new trial was stopped by the budget
    # both runs together sent 212 calls to the endpoint: the budget, not 120 + a fresh 212
    assert sim_total(sim, "vllm:request_success_total") == 212
    assert SpendLog(state / "spend" / "demo.jsonl").total().calls == 212


def test_every_lm_call_of_a_sweep_is_one_the_gateway_counted(sim: SimServer, tmp_path: Path) -> None:
    """Trials, an Ensemble and a promotion that re-scores the champion (the second sweep's data is
    another split, so the champion's recorded scores do not apply): the proxy's count of each run
    equals the gateway's, as the sweep's spend log holds it."""
    proxy = CountingProxy(sim.root_url)
    state, home = tmp_path / "state", tmp_path / "home"
    home.mkdir()
    overrides = [
        *pointed_at(proxy),  # type: ignore[arg-type]
        "--set",
        "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: [1, 2]}]",
        "--set",
        "ensemble={top: 2}",
        "--set",
        "tracking={wandb: null, mlflow: {experiment: demo}}",
    ]
    log = SpendLog(state / "spend" / "demo.jsonl")
    try:
        for seed in (0, 1):
            split = f"data.split={{train: 20, val: 10, test: 20, seed: {seed}}}"
            result = sweep_cli(
                "run", "sweeps/demo.yaml", *overrides, "--set", split, state=state, env={"HOME": str(home)}
            )
            assert result.returncode == 0, result.stderr[-3000:]
            ids = {e.id for e in log.entries()}
            assert any(i.startswith("ensemble-") for i in ids), ids
            if seed == 1:  # the champion of the first sweep was re-scored on this one's test split
                assert PROMOTION in ids and "champion" in result.stdout, (ids, result.stdout[-2000:])
            sent = proxy.take()
            assert sent > 0 and log.total().calls == sent
            assert (
                sum(r["lm_calls"] for r in rows(state)) + sum(e.calls for e in log.entries() if e.id == PROMOTION)
                == sent
            )
    finally:
        proxy.close()
    assert not (home / ".dspy_cache").exists(), "DSPy's own cache was used outside the state directory"
