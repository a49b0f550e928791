# StakePro developer commands. Every target sets up what it needs (scripts/devenv.sh):
# the virtualenv, and Redis/PostgreSQL at REDIS_URL/DATABASE_URL (reused when they answer,
# otherwise our own are started with their data in .data/).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# The set-up steps may call apt-get: never run them side by side.
.NOTPARALLEL:

VENV := .venv
PY := $(VENV)/bin/python
DEVENV := scripts/devenv.sh

# One default for devenv.sh and the server, so both talk to the same services.
REDIS_URL ?= redis://127.0.0.1:6379/0
DATABASE_URL ?= postgresql://root@127.0.0.1:5432/stakepro
export REDIS_URL DATABASE_URL
# HOST, PORT, ADMIN_TOKEN and PYTEST_ARGS pass through from the environment or command line;
# unset ones are left unset so the server's own defaults apply.
$(foreach v,HOST PORT ADMIN_TOKEN,$(if $(filter undefined,$(origin $(v))),,$(eval export $(v))))
PYTEST_ARGS ?=

.PHONY: help venv services setup run test lint audit rebuild-balances stop clean lock update-deps

help:
	@echo "make run | test | lint | audit | rebuild-balances | setup | stop | clean | lock | update-deps"

venv:
	@$(DEVENV) venv

services:
	@$(DEVENV) services

setup:
	@$(DEVENV) venv
	@$(DEVENV) services

# The local demo: what a deployment keeps off (python -m stakepro alone), make run turns on.
run: setup
	@[ -n "$${ADMIN_TOKEN:-}" ] || echo "make run: ADMIN_TOKEN not set: using 'dev-admin-token'"
	@[ -n "$${DEMO_MODE:-}" ] || echo "make run: DEMO_MODE not set: DEMO_MODE=true (local demo)"
	ADMIN_TOKEN="$${ADMIN_TOKEN:-dev-admin-token}" DEMO_MODE="$${DEMO_MODE:-true}" \
	  exec $(PY) -m stakepro

# The tests create their own database on the PostgreSQL server and start their own Redis
# on a free port (so the redis-server binary must exist even when a Redis is reused).
test: setup
	@$(DEVENV) redis-bin
	@$(DEVENV) rabbitmq
	@$(DEVENV) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/deptry .
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# The import contracts (pyproject.toml [tool.importlinter]) and declared dependencies too.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/deptry .

audit: setup
	$(PY) -m ops.audit

rebuild-balances: setup
	$(PY) -m ops.rebuild

stop:
	@$(DEVENV) stop-own

clean: stop
	rm -rf .data

# requirements.lock pins every package (main and dev) with its hashes; `make venv` installs
# exactly that. `make lock` re-resolves after pyproject.toml changed and keeps every pin it
# can; `make update-deps` moves every package to its newest release that the ranges allow.
UV_VERSION := 0.13.9
LOCK_CMD = $(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes \
	--universal --python-version 3.11 -o requirements.lock -q

$(VENV)/bin/uv: | venv
	$(PY) -m pip install -q --disable-pip-version-check 'uv==$(UV_VERSION)'

lock: $(VENV)/bin/uv
	$(LOCK_CMD)

update-deps: $(VENV)/bin/uv
	$(LOCK_CMD) --upgrade
	@$(DEVENV) venv
