# The two commands of the README: `make demo` (main job) and `make test` (whole suite).
# Both set up everything they need on a fresh machine; heavy pieces are cached under
# $(KVMESH_CACHE) keyed by version and rebuilt only when missing.
PYTHON ?= python3
VENV := .venv
export KVMESH_CACHE ?= $(HOME)/.cache/kvmesh

.PHONY: demo test setup consumers clean

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

clean:
	rm -rf $(VENV)
