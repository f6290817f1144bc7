"""Command line for the SIMULATED OpenAI-compatible LM endpoint (a test/demo double, not a real model).

Run: `python -m dspy_sweeps_sim --answer-key key.jsonl [--port 0 --port-file sim.port]`;
stops on SIGTERM or Ctrl-C. Flags mirror `dspy_sweeps_sim.server.serve`.

Test facility: `--fault MODE[:COUNT][:key=value]...` (repeatable, applied in order) starts the
server with injected faults, e.g. `--fault rate_limit:3:retry_after=1 --fault error500::model=teacher`;
see `dspy_sweeps_sim.faults`. `--api-key` (or DSPY_SWEEPS_SIM_API_KEY, which keeps the key out of
the process list) makes every /v1 request need `Authorization: Bearer <key>`, like vLLM's.
"""

import argparse
import os
from pathlib import Path

from dspy_sweeps_sim.faults import MODES, Fault, FaultError
from dspy_sweeps_sim.server import serve

API_KEY_ENV = "DSPY_SWEEPS_SIM_API_KEY"


def _fault(spec: str) -> Fault:
    try:
        return Fault.parse(spec)
    except FaultError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dspy_sweeps_sim",
        description="SIMULATED OpenAI-compatible LM endpoint (dspy-sweeps test/demo double, not a real model).",
    )
    parser.add_argument("--answer-key", type=Path, required=True, help="JSONL file of {inputs, labels} records")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once ready")
    parser.add_argument(
        "--model", action="append", dest="models", help="served model name (repeatable; default student, teacher)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once per model")
    parser.add_argument("--ttft-ms", type=float, default=40.0, help="time to first token")
    parser.add_argument("--per-token-ms", type=float, default=4.5, help="decode time per output token")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies every simulated duration")
    parser.add_argument(
        "--fault",
        action="append",
        dest="faults",
        type=_fault,
        default=[],
        metavar="MODE[:COUNT][:key=value]",
        help=f"TEST FACILITY: inject a fault (repeatable, in order); MODE is one of {', '.join(MODES)}; "
        "keys: retry_after, hang_seconds, model; an empty COUNT means until changed",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV})",
    )
    args = parser.parse_args(argv)
    serve(
        args.answer_key,
        host=args.host,
        port=args.port,
        port_file=args.port_file,
        models=tuple(args.models or ("student", "teacher")),
        max_num_seqs=args.max_num_seqs,
        ttft_ms=args.ttft_ms,
        per_token_ms=args.per_token_ms,
        time_scale=args.time_scale,
        faults=args.faults,
        api_key=args.api_key,
    )


if __name__ == "__main__":
    main()
