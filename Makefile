# detseg — every target sets up what it needs, idempotently.
#   make serve   set up the venv, generate the gRPC code, serve (official weights; see README)
#   make test    set up, lint (ruff), type-check (mypy), run every test
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO := protos/detseg/v1/detseg.proto
GEN := service/api/gen
GEN_STAMP := $(GEN)/.generated
MODELS ?= auto
PYTEST_ARGS ?=

.PHONY: venv proto serve serve-test test lint typecheck unit integration clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[triton,dev]'
	touch $@

proto: $(GEN_STAMP)
# protoc's virtual-path mapping places the code in the service.api.gen package with matching imports.
$(GEN_STAMP): $(PROTO) $(STAMP)
	rm -rf $(GEN) && mkdir -p $(GEN)/detseg/v1
	$(BIN)/python -m grpc_tools.protoc -I$(GEN)=protos \
		--python_out=. --grpc_python_out=. --pyi_out=. $(GEN)/detseg/v1/detseg.proto
	touch $(GEN)/__init__.py $(GEN)/detseg/__init__.py $(GEN)/detseg/v1/__init__.py
	touch $@

serve: proto
	$(BIN)/detseg serve --models $(MODELS)

serve-test: proto
	$(BIN)/detseg serve --models test

lint: venv
	$(BIN)/ruff check service tests model_repository
	$(BIN)/ruff format --check service tests model_repository

typecheck: proto
	$(BIN)/mypy service

test: proto lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: proto
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: proto
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

clean:
	rm -rf $(GEN) .pytest_cache .mypy_cache .ruff_cache
