# Flywheel — `make demo` runs the loop on the embedded default, `make test` runs the tests.
# Both create .venv/ at the repo root and install the locked dependencies (compiled bytecode) first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8
STAMP  := $(VENV)/.installed

.PHONY: install parts engine postgres demo test test-unit test-integration bench lock lint clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -q -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The machine parts some integration tests use, from Debian's packages when missing and we may install them (root and
# apt-get): a Docker-compatible engine for the `docker` serving target's tests (podman, its Docker API; runc;
# debootstrap) and PostgreSQL's server binaries (/usr/lib/postgresql/*/bin/initdb) for the scale-out tests. Without
# them those tests skip and say why; under CI=true they fail and name the package to install.
ENGINE_PKGS := podman runc debootstrap
APT_INSTALL = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing (Debian packages) for $(1)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1; } || \
	  echo "could not install$$missing: $(1) will skip (fail under CI=true)"; \
	else echo "missing$$missing (not root, or no apt-get): $(1) will skip (fail under CI=true)"; fi

parts: engine postgres

engine:
	@missing=""; for c in $(ENGINE_PKGS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	$(call APT_INSTALL,the docker-target tests)

postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && id postgres >/dev/null 2>&1; then exit 0; fi; \
	missing=" postgresql"; \
	$(call APT_INSTALL,the PostgreSQL tests); \
	ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null || true

# Headless Chromium (Debian's package) for the browser tests of the Prefect and MLflow UIs; Playwright's Python
# client that drives it is in the test extra (requirements.lock).
.PHONY: browser
browser:
	@if [ -x /usr/bin/chromium ]; then exit 0; fi; \
	missing=" chromium"; \
	$(call APT_INSTALL,the browser tests)

demo: install
	$(BIN)/flywheel demo

# Quick tests first (unit, then integration, then e2e: pyproject's testpaths); the 15 slowest are listed at the end.
test: install parts browser
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest tests/unit

test-integration: install parts
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
