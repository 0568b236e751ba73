# The two commands of the README: `make repro` (the main job) and `make test` (the test suite).
# Both install what is missing first (scripts/setup.sh) and are safe to run again.
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
# DVC must not try to reach the network (analytics, update checks).
export DVC_NO_ANALYTICS := 1
export DVC_NO_UPDATER := 1

.PHONY: setup repro test test-fast lint lock gpu-check gpu-wheels lab

setup:
	@bash scripts/setup.sh

repro: setup
	@bash scripts/repro.sh

# The report in JupyterLab; as root the server refuses to start without --allow-root.
lab: setup
	jupyter lab $$([ "$$(id -u)" = 0 ] && echo --allow-root) reports/output/report.ipynb

test: setup
	python -m pytest -q

# The inner loop: everything but the end-to-end (slow) tests, about a minute.
test-fast: setup
	python -m pytest -q -m "not slow"

# Regenerate requirements.lock (uv pip compile, with hashes, for Python 3.11.7 on x86-64 Linux)
# after changing a dependency in pyproject.toml; pins already in the lock are kept where they
# still fit (uv reads the old file). Then `make setup` installs exactly that.
lock: setup
	uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11.7 \
		--python-platform x86_64-manylinux_2_28 -o requirements.lock

lint: setup
	ruff check metapool data_pipelines experiments tests

# The prepared GPU check (issue #17): run on the GPU machine, results in reports/benchmarks/gpu.
# Needs no venv there: the machine's python3 plus the wheels of `make gpu-wheels` (made here).
GPU_CHECK_OUT ?= reports/benchmarks/gpu
gpu-check:
	PYTHON=$${PYTHON:-python3} bash scripts/gpu_check.sh $(GPU_CHECK_OUT)

gpu-wheels: setup
	bash scripts/gpu_wheels.sh
