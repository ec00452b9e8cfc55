# The session fixture `stack` (kvmesh on the local control plane) lives in tests/conftest.py:
# tests/p2p uses the same one.
