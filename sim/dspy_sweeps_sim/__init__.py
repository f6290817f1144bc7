"""SIMULATED OpenAI-compatible LM endpoint: a test/demo double for a vLLM student and a cloud teacher.

Not a real model. It answers DSPy prompts from an answer key with a deterministic quality model,
so optimiser sweeps make real, repeatable differences offline. Start it with
`python -m dspy_sweeps_sim --answer-key key.jsonl` or `with SimServer(key, workdir) as sim: ...`.

Test facility: inject endpoint failures (500, 429 with Retry-After, 401, garbage, hang) with
`SimServer(..., faults=[...])`, `sim.set_faults(...)` or `POST /sim/faults`, and read counters
from `sim.stats()` / `GET /sim/stats`; see `dspy_sweeps_sim.faults`. For `make bench` the
counters include distinct request bodies and busy slot-seconds, and `sim.requests()` /
`GET /sim/requests` lists every answered request (slot start and end, tokens, body digest).
"""

from dspy_sweeps_sim.answers import write_answer_key
from dspy_sweeps_sim.launch import SimServer

__all__ = ["SimServer", "write_answer_key"]
