"""Deregister a dead pod's LMCache workers from ``lmcache_controller`` at once (controller mode,
lmcache 0.3.7 → 0.5.x; docs/lmcache-contract.md, "controller mode" and "Known upstream limits
kvmesh works around or refuses").

LMCache's controller has no HTTP deregister endpoint. Its ZMQ PULL socket (``--monitor-ports``
``"pull"``) accepts, besides msgpack, JSON parts: a part starting with ``{`` is decoded with
``msgspec.convert(json.loads(part), type=Msg)`` (lmcache 0.5.6
``cache_controller/controller_manager.py`` L340–356). ``Msg`` is a union of msgspec Structs
declared with ``tag=True``, so the tag field is ``"type"`` and its value the class name; the
``DeRegisterMsg`` schema (``cache_controller/message.py`` L70–76) is::

    {"type": "DeRegisterMsg", "instance_id": str, "worker_id": int, "ip": str, "port": int}

Only ``instance_id`` and ``worker_id`` matter (``registration_controller.py`` L172–190); ip/port
are informational. An unknown worker is a logged no-op.

**Never push anything malformed.** ``handle_batched_push_request`` has no try/except around the
decode: one part failing ``msgspec.convert`` ends the controller's PULL loop for good (no more
KV admits/evicts or deregistrations until it restarts). ``deregister_msg`` therefore validates
every field strictly before anything is sent.

Listing: ``GET /controller/workers?instance_id=<id>`` is read fresh from the registry; the "all"
listing (no instance_id) goes through a 30 s TTL cache, so this module always asks per instance.

The trap (docs/lmcache-contract.md, "controller mode", the instance id row): a ``RegisterMsg``
for an ``(instance_id, worker_id)`` that is already registered is skipped ("already registered,
skip registration"): the controller clears that worker's KV set but keeps the OLD
ip/port/peer_init_url. kvmesh never meets it: instance ids come from the pod's
uid wherever names are reused (StatefulSets, fixed-name pods), and every departure, a container
restart included, deregisters all of the incarnation's ranks.

This module talks plain pyzmq + JSON + aiohttp; it must never import lmcache or torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Optional, Sequence

import aiohttp
import zmq
import zmq.asyncio

log = logging.getLogger("kvmesh.lmcache_ctrl")

DEFAULT_SEND_TIMEOUT_S = 2.0
DEFAULT_LINGER_MS = 1000
DEFAULT_HTTP_TIMEOUT_S = 5.0


# Cap on one HTTP reply of lmcache_controller (its per-instance worker listing).
MAX_HTTP_REPLY_BYTES = 8 << 20


class LMCacheControllerError(RuntimeError):
    """Talking to lmcache_controller failed, or it answered something unexpected."""


class ControllerUnreachable(LMCacheControllerError):
    """No connection to the controller's PULL (ZMQ) or HTTP endpoint within the timeout."""


class DeregistrationNotConfirmed(LMCacheControllerError):
    """The workers were pushed a DeRegisterMsg but are still listed after the timeout."""


# --------------------------------------------------------------------------------------------
# Pure helpers: addresses, message schema
# --------------------------------------------------------------------------------------------

def zmq_endpoint(url: str) -> tuple[str, bool]:
    """``host:port`` (LMCache's own form) or ``tcp://host:port`` → (``tcp://host:port``, ipv6)."""
    rest = url[len("tcp://"):] if url.startswith("tcp://") else url
    if "://" in rest:
        raise ValueError(f"controller PULL url must be host:port or tcp://host:port, got {url!r}")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"controller PULL url must be host:port or tcp://host:port, got {url!r}")
    ipv6 = False
    if host.startswith("[") and host.endswith("]"):
        ipv6 = True
    elif ":" in host:  # bare IPv6 literal
        host, ipv6 = f"[{host}]", True
    return f"tcp://{host}:{port}", ipv6


def http_base(url: str) -> str:
    """``host:port`` or ``http(s)://host:port[/]`` → ``http(s)://host:port``."""
    url = url.rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass; msgspec rejects it for int fields


