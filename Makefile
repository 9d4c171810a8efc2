# harmony-agent: `make demo` runs the live 3-site demo, `make test` the whole gate.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PKGS := agent mesh scores topologies

.PHONY: demo test lint typecheck pytest soak bench bench-apps bench-netns bench-all bench-cli man clean image image-base image-cold

$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/activate

demo: $(BIN)/activate
	$(BIN)/harmony-agent demo

lint: $(BIN)/activate
	$(BIN)/ruff check $(PKGS) tests bench
	$(BIN)/ruff format --check $(PKGS) tests bench
	$(BIN)/lint-imports

typecheck: $(BIN)/activate
	$(BIN)/mypy

# Each failover scenario runs HARMONY_SOAK_RUNS times in `make test` (3: several runs of
# every scenario, and the whole suite within 20 minutes on 2 cores); `make soak` runs only
# the scenarios, 25 times each.
HARMONY_SOAK_RUNS ?= 3
export HARMONY_SOAK_RUNS

pytest: $(BIN)/activate
	$(BIN)/pytest -q -ra --durations=25 $(PYTEST_ARGS)

test: lint typecheck pytest

# The failover scenarios 25 times each, and the soak of hundreds of applications
# (tests/failover/test_soak_apps.py, skipped unless HARMONY_SOAK=1).
soak: $(BIN)/activate
	HARMONY_SOAK_RUNS=25 HARMONY_SOAK=1 $(BIN)/pytest -q -ra -m slow $(PYTEST_ARGS)

# Benchmarks (docs/benchmarks.md has one command per table; each writes bench/results/).
# bench: loopback, a few minutes; bench-apps: 1,000 applications at ttl 2 s and 10 s
# (root: kernel process events); bench-netns: application failover on three network
# namespace sites (root), the runs docs/benchmarks.md reports. Every script exits 1 when
# a target is missed: make goes on (-) so one miss does not hide the other tables.
bench: $(BIN)/activate
	-$(BIN)/python bench/footprint.py
	-$(BIN)/python bench/cli.py
	-$(BIN)/python bench/leases.py
	-$(BIN)/python bench/failover.py

bench-apps: $(BIN)/activate
	-$(BIN)/python bench/apps.py --apps 1000 --ttl 2,10 --idle 30

bench-netns: $(BIN)/activate
	-$(BIN)/python bench/app_failover.py --fresh --runs 20 --ttl 2,10 --scenario bystander
	-$(BIN)/python bench/app_failover.py --runs 30 --ttl 2 --scenario led-cut
	-$(BIN)/python bench/app_failover.py --runs 5 --ttl 2,10 --scenario crash,cut,planned

bench-all: bench bench-apps bench-netns

# Container image (Containerfile), from Debian packages and wheels only (deploy/image/build.sh).
# image-base: the Debian bookworm root file system, debootstrapped once into
#   $(HARMONY_IMAGE_CACHE) (cold: about 1-2 minutes; cached: seconds). The image test in
#   `make test` needs it and skips without it; .ci/run runs this target first.
# image: the base (cached), the project's wheel and its dependencies, `podman build`.
# image-cold: the whole build from an empty cache (a throw-away one; the shared cache stays).
HARMONY_IMAGE_CACHE ?= /var/cache/harmony-image
export HARMONY_IMAGE_CACHE

image-base: $(BIN)/activate
	deploy/image/build.sh base

image: $(BIN)/activate
	deploy/image/build.sh image

image-cold: $(BIN)/activate
	cache=$$(mktemp -d /var/tmp/harmony-image-cold.XXXXXX) && \
	podman --runtime runc --cgroup-manager cgroupfs rmi "$$(HARMONY_IMAGE_CACHE=$$cache deploy/image/build.sh base-tag)" >/dev/null 2>&1; \
	HARMONY_IMAGE_CACHE=$$cache deploy/image/build.sh image; rc=$$?; rm -rf "$$cache"; exit $$rc

# CLI start-up and round trips against a live agent (issue 15): bench/results/cli.json.
bench-cli: $(BIN)/activate
	$(BIN)/python bench/cli.py

# Man pages generated from the command tree (tests/cli/test_manpages.py checks they are current).
man: $(BIN)/activate
	$(BIN)/python -m agent.cli.manpages docs/man

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
