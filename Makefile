# The two quick-start commands: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo needs only the runtime and its extra (rich, matplotlib).
$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

# The tests also need the test tools and the peft extra (torch 2.13.0 CPU, transformers, peft).
$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,demo,peft]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/sona demo $(ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check sona actors kernels tests examples
	$(BIN)/ruff format --check sona actors kernels tests examples

# mypy cannot follow the editable package-dir mapping: check a plain installed copy instead.
typecheck: $(VENV)/.test-installed
	rm -rf .typecheck
	$(BIN)/python -m pip install --quiet --no-deps --no-compile --target .typecheck .
	cd .typecheck && MYPYPATH=. ../$(BIN)/mypy --config-file ../pyproject.toml -p sona

pytest: $(VENV)/.test-installed
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(VENV)/.test-installed
	$(BIN)/sona bench $(ARGS)

clean:
	rm -rf $(VENV) .typecheck build *.egg-info .pytest_cache .mypy_cache .ruff_cache