def deregister_msg(instance_id: str, worker_id: int, ip: str, port: int) -> dict:
    """One ``DeRegisterMsg`` as the JSON object lmcache's PULL socket decodes (strictly checked)."""
    if not isinstance(instance_id, str) or not instance_id:
        raise ValueError(f"instance_id must be a non-empty str, got {instance_id!r}")
    if not _is_int(worker_id) or worker_id < 0:
        raise ValueError(f"worker_id must be an int >= 0, got {worker_id!r}")
    if not isinstance(ip, str):
        raise ValueError(f"ip must be a str, got {ip!r}")
    if not _is_int(port) or not 0 <= port < 65536:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    return {"type": "DeRegisterMsg", "instance_id": instance_id, "worker_id": worker_id,
            "ip": ip, "port": port}


def port_for(worker_id: int, index: int, worker_ids: Sequence[int], ports: Sequence[int]) -> int:
    """The LMCache worker port of ``worker_id``: ``ports`` paired positionally with
    ``worker_ids`` when the lengths match, else indexed by rank (``LMCACHE_LMCACHE_WORKER_PORTS``
    order). The controller ignores it for deregistration; 0 when unknown."""
    if len(ports) == len(worker_ids):
        return ports[index]
    if worker_id < len(ports):
        return ports[worker_id]
    return 0


def encode_deregister(instance_id: str, worker_ids: Sequence[int], ip: str,
                      ports: Sequence[int]) -> list[bytes]:
    """One JSON part per rank, validated before anything is sent."""
    if isinstance(worker_ids, (str, bytes)) or not worker_ids:
        raise ValueError(f"worker_ids must be a non-empty list of ints, got {worker_ids!r}")
    worker_ids = list(worker_ids)
    if len(set(worker_ids)) != len(worker_ids):
        raise ValueError(f"duplicate worker_ids: {worker_ids!r}")
    ports = list(ports)
    parts = []
    for i, wid in enumerate(worker_ids):
        port = port_for(wid, i, worker_ids, ports) if _is_int(wid) else 0
        msg = deregister_msg(instance_id, wid, ip, port)
        parts.append(json.dumps(msg, separators=(",", ":")).encode())
    return parts


# --------------------------------------------------------------------------------------------
# ZMQ push
# --------------------------------------------------------------------------------------------

_ctx: Optional[zmq.asyncio.Context] = None


def _context() -> zmq.asyncio.Context:
    global _ctx
    if _ctx is None or _ctx.closed:
        _ctx = zmq.asyncio.Context()
    return _ctx


async def _push(pull_url: str, parts: list[bytes], *, timeout: float, linger_ms: int,
                what: str) -> None:
    """Send ``parts`` as one multipart message (processed in order by the controller).

    ``IMMEDIATE`` keeps the message out of the queue until a ZMTP handshake completed, so a
    controller that is down (or a port that is not a ZMQ PULL) makes the send time out instead
    of queueing silently; ``LINGER`` bounds how long an unsent message is kept after close."""
    endpoint, ipv6 = zmq_endpoint(pull_url)
    sock = _context().socket(zmq.PUSH)
    try:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
        sock.setsockopt(zmq.LINGER, linger_ms)
        if ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(endpoint)
            await asyncio.wait_for(sock.send_multipart(parts), timeout + 0.5)
        except (zmq.Again, asyncio.TimeoutError):
            raise ControllerUnreachable(
                f"lmcache_controller PULL socket {endpoint} not reachable within {timeout:g}s "
                f"(controller down, wrong port, or not a ZMQ PULL); {what} NOT sent") from None
        except zmq.ZMQError as e:
            raise LMCacheControllerError(f"ZMQ error pushing {what} to {endpoint}: {e}") from e
    finally:
        sock.close(linger=linger_ms)


