# Two commands do everything: `make demo` and `make test` (each creates .venv when needed).
# TORCH picks the PyTorch build; the default is the CPU wheel these machines carry on disk.
# Use e.g. `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu124"` for a GPU build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.msakit-installed
TORCH_SPEC := $(VENV)/.torch-spec
DEMO_DIR ?= runs/demo

.PHONY: demo test install bench clean FORCE

# rewritten only when TORCH changes, so `make demo TORCH=...` reinstalls on an existing .venv
$(TORCH_SPEC): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@

$(STAMP): pyproject.toml $(TORCH_SPEC)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,extract,serve,study]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/msakit train tfn --dataset synthetic --seeds 1111 --output $(DEMO_DIR) --overwrite
	$(BIN)/msakit robustness $(DEMO_DIR)/seed-1111.pt --dataset synthetic --protocol intra \
		--output $(DEMO_DIR)/robustness-intra

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/python -m pytest
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/perf/throughput.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
