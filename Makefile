# mailrelay-operator: every entry point a person or CI uses.
# `make demo` and `make test` each do all the set-up a fresh machine needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(BIN):$(PATH)

.PHONY: setup venv tools images test test-fast lint demo demo-compare demo-persistent bench dashboards crds clean e2e-kind

setup: venv tools

venv: $(STAMP)

# The project (both programs and the test tools) and, next to it, the dev-only sandbox (never shipped).
$(STAMP): pyproject.toml sandbox/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' -e ./sandbox
	touch $(STAMP)

tools:
	bash scripts/install-system-deps.sh
	bash scripts/install-helm.sh
	bash scripts/install-kube.sh

# mailrelay-relay and mailrelay-operator, tagged with the project's version (buildah, or docker where an
# engine runs; scripts/build-images.sh). The container tests run them with podman.
images: tools
	bash scripts/build-images.sh

test: setup images
	$(BIN)/python -m pytest -q -ra

test-fast: venv
	$(BIN)/python -m pytest -q -ra -x -m 'not slow'

lint: venv
	$(BIN)/ruff check common relay operator sandbox tests bench dashboards
	$(BIN)/mypy

demo: setup
	$(BIN)/python -m mailrelay_sandbox.demo

demo-compare: setup
	$(BIN)/python -m mailrelay_sandbox.demo --compare-naive

demo-persistent: setup
	$(BIN)/python -m mailrelay_sandbox.demo --spool persistent

bench: setup
	$(BIN)/python -m bench

dashboards: venv
	$(BIN)/python dashboards/generate.py

crds:
	cp crds/mailrelay.yaml charts/mailrelay-operator/crds/mailrelay.yaml

e2e-kind: setup
	bash tests/e2e/kind/run.sh

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache build *.egg-info sandbox/*.egg-info
