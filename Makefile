# The README's contract: `make demo` and `make test` work on a fresh machine whose only
# network is the package registries.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,onnx]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/headstart demo --out artifacts/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench scripts
	$(BIN)/ruff format --check pipeline tests bench scripts
	$(BIN)/mypy pipeline

bench: $(STAMP)
	$(BIN)/python bench/extract_throughput.py

clean:
	rm -rf artifacts/* $(VENV) .pytest_cache .mypy_cache .ruff_cache
	touch artifacts/.gitkeep
