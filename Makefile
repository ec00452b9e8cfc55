# The two commands of the README: `make demo` (main job) and `make test` (whole suite).
# Both set up everything they need on a fresh machine; heavy pieces are cached under
# $(KVMESH_CACHE) keyed by version and rebuilt only when missing.
PYTHON ?= python3
VENV := .venv
export KVMESH_CACHE ?= $(HOME)/.cache/kvmesh

.PHONY: demo test bench setup consumers cluster system-packages clean image images node node-if-supported test-node

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

consumers:
	bash tests/consumers/setup_envs.sh

cluster:
	bash cluster/build.sh

demo: setup cluster
	$(VENV)/bin/kvmesh demo

# redis-server: the real lookup service for the controller's tests; prometheus (+ promtool):
# runs the dashboard's and alerts' queries (Debian packages).
system-packages:
	command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null)
	command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

test: setup consumers cluster system-packages node-if-supported
	KVMESH_REQUIRE_CLUSTER=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider

# Benchmarks print figures next to a baseline measured in the same run; not part of `test`.
bench: setup cluster system-packages
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(VENV)/bin/python bench/mutate.py
	$(VENV)/bin/python bench/purge.py
	$(VENV)/bin/python bench/membership.py
	$(VENV)/bin/python bench/adversarial.py

# The kvmesh image as one tarball (OCI layout + docker archive) under $(KVMESH_CACHE)/images,
# built without a daemon or registry (root, mmdebstrap); `docker build .` builds the same from
# ./Containerfile. See docs/images.md.
image:
	command -v mmdebstrap >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null)
	$(PYTHON) images/build.py kvmesh

# + the redis-mode lookup image (Debian's redis-server).
images: image
	$(PYTHON) images/build.py redis

# A real node's pieces (kvmesh/local/node.py): Debian's containerd/runc/CNI/iptables,
# kubelet + kube-proxy + CoreDNS + pause from Go modules, the pause image, and kube-router's
# policy controller (test-only: enforces NetworkPolicies inside the node's namespace).
node: cluster images
	bash cluster/node-build.sh --packages
	bash cluster/node-build.sh >/dev/null
	$(PYTHON) images/build.py pause --binary "$$(bash cluster/node-build.sh --check | tail -1)/pause"
	bash cluster/kube-router-build.sh >/dev/null

# `make test` builds the node and images too, unless the machine cannot run a node at all
# (not root, or no network/mount namespaces): then tests/node skips and says why.
node-if-supported: setup
	@why="$$($(VENV)/bin/python -c 'from kvmesh.local.node import platform_unsupported as p; print(p() or "")')"; \
	if [ -z "$$why" ]; then $(MAKE) --no-print-directory node; else echo "make: no real node here: $$why"; fi

# Only the image and real-node tests, with everything they need built first.
test-node: setup node
	KVMESH_REQUIRE_NODE=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/images tests/node

clean:
	rm -rf $(VENV)
