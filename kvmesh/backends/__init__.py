"""Clients of the lookup tier, one module per backend, named for what it talks to; they import
only kvmesh.core.

redis mode: redis_index (AddressIndex: the reverse index kept from keyspace notifications,
purge, reconcile), built on redis_scripts (key layout, Lua scripts) and resp (the subscription's
RESP reader). controller mode: lmcache_controller (deregister a dead pod's workers).
"""
