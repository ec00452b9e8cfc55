"""Client for LMCache's MP-mode coordinator (``lmcache coordinator``; `mp` mode, lmcache >= 0.5.0,
every fact below read in the lmcache 0.5.6 wheel).

The coordinator is a FastAPI app (``lmcache/v1/mp_coordinator/app.py``) that keeps the fleet's
membership in memory (``views/instance_registry.py``). Each ``lmcache server`` started with
``--coordinator-url`` registers itself, heartbeats and deregisters on a clean shutdown
(``mp_coordinator/registrar.py:79-159``, started from ``multiprocess/http_server.py:127-143``).
Its P2P controller polls ``GET /instances`` at the heartbeat interval and keeps one L2 adapter
per listed peer (``multiprocess/modules/p2p_controller.py:425-453``). kvmesh uses three routes:

- ``GET /instances`` -> ``{"instances": [{instance_id, ip, http_port, registration_time,
  metadata, p2p_advertised_url, mq_port}, ...]}`` (``http_apis/instances_api.py:123-142``).
- ``DELETE /instances/{instance_id}`` -> 204 with an empty body, whether or not the id was
  registered (``instances_api.py:98-120``); the registry pops it under a lock
  (``instance_registry.py:96-107``), so a ``GET`` answered after the 204 no longer lists it.
- ``GET /healthz`` -> ``{"status": "healthy"}`` (``http_apis/health_api.py:13-20``), served once
  uvicorn finished the app's lifespan startup (``app.py:198-254``): a readiness check.

A deleted server that is still running re-registers at its next heartbeat: the heartbeat
``PUT /instances/{id}/heartbeat`` gets a 404 (``instances_api.py:77-95``) and the registrar drops
its id and registers again (``registrar.py:138-147``). So ``DELETE`` is only meaningful for an
incarnation that is dead, and a confirmation that finds the id listed again means that
incarnation is still alive (``deregister_and_confirm`` says so).

Instance ids: the server registers exactly its ``--instance-id`` (``multiprocess/config.py:353-361``,
``:601``; ``http_server.py:136``; ``registrar.py:65-71``), a fresh UUID4 per process start when
the flag is absent (``multiprocess/config.py:115``, ``:601``). The coordinator strips surrounding whitespace
(``mp_coordinator/schemas.py:94``) and generates ``mp-<hex>`` for an empty id (``instances_api.py:53``). The
``DELETE`` route's ``{instance_id}`` cannot contain ``/`` (a Starlette path parameter), so such
ids are refused here before anything is sent.

Every call is bounded in time (one deadline over connect, send and the whole reply) and in size
(at most ``max_reply_bytes`` are read; no automatic decompression, no redirects, no proxies from
the environment), so a hostile or broken endpoint can neither hang the controller nor grow its
memory. Errors say what happened, to which coordinator, and what to do.

This module talks plain aiohttp + JSON; it must never import lmcache or torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

log = logging.getLogger("kvmesh.coordinator")

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_REPLY_BYTES = 4 * 1024 * 1024  # ~15 000 instances at ~280 bytes each
_SNIPPET = 200  # bytes of an unexpected reply quoted in an error


class CoordinatorError(RuntimeError):
    """Talking to the lmcache coordinator failed, or it answered something unexpected."""


class CoordinatorUnreachable(CoordinatorError):
    """No complete answer from the coordinator within the time bound (refused, reset, DNS,
    timeout)."""


class CoordinatorReplyError(CoordinatorError):
    """The coordinator answered, but not what an lmcache coordinator answers (status, shape,
    encoding, or size over the bound)."""


class ReplyTooLarge(CoordinatorReplyError):
    """The reply was longer than ``max_reply_bytes``; reading stopped there."""


class DeregistrationNotConfirmed(CoordinatorError):
    """``DELETE`` answered 204 but ``GET /instances`` still lists the id (re-registered by a
    still-running server, or the deadline passed)."""


@dataclass(frozen=True)
class Instance:
    """One registration, as ``GET /instances`` lists it (``instances_api.py:131-139``)."""

    instance_id: str
    ip: str
    http_port: int
    p2p_advertised_url: str = ""
    mq_port: int = 0
    registration_time: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def p2p(self) -> bool:
        """Whether peers build an adapter for it: the same filter as
        ``p2p_controller.py:445-452`` (advertise URL, ip and mq_port all set)."""
        return bool(self.p2p_advertised_url and self.ip and self.mq_port)

    @property
    def peer_mq_url(self) -> str:
        """Where peers send their lookups (``p2p_controller.py:588``, zmq transport)."""
        return f"tcp://{self.ip}:{self.mq_port}"


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------

def base_url(url: str) -> str:
    """``host:port`` or ``http(s)://host:port[/]`` -> ``http(s)://host:port`` (no path, query or
    credentials: the coordinator's routes are at the root)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"coordinator url must be a non-empty string, got {url!r}")
    raw = url.strip()
    if "://" not in raw:
        raw = f"http://{raw}"
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"coordinator url must be http(s)://host:port, got {url!r}")
    if not parts.hostname or parts.username or parts.password:
        raise ValueError(f"coordinator url must be http(s)://host:port without credentials, "
                         f"got {url!r}")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError(f"coordinator url must not carry a path, query or fragment "
                         f"(its routes are at the root), got {url!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"coordinator url has an invalid port: {url!r}") from None
    return f"{parts.scheme}://{parts.netloc}"


def check_instance_id(instance_id: str) -> str:
    """The id as the coordinator stores it, or ``ValueError`` if no registration can have it
    (empty, surrounding whitespace, ``/``, ``.``/``..``, control characters)."""
    if not isinstance(instance_id, str) or not instance_id:
        raise ValueError(f"instance_id must be a non-empty str, got {instance_id!r}")
    if instance_id != instance_id.strip():
        raise ValueError(f"instance_id {instance_id!r} has surrounding whitespace; the "
                         f"coordinator strips it at registration (lmcache 0.5.6 mp_coordinator/schemas.py:94), so no "
                         f"registration has this id")
    if "/" in instance_id or instance_id in (".", ".."):
        raise ValueError(f"instance_id {instance_id!r} cannot be addressed as "
                         f"DELETE /instances/{{instance_id}} (a path segment)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in instance_id):
        raise ValueError(f"instance_id {instance_id!r} contains control characters")
    return instance_id


def instance_url(base: str, instance_id: str) -> str:
    """``<base>/instances/<percent-encoded id>`` (every reserved character encoded, so the id is
    one path segment; ``.``/``..`` are refused above, so no normalization can change it)."""
    return f"{base}/instances/{urllib.parse.quote(check_instance_id(instance_id), safe='')}"


def _snippet(body: bytes) -> str:
    text = body[:_SNIPPET].decode("utf-8", errors="replace")
    return repr(text) + ("..." if len(body) > _SNIPPET else "")


def _int(v: Any) -> bool:
    return type(v) is int


def parse_instances(body: Any, where: str) -> list[Instance]:
    """``{"instances": [...]}`` -> instances, strictly: an entry that is not what
    ``instances_api.py:131-139`` produces is an error, not skipped. Fields a 0.4.7 coordinator
    does not send (``p2p_advertised_url``, ``mq_port``) default like LMCache's own reader
    (``p2p_controller.py:473-482``); unknown fields are ignored."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise CoordinatorReplyError(
            f"{where}: expected {{\"instances\": [...]}}, got {type(body).__name__} "
            f"{_snippet(json.dumps(body, default=str).encode())}; is this an lmcache "
            f"coordinator (`lmcache coordinator`, lmcache >= 0.5.0)?")
    out: list[Instance] = []
    for i, raw in enumerate(body["instances"]):
        def bad(what: str) -> CoordinatorReplyError:
            return CoordinatorReplyError(f"{where}: instances[{i}] {what}: "
                                         f"{_snippet(json.dumps(raw, default=str).encode())}")
        if not isinstance(raw, dict):
            raise bad("is not an object")
        iid, ip, http_port = raw.get("instance_id"), raw.get("ip"), raw.get("http_port")
        url, mq_port = raw.get("p2p_advertised_url", ""), raw.get("mq_port", 0)
        reg, meta = raw.get("registration_time", 0.0), raw.get("metadata", {})
        if not isinstance(iid, str) or not iid:
            raise bad("has no instance_id string")
        if not isinstance(ip, str):
            raise bad("has no ip string")
        if not _int(http_port) or not 0 <= http_port <= 65535:
            raise bad("has no http_port in [0, 65535]")
        if url is None:
            url = ""
        if not isinstance(url, str):
            raise bad("has a non-string p2p_advertised_url")
        if mq_port is None:
            mq_port = 0
        if not _int(mq_port) or not 0 <= mq_port <= 65535:
            raise bad("has no mq_port in [0, 65535]")
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg):
            raise bad("has a non-numeric registration_time")
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in meta.items()):
            raise bad("has metadata that is not a str -> str object")
        out.append(Instance(instance_id=iid, ip=ip, http_port=http_port, p2p_advertised_url=url,
                            mq_port=mq_port, registration_time=float(reg), metadata=dict(meta)))
    return out


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------

class Coordinator:
    """One coordinator's HTTP API. Use as ``async with Coordinator(url) as c:`` (or call
    ``close()``); a ``session`` passed in is used as is and not closed here (it should have
    ``auto_decompress=False``)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
                 session: Optional[aiohttp.ClientSession] = None):
        self.base = base_url(url)
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number > 0, got {timeout!r}")
        if not _int(max_reply_bytes) or max_reply_bytes < 1024:
            raise ValueError(f"max_reply_bytes must be an int >= 1024, got {max_reply_bytes!r}")
        self.timeout = float(timeout)
        self.max_reply_bytes = max_reply_bytes
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> "Coordinator":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No transparent decompression (a small gzip body must not inflate past the cap),
            # no proxies or .netrc from the environment (trust_env=False), headers bounded by
            # aiohttp's parser limits (8190 bytes per line/field).
            self._session = aiohttp.ClientSession(auto_decompress=False, trust_env=False,
                                                  headers={"Accept-Encoding": "identity"})
            self._own_session = True
        return self._session

    async def _request(self, method: str, url: str, *, what: str,
                       timeout: Optional[float] = None) -> tuple[int, bytes]:
        """(status, body) read within one deadline and at most ``max_reply_bytes``."""
        t = self.timeout if timeout is None else timeout
        cap = self.max_reply_bytes
        try:
            async with asyncio.timeout(t):
                async with self._get_session().request(
                        method, url, allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=t)) as resp:
                    enc = resp.headers.get("Content-Encoding", "identity").strip().lower()
                    if enc not in ("", "identity"):
                        raise CoordinatorReplyError(
                            f"{what}: reply is Content-Encoding {enc!r}, which an lmcache "
                            f"coordinator never sends (it was asked for identity); is "
                            f"{self.base} the coordinator, or is a proxy in between?")
                    length = resp.content_length
                    if length is not None and length > cap:
                        raise ReplyTooLarge(
                            f"{what}: reply announces {length} bytes, over the "
                            f"{cap}-byte bound; nothing was read. If {self.base} is a real "
                            f"coordinator with that many instances, raise max_reply_bytes")
                    buf = bytearray()
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        buf += chunk
                        if len(buf) > cap:
                            raise ReplyTooLarge(
                                f"{what}: reply exceeds the {cap}-byte bound; stopped reading "
                                f"and dropped the connection. If {self.base} is a real "
                                f"coordinator with that many instances, raise max_reply_bytes")
                    return resp.status, bytes(buf)
        except (TimeoutError, asyncio.TimeoutError):
            raise CoordinatorUnreachable(
                f"{what}: no complete answer within {t:g}s; check that the coordinator "
                f"Deployment/Service of this group is up and that the controller may reach "
                f"{self.base} (NetworkPolicy, port)") from None
        except aiohttp.ClientConnectionError as e:
            raise CoordinatorUnreachable(
                f"{what}: cannot connect or the connection broke ({e}); check that the "
                f"coordinator Deployment/Service of this group is up and that the controller "
                f"may reach {self.base} (NetworkPolicy, port)") from e
        except aiohttp.ClientResponseError as e:  # malformed HTTP: status line, headers
            raise CoordinatorReplyError(
                f"{what}: not a valid HTTP reply ({' '.join(str(e.message or e).split())}); is "
                f"{self.base} an lmcache coordinator?") from e
        except aiohttp.ClientError as e:
            raise CoordinatorError(f"{what}: HTTP client error {e!r}") from e

    def _json(self, body: bytes, what: str) -> Any:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting ("[[[[...")
            raise CoordinatorReplyError(
                f"{what}: reply is not JSON: {_snippet(body)}; is {self.base} an lmcache "
                f"coordinator (`lmcache coordinator`, default port 9300)?") from None

    # ---------------------------------------------------------------------------------------

    async def _get_json(self, path: str, hint: str, timeout: Optional[float]):
        """GET ``path``, insist on 200, return the parsed JSON; ``hint`` ends the error."""
        what = f"lmcache coordinator {self.base}: GET {path}"
        status, body = await self._request("GET", f"{self.base}{path}", what=what,
                                           timeout=timeout)
        if status != 200:
            raise CoordinatorReplyError(
                f"{what} answered HTTP {status} (expected 200): {_snippet(body)}; {hint}")
        return what, body, self._json(body, what)

    async def healthy(self, *, timeout: Optional[float] = None) -> None:
        """``GET /healthz`` answered ``{"status": "healthy"}`` (``health_api.py:13-20``);
        raises ``CoordinatorUnreachable`` / ``CoordinatorReplyError`` otherwise."""
        what, body, got = await self._get_json(
            "/healthz", f"is {self.base} an lmcache coordinator >= 0.5.0?", timeout)
        if not isinstance(got, dict) or got.get("status") != "healthy":
            raise CoordinatorReplyError(f"{what} answered {_snippet(body)}, expected "
                                        f"{{\"status\": \"healthy\"}}")

    async def instances(self, *, timeout: Optional[float] = None) -> list[Instance]:
        """Every registration, fresh from the registry (no cache: ``instances_api.py:130-141``)."""
        what, _, got = await self._get_json(
            "/instances", f"is {self.base} an lmcache coordinator >= 0.5.0 (not "
            "lmcache_controller)?", timeout)
        return parse_instances(got, what)

    async def deregister(self, instance_id: str, *, timeout: Optional[float] = None) -> None:
        """``DELETE /instances/{id}``: 204 whether or not it was registered
        (``instances_api.py:98-120``). ``ValueError`` (nothing sent) for an id no registration
        can have."""
        url = instance_url(self.base, instance_id)
        what = f"lmcache coordinator {self.base}: DELETE /instances/{instance_id}"
        status, body = await self._request("DELETE", url, what=what, timeout=timeout)
        if status != 204:
            raise CoordinatorReplyError(
                f"{what} answered HTTP {status} (expected 204, also for unknown ids): "
                f"{_snippet(body)}; is {self.base} an lmcache coordinator >= 0.5.0?")
        log.info("deregistered %s at %s", instance_id, self.base)

    async def deregister_and_confirm(self, instance_id: str, *, timeout: float = 10.0,
                                     resend_after: float = 1.0,
                                     poll_interval: float = 0.1) -> float:
        """``DELETE``, then ``GET /instances`` until the id is absent; ``DELETE`` again every
        ``resend_after`` s while it is listed. Returns the seconds it took.

        An id listed again after a 204 was registered anew by a server that is still running
        (its heartbeat got a 404 and it re-registered, ``registrar.py:138-147``): that
        incarnation is not dead, and ``DeregistrationNotConfirmed`` says so."""
        check_instance_id(instance_id)
        t0 = time.monotonic()
        deadline = t0 + timeout

        def left() -> float:
            return max(0.05, min(self.timeout, deadline - time.monotonic()))

        await self.deregister(instance_id, timeout=left())
        deletes, last_delete, last_err = 1, time.monotonic(), None
        while True:
            try:
                listed = {i.instance_id: i for i in await self.instances(timeout=left())}
                last_err = None
                if instance_id not in listed:
                    took = time.monotonic() - t0
                    log.info("deregistration of %s at %s confirmed in %.3fs (%d DELETE(s))",
                             instance_id, self.base, took, deletes)
                    return took
            except CoordinatorError as e:  # transient trouble: keep trying until the deadline
                last_err = e
            now = time.monotonic()
            if now >= deadline:
                why = (f"; last error: {last_err}" if last_err else
                       "; it re-registered after the DELETE, so the server with this id is "
                       "still running (its heartbeat got 404 and registered again): DELETE "
                       "only ids whose container is gone")
                raise DeregistrationNotConfirmed(
                    f"lmcache coordinator {self.base}: {instance_id!r} still listed "
                    f"{timeout:g}s after {deletes} DELETE(s) answered 204{why}")
            if now - last_delete >= resend_after:
                try:
                    await self.deregister(instance_id, timeout=left())
                    deletes += 1
                except CoordinatorError as e:
                    last_err = e
                last_delete = time.monotonic()
            await asyncio.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------------------------
# One-shot conveniences
# --------------------------------------------------------------------------------------------

async def instances(url: str, **kw) -> list[Instance]:
    async with Coordinator(url, **kw) as c:
        return await c.instances()


async def deregister(url: str, instance_id: str, **kw) -> None:
    async with Coordinator(url, **kw) as c:
        await c.deregister(instance_id)


async def deregister_and_confirm(url: str, instance_id: str, *, confirm_timeout: float = 10.0,
                                 **kw) -> float:
    async with Coordinator(url, **kw) as c:
        return await c.deregister_and_confirm(instance_id, timeout=confirm_timeout)
