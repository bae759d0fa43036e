# Two commands matter: `make serve` (install, then run the gateway on its embedded default)
# and `make test` (install, then run the whole test suite, as CI does).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test install lint typecheck unit integration e2e vllm-env bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/inference-gateway serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

vllm-env:
	bash tests/e2e/vllm_env.sh

test: install vllm-env lint typecheck
	$(BIN)/pytest

unit: install
	$(BIN)/pytest tests/unit

integration: install
	$(BIN)/pytest tests/unit tests/integration

e2e: install vllm-env
	$(BIN)/pytest tests/e2e

bench: install
	$(BIN)/python scripts/bench-front-door.py

clean:
	rm -rf $(VENV) .venv-vllm .cache .pytest_cache .mypy_cache .ruff_cache
