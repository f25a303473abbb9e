# Two entry points for a fresh machine: `make serve` and `make test` (see README.md).
# Each builds its own virtualenv in .venv with the pinned CPU torch (constraints.txt).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: serve test lint venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[test]'
	touch $@

venv: $(VENV)/.installed

serve: venv
	$(BIN)/gptoss-serve serve --host 127.0.0.1 --port 50051 --metrics-port 9090

test: venv
	bash deploy/install-test-tools.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true

clean:
	rm -rf $(VENV)
