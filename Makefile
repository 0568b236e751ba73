# The two commands of the README: `make repro` (the main job) and `make test` (the test suite).
# Both install what is missing first (scripts/setup.sh) and are safe to run again.
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
# DVC must not try to reach the network (analytics, update checks).
export DVC_NO_ANALYTICS := 1
export DVC_NO_UPDATER := 1

.PHONY: setup repro test test-fast lint

setup:
	@bash scripts/setup.sh

repro: setup
	dvc repro

test: setup
	python -m pytest -q

# The inner loop: everything but the end-to-end (slow) tests, about a minute.
test-fast: setup
	python -m pytest -q -m "not slow"

lint: setup
	ruff check metapool data_pipelines experiments tests
