# The two quick-start commands: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sona demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sona actors kernels tests examples
	$(BIN)/ruff format --check sona actors kernels tests examples

# mypy cannot follow the editable package-dir mapping: check a plain installed copy instead.
typecheck: $(STAMP)
	rm -rf .typecheck
	$(BIN)/python -m pip install --quiet --no-deps --no-compile --target .typecheck .
	cd .typecheck && MYPYPATH=. ../$(BIN)/mypy --config-file ../pyproject.toml -p sona

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/sona bench $(ARGS)

clean:
	rm -rf $(VENV) .typecheck build *.egg-info .pytest_cache .mypy_cache .ruff_cache
