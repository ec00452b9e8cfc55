# The session-wide devcluster and per-test namespace fixtures live in tests/conftest.py.