async def deregister(pull_url: str, instance_id: str, worker_ids: list[int], ip: str,
                     ports: list[int], *, timeout: float = DEFAULT_SEND_TIMEOUT_S,
                     linger_ms: int = DEFAULT_LINGER_MS) -> None:
    """Push one JSON ``DeRegisterMsg`` per rank to the controller's PULL socket.

    ``ports``: the pod's ``LMCACHE_LMCACHE_WORKER_PORTS`` (indexed by rank) or one port per
    entry of ``worker_ids``. Raises ``ValueError`` (nothing sent) on malformed input and
    ``ControllerUnreachable`` within ~``timeout`` s when the controller does not accept the
    connection. Success means "handed to a connected PULL peer", not "processed": use
    ``deregister_and_confirm`` for that."""
    parts = encode_deregister(instance_id, worker_ids, ip, ports)
    await _push(pull_url, parts, timeout=timeout, linger_ms=linger_ms,
                what=f"DeRegisterMsg for {instance_id!r} workers {list(worker_ids)}")
    log.info("pushed DeRegisterMsg for %s workers %s to %s", instance_id, list(worker_ids), pull_url)


# --------------------------------------------------------------------------------------------
# HTTP listing
# --------------------------------------------------------------------------------------------

async def _get_json(session: aiohttp.ClientSession, method: str, url: str, *,
                    timeout: float, **kw) -> tuple[int, Any]:
    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout),
                                   **kw) as resp:
            # Bounded: the endpoint is reached at an address pods can influence. The listing of
            # one instance's workers is a few hundred bytes per rank.
            raw = bytearray()
            async for chunk in resp.content.iter_any():
                raw += chunk
                if len(raw) > MAX_HTTP_REPLY_BYTES:
                    raise LMCacheControllerError(
                        f"lmcache_controller HTTP {url} replied with more than "
                        f"{MAX_HTTP_REPLY_BYTES >> 20} MiB; not the controller kvmesh runs")
            text = raw.decode("utf-8", "replace")
            try:
                body = json.loads(text) if text else None
            except (ValueError, RecursionError):
                body = text
            return resp.status, body
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
        raise ControllerUnreachable(f"lmcache_controller HTTP {url} unreachable: {e!r}") from e
    except aiohttp.ClientError as e:
        raise LMCacheControllerError(f"lmcache_controller HTTP {url} failed: {e!r}") from e


async def _query_worker_info(session: aiohttp.ClientSession, base: str,
                             instance_id: Optional[str], timeout: float) -> list[dict]:
    """``POST /query_worker_info`` (older controllers without ``/controller/workers``; no key_count)."""
    url = f"{base}/query_worker_info"
    status, body = await _get_json(session, "POST", url, timeout=timeout,
                                   json={"instance_id": instance_id or "all"})
    if status != 200 or not isinstance(body, dict) or "worker_infos" not in body:
        raise LMCacheControllerError(f"POST {url} -> {status}: {body!r}")
    return list(body["worker_infos"])


async def workers(http_url: str, instance_id: Optional[str] = None, *,
                  timeout: float = DEFAULT_HTTP_TIMEOUT_S,
                  session: Optional[aiohttp.ClientSession] = None) -> list[dict]:
    """Registered workers (``instance_id, worker_id, ip, port, peer_init_url, registration_time,
    last_heartbeat_time, key_count``). Per-instance queries are fresh (``[]`` if the instance is
    unknown); without ``instance_id`` the controller answers from a 30 s TTL cache."""
    if session is None:
        async with aiohttp.ClientSession() as s:
            return await workers(http_url, instance_id, timeout=timeout, session=s)
    base = http_base(http_url)
    url = f"{base}/controller/workers"
    params = {"instance_id": instance_id} if instance_id is not None else None
    status, body = await _get_json(session, "GET", url, timeout=timeout, params=params)
    if status == 200 and isinstance(body, dict) and isinstance(body.get("workers"), list):
        return body["workers"]
    detail = body.get("detail") if isinstance(body, dict) else None
    if status == 404 and detail == "Not Found":  # the route itself is missing: older controller
        return await _query_worker_info(session, base, instance_id, timeout)
    if status == 404 and instance_id is not None:  # "No workers found for instance <id>"
        return []
    raise LMCacheControllerError(f"GET {url} (instance_id={instance_id!r}) -> {status}: {body!r}")


