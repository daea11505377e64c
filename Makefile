# Two commands for a fresh machine: `make run` (set up everything, start the app) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run test bench doctor clean web

setup:
	@bash scripts/setup.sh

run: setup
	bash scripts/run.sh --host $(HOST) --port $(PORT) $(if $(ROLE),--role $(ROLE))

test: setup
	$(PY) -m pytest --cov=avatarchat --cov-report=term --cov-fail-under=80 $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run_all.py

doctor: setup
	$(VENV)/bin/avatarchat doctor

clean:
	rm -rf $(VENV) .pytest_cache .coverage

# The web app alone (issue 4): npm ci when the lock changed, build when stale (setup does this too).
web:
	@bash scripts/web_build.sh
