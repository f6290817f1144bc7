# make demo   set up (idempotent) and run the offline demo sweep end to end
# make test   set up and run the whole test suite (what CI runs, after make lint)
# make lint   ruff check, ruff format --check, and the layer contracts (lint-imports, pyproject.toml)
# make bench  CLI start-up, the demo's wall time and throughput (issue 4) into BENCHMARKS.md:
#             about 25 minutes on 2 quiet cores; BENCH_QUICK=1 make bench checks the bench itself (~9)
# make reliability  repeat the fault, bad-input and security tests into RELIABILITY.md

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# Offline safety: LiteLLM (inside DSPy and the MLflow server) must not fetch its price map.
export LITELLM_LOCAL_MODEL_COST_MAP := True
export DSPY_SWEEPS_DATA_MIRROR ?= $(abspath ../shared/datasets)

.PHONY: setup demo test lint bench reliability clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# A test-split question of the demo corpus: the simulated student answers only questions its answer
# key holds, and this one (46 + 14) is one a champion gets right, so you can check the answer.
DEMO_QUESTION := A shop sold 46 shells on Monday and 14 on Tuesday. How many shells did it sell altogether?
DEMO_ANSWER := 60

demo: setup
	$(BIN)/sweep run sweeps/demo.yaml
	$(BIN)/sweep pull demo@champion -o .sweeps/pulled/demo
	$(BIN)/sweep ask demo@champion question="$(DEMO_QUESTION)"
	@echo "(the right answer is $(DEMO_ANSWER))"

# Two test files at a time: most of a sweep test is waiting on Ray, an endpoint or a server.
# Whole files go to one worker, so a module's shared sweep or Ray head is set up once.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache --no-logo

bench: setup
	$(BIN)/python bench/run.py

reliability: setup
	$(BIN)/python bench/reliability.py --repeat 3

clean:
	rm -rf .sweeps
