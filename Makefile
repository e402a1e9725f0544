# Two commands do all the set-up: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench mutants mutants-sample clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# mistral-common (tests/integration/test_mistral_tekken.py: Mistral's tokenizer as a vLLM machine has it) caps
	# numpy below this stack's 2.4 on Python <= 3.12 and runs on it: installed without its pins (its other
	# requirements are dev extras).
	$(BIN)/python -m pip install -q --no-deps mistral-common==1.13.1
	touch $(STAMP)

install: $(STAMP)

# The demo's numbers are asserted by tests/integration/test_demo.py, which runs these lines as they are.
demo: install
	$(BIN)/tunelab train examples/quickstart.yaml --overwrite
	$(BIN)/tunelab compare runs/quickstart --prompts examples/data/prompts.jsonl --out reports/quickstart
	$(BIN)/tunelab train examples/dpo.yaml --overwrite

# One pytest-xdist worker per core this process may use (nproc), tests handed out one by one.
test: install
	$(BIN)/python -m pytest -q -n $(shell nproc) --dist worksteal

test-fast: install
	$(BIN)/python -m pytest -q -n $(shell nproc) --dist worksteal -m "not slow"

# Mutation testing (mutmut) of the modules that decide what trains and what is kept: scope, templates and the loss
# mask, runs, config. A development tool, not part of `make test`; about an hour on 2 cores.
mutants: install
	$(BIN)/python -m pip install -q mutmut==3.8.1
	rm -rf mutants
	OMP_NUM_THREADS=1 TUNELAB_HOME=$(CURDIR)/.tunelab-cache $(BIN)/mutmut run --max-children 2 > /dev/null || true
	$(BIN)/python bench/mutation_score.py

# The same measured on a seeded sample of SAMPLE mutants per module (default 60), with 95% intervals: ~30 min.
mutants-sample: install
	$(BIN)/python -m pip install -q mutmut==3.8.1
	rm -rf mutants
	TUNELAB_HOME=$(CURDIR)/.tunelab-cache $(BIN)/python bench/mutation_score.py --sample $(or $(SAMPLE),60)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

clean:
	rm -rf $(VENV) runs .tunelab-cache .pytest_cache mutants
