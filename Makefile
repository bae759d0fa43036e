# Two commands matter: `make serve` (install, then run the gateway on its embedded default)
# and `make test` (install, then run the whole test suite, as CI does).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU vLLM of the end-to-end tier (3.4 GB) is kept outside the clone so that fresh clones reuse it.
export INFERENCE_GATEWAY_VLLM_VENV ?= $(HOME)/.cache/inference-gateway/venv-vllm
export INFERENCE_GATEWAY_VLLM_MODEL_DIR ?= $(HOME)/.cache/inference-gateway/tiny-llama

.PHONY: serve test install lint typecheck unit integration e2e slurm vllm-env slurm-env browser haproxy-env replicas bench demo-site clean

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

# Debian's Slurm and munge for the tier that runs a real single-node cluster (installing needs root).
slurm-env:
	bash tests/slurm/slurm_env.sh

# The status page's test drives Debian's chromium through Playwright (no browser download); CI runs as root.
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }


# Debian's HAProxy, for the replicas example and the test that restarts replicas behind it (installing needs root).
haproxy-env:
	bash examples/replicas/haproxy_env.sh

# Two replicas behind HAProxy on this machine, sharing PostgreSQL and Redis (docs/deployment.md); then
# `examples/replicas/replicas.sh rolling-restart` and `... stop`, with the same PYTHON.
replicas: install haproxy-env
	PYTHON=$(abspath $(BIN)/python) bash examples/replicas/replicas.sh start


test: install vllm-env slurm-env browser haproxy-env lint typecheck
	$(BIN)/pytest

unit: install
	$(BIN)/pytest tests/unit

integration: install browser
	$(BIN)/pytest tests/unit tests/integration

e2e: install vllm-env
	$(BIN)/pytest tests/e2e

slurm: install slurm-env
	$(BIN)/pytest tests/slurm

# A whole HPC site on this machine: the local Globus Compute service (RabbitMQ at 127.0.0.1:5672, port 5000), one
# endpoint on a Slurm cluster of its own, and the gateway with a globus and a parsl cluster; Ctrl-C stops it all.
demo-site: install slurm-env
	$(BIN)/python -m tests.demo_site

bench: install
	$(BIN)/python scripts/bench-front-door.py

clean:
	rm -rf $(VENV) .venv-vllm .cache .pytest_cache .mypy_cache .ruff_cache
