# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create or reuse the virtual environment in .venv first.
VENV ?= .venv
STAMP := $(VENV)/.tlq-installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test setup

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)

demo: $(STAMP)
	$(VENV)/bin/tlq demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 $(PYTEST_ARGS)