# --------------------------------------------------------------------------------------------
# Deregister and confirm
# --------------------------------------------------------------------------------------------

async def deregister_and_confirm(pull_url: str, http_url: str, instance_id: str,
                                 worker_ids: Optional[list[int]] = None,
                                 ip: Optional[str] = None, ports: Optional[list[int]] = None, *,
                                 timeout: float = 10.0, poll_interval: float = 0.05,
                                 resend_after: float = 1.0,
                                 send_timeout: float = DEFAULT_SEND_TIMEOUT_S,
                                 linger_ms: int = DEFAULT_LINGER_MS) -> float:
    """Deregister, then poll ``GET /controller/workers?instance_id=`` until none of
    ``worker_ids`` is listed; re-push for those still listed every ``resend_after`` s.
    Returns the seconds it took.

    ``worker_ids=None``: every worker currently registered for the instance (0.0 if none).
    ``ip``/``ports`` default to the controller's own record of each worker.
    Raises ``ControllerUnreachable`` if the first push fails, ``DeregistrationNotConfirmed``
    after ``timeout`` s otherwise."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    async with aiohttp.ClientSession() as session:
        records: dict[int, dict] = {}
        if worker_ids is None or ip is None or ports is None:
            records = {r["worker_id"]: r for r in
                       await workers(http_url, instance_id, timeout=timeout, session=session)}
        if worker_ids is None:
            worker_ids = sorted(records)
            if not worker_ids:
                return 0.0
        worker_ids = list(worker_ids)
        targets = []  # (worker_id, ip, port)
        for i, wid in enumerate(worker_ids):
            rec = records.get(wid, {})
            w_ip = ip if ip is not None else rec.get("ip", "")
            if ports is not None:
                w_port = port_for(wid, i, worker_ids, ports) if _is_int(wid) else 0
            else:
                w_port = rec.get("port", 0)
            targets.append((wid, w_ip, w_port))

        async def push(wids: set[int]) -> None:
            parts = [json.dumps(deregister_msg(instance_id, wid, w_ip, w_port),
                                separators=(",", ":")).encode()
                     for wid, w_ip, w_port in targets if wid in wids]
            await _push(pull_url, parts, timeout=send_timeout, linger_ms=linger_ms,
                        what=f"DeRegisterMsg for {instance_id!r} workers {sorted(wids)}")

        # validate everything before the first send
        for wid, w_ip, w_port in targets:
            deregister_msg(instance_id, wid, w_ip, w_port)
        await push(set(worker_ids))
        last_push = time.monotonic()
        pushes, last_err = 1, None
        while True:
            try:
                listed = await workers(http_url, instance_id, timeout=max(0.1, min(
                    DEFAULT_HTTP_TIMEOUT_S, deadline - time.monotonic())), session=session)
                present = {r["worker_id"] for r in listed} & set(worker_ids)
                last_err = None
                if not present:
                    took = time.monotonic() - t0
                    log.info("deregistered %s workers %s in %.3fs (%d push(es))",
                             instance_id, worker_ids, took, pushes)
                    return took
            except LMCacheControllerError as e:  # transient HTTP trouble: keep trying until deadline
                present, last_err = set(worker_ids), e
            now = time.monotonic()
            if now >= deadline:
                raise DeregistrationNotConfirmed(
                    f"{instance_id!r} workers {sorted(present)} still listed by {http_url} "
                    f"{timeout:g}s after {pushes} DeRegisterMsg push(es)"
                    + (f"; last listing error: {last_err}" if last_err else ""))
            if now - last_push >= resend_after:
                try:
                    await push(present)
                    pushes += 1
                except LMCacheControllerError as e:
                    last_err = e
                last_push = time.monotonic()
            await asyncio.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
