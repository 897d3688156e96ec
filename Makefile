# Flywheel — `make demo` runs the loop on the embedded default, `make test` runs the tests.
# Both create .venv/ at the repo root and install the locked dependencies (compiled bytecode) first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration bench lock lint clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -q -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/flywheel demo

test: install
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest tests/unit

test-integration: install
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
