# Flywheel — `make demo` runs the loop on the embedded default, `make test` runs the tests.
# Both create .venv/ at the repo root and install the locked dependencies (compiled bytecode) first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8
STAMP  := $(VENV)/.installed

.PHONY: install engine demo test test-unit test-integration bench lock lint clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -q -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# A Docker-compatible engine for the `docker` serving target's tests: podman (its Docker API), runc and debootstrap,
# from Debian's packages when missing and we may install them; otherwise those tests skip and say why.
ENGINE_PKGS := podman runc debootstrap
engine:
	@missing=""; for c in $(ENGINE_PKGS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing (Debian packages) for the docker-target tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1; } || \
	  echo "could not install$$missing: the docker-target tests will skip"; \
	else echo "missing$$missing (not root, or no apt-get): the docker-target tests will skip"; fi

demo: install
	$(BIN)/flywheel demo

test: install engine
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest tests/unit

test-integration: install engine
	$(BIN)/pytest tests/integration

bench: install
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check flywheel tasks flows deployments tests bench infra

# Re-resolve the lock file after changing dependencies in pyproject.toml.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra test --python 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .flywheel
