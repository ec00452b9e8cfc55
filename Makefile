# The two commands of the README: `make demo` (main job) and `make test` (whole suite).
# Both set up everything they need on a fresh machine; heavy pieces are cached under
# $(KVMESH_CACHE) keyed by version and rebuilt only when missing.
PYTHON ?= python3
VENV := .venv
export KVMESH_CACHE ?= $(HOME)/.cache/kvmesh

.PHONY: demo test bench setup consumers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

consumers:
	bash tests/consumers/setup_envs.sh

demo: setup
	$(VENV)/bin/kvmesh demo

test: setup consumers
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

# Benchmarks print figures next to a baseline measured in the same run; not part of `test`.
bench: setup
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(VENV)/bin/python bench/mutate.py

clean:
	rm -rf $(VENV)
