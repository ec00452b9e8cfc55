"""kvmesh.backends.coordinator against a REAL `lmcache coordinator` (lmcache 0.5.6, from the
vllm-0.33.0 consumer venv) on 127.0.0.1 with a free port.

Instances register through LMCache's own registration client (`registrar.keep_registered`, what
`lmcache server` runs; see mp_registrant.py), with a 0.5 s heartbeat and advertise addresses on
loopback IPs standing in for pod IPs. A crashed server is a SIGKILLed registrant (nothing
deregistered), a clean shutdown a SIGTERMed one (it deregisters itself).

The hostile-endpoint tests at the end talk to small local sockets that are, on purpose, not a
coordinator: refused, silent, dripping, garbage, huge, compressed, misshapen.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
import uuid

import pytest

from kvmesh.backends import coordinator as C
from lmcache_mp import ENV, Coordinator, Registrant, consumers
from support import free_port, wait_until

HB = 0.5  # registrants' heartbeat (s)


def inst(iid: str, ip: str, port_base: int = 0) -> dict:
    return {"instance_id": iid, "advertise_ip": ip, "http_port": 8080,
            "p2p_advertised_url": f"{ip}:8200", "mq_port": 5555}


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp_coordinator")
    try:
        c = Coordinator("127.0.0.1", free_port(), d, "--instance-timeout", "600",
                        "--disable-metrics")
    except consumers.ConsumerEnvMissing as e:
        pytest.fail(f"{e}\n(needed for the real lmcache coordinator: "
                    f"bash tests/consumers/setup_envs.sh {ENV})")
    try:
        c.wait_up()
        yield c
    finally:
        c.stop()


@pytest.fixture
def registrants(coord, tmp_path):
    made: list[Registrant] = []

    def make(*instances: dict, wait: bool = True) -> Registrant:
        r = Registrant(coord, list(instances), tmp_path, heartbeat=HB, tag=str(len(made)))
        made.append(r)
        if wait:
            r.wait_registered()
        return r

    yield make
    for r in made:
        if r.alive():
            r.stop()


def uid(name: str) -> str:
    return f"kvm-{name}-{uuid.uuid4().hex[:8]}"




# --------------------------------------------------------------------------------------------
# The real coordinator
# --------------------------------------------------------------------------------------------

async def test_healthy(coord):
    async with C.Coordinator(coord.url) as c:
        await c.healthy()


async def test_lists_what_lmcache_registered(coord, registrants):
    a, b = uid("a"), uid("b")
    registrants(inst(a, "127.0.0.2"), inst(b, "127.0.0.3"))
    async with C.Coordinator(coord.url) as c:
        got = {i.instance_id: i for i in await c.instances()}
    assert got[a] == C.Instance(a, "127.0.0.2", 8080, "127.0.0.2:8200", 5555,
                                got[a].registration_time, {})
    assert got[b].ip == "127.0.0.3" and got[b].p2p_advertised_url == "127.0.0.3:8200"
    assert got[a].p2p and got[a].peer_mq_url == "tcp://127.0.0.2:5555"
    assert abs(got[a].registration_time - time.time()) < 120
    # the client's view equals the coordinator's own JSON (read independently)
    raw = coord.listed()
    for iid in (a, b):
        assert {k: raw[iid][k] for k in ("ip", "http_port", "p2p_advertised_url", "mq_port")} == \
            {"ip": got[iid].ip, "http_port": got[iid].http_port,
             "p2p_advertised_url": got[iid].p2p_advertised_url, "mq_port": got[iid].mq_port}


async def test_non_p2p_registration_is_listed_but_not_a_peer(coord, registrants):
    n = uid("nop2p")
    registrants({"instance_id": n, "advertise_ip": "127.0.0.4", "http_port": 8081})
    async with C.Coordinator(coord.url) as c:
        got = {i.instance_id: i for i in await c.instances()}
    assert got[n].p2p_advertised_url == "" and got[n].mq_port == 0 and not got[n].p2p


async def test_crashed_server_stays_listed_until_delete_then_gone(coord, registrants):
    live, dead = uid("live"), uid("dead")
    keep = registrants(inst(live, "127.0.0.2"))
    crashed = registrants(inst(dead, "127.0.0.3"))
    crashed.crash()
    async with C.Coordinator(coord.url) as c:
        await asyncio.sleep(4 * HB)  # several missed heartbeats: still listed (no DELETE on crash)
        assert dead in {i.instance_id for i in await c.instances()}
        took = await c.deregister_and_confirm(dead, timeout=5)
        assert took < 2.0
        listed = {i.instance_id for i in await c.instances()}
    assert dead not in listed and live in listed
    assert dead not in coord.listed()  # independently: gone from the coordinator
    assert keep.alive()


async def test_delete_is_idempotent(coord, registrants):
    dead, other = uid("dead"), uid("other")
    registrants(inst(other, "127.0.0.2"))
    r = registrants(inst(dead, "127.0.0.3"))
    r.crash()
    async with C.Coordinator(coord.url) as c:
        await c.deregister(dead)
        before = {i.instance_id for i in await c.instances()}
        await c.deregister(dead)                 # again: 204, nothing changes
        await c.deregister(uid("never"))         # never registered: 204
        assert await c.deregister_and_confirm(dead, timeout=2) < 1.0
        after = {i.instance_id for i in await c.instances()}
    assert dead not in before and before == after and other in after


async def test_deleted_live_server_reregisters_at_next_heartbeat(coord, registrants):
    """Why kvmesh deletes only dead incarnations: a running server's heartbeat gets 404 and it
    registers again (lmcache registrar.py:138-147)."""
    iid = uid("alive")
    r = registrants(inst(iid, "127.0.0.2"))
    async with C.Coordinator(coord.url) as c:
        first = {i.instance_id: i for i in await c.instances()}[iid].registration_time
        await c.deregister(iid)
        assert iid not in {i.instance_id for i in await c.instances()}

        async def back():
            got = {i.instance_id: i for i in await c.instances()}
            return got.get(iid)
        again = await wait_until(back, timeout=10 * HB)
    assert again.registration_time > first
    assert r.registrations().count(iid) >= 2


async def test_clean_shutdown_deregisters_itself(coord, registrants):
    a, b = uid("a"), uid("b")
    r = registrants(inst(a, "127.0.0.2"), inst(b, "127.0.0.3"))
    r.stop()
    async with C.Coordinator(coord.url) as c:
        listed = {i.instance_id for i in await c.instances()}
    assert a not in listed and b not in listed


async def test_odd_ids_round_trip(coord, registrants):
    """Ids are path segments: every reserved character is percent-encoded."""
    odd = [f"kvm {uuid.uuid4().hex[:6]}?x=1#f%2F%", f"kvm-ü-{uuid.uuid4().hex[:6]};a=b:1",
           f"..kvm{uuid.uuid4().hex[:6]}"]
    r = registrants(*(inst(o, "127.0.0.2") for o in odd))
    r.crash()
    async with C.Coordinator(coord.url) as c:
        assert set(odd) <= {i.instance_id for i in await c.instances()}
        for o in odd:
            await c.deregister_and_confirm(o, timeout=3)
        assert not set(odd) & {i.instance_id for i in await c.instances()}


async def test_real_reply_over_the_bound_is_refused(coord, tmp_path):
    """A real coordinator's listing longer than max_reply_bytes: refused from Content-Length."""
    ids = [uid(f"many{i}") for i in range(40)]
    r = Registrant(coord, [inst(i, "127.0.0.2") for i in ids], tmp_path, heartbeat=2.0, tag="many")
    try:
        r.wait_registered()
        async with C.Coordinator(coord.url, max_reply_bytes=4096) as c:
            with pytest.raises(C.ReplyTooLarge) as e:
                await c.instances()
        assert "announces" in str(e.value) and "4096" in str(e.value)
        async with C.Coordinator(coord.url) as c:  # the default bound has room for them
            assert set(ids) <= {i.instance_id for i in await c.instances()}
    finally:
        r.stop()


@pytest.mark.parametrize("bad", ["", " x", "x ", "a/b", ".", "..", "x\ny", None, 7])
async def test_unaddressable_ids_refused_before_sending(coord, bad):
    async with C.Coordinator(coord.url) as c:
        with pytest.raises(ValueError):
            await c.deregister(bad)


async def test_module_level_helpers(coord, registrants):
    iid = uid("h")
    registrants(inst(iid, "127.0.0.2")).crash()
    assert iid in {i.instance_id for i in await C.instances(coord.url)}
    await C.deregister_and_confirm(coord.url, iid, confirm_timeout=3)
    assert iid not in {i.instance_id for i in await C.instances(coord.url)}


# --------------------------------------------------------------------------------------------
# Not a coordinator: every failure is bounded and says what happened, where, and what to do
# --------------------------------------------------------------------------------------------

class Endpoint:
    """A local TCP server whose handler gets (reader, writer); counts bytes written."""

    def __init__(self, handler):
        self.handler, self.sent, self.server, self.port = handler, 0, None, 0

    async def __aenter__(self):
        async def serve(r, w):
            try:
                await self.handler(self, r, w)
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()
        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def write(self, w, data: bytes):
        w.write(data)
        await w.drain()
        self.sent += len(data)


async def read_request(r):
    return await r.readuntil(b"\r\n\r\n")


def http(status: str, body: bytes, headers: dict | None = None) -> bytes:
    h = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
            + "\r\n").encode() + body


async def test_refused_is_unreachable_quickly():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(C.CoordinatorUnreachable) as e:
        async with C.Coordinator(f"127.0.0.1:{port}", timeout=2) as c:
            await c.instances()
    assert time.monotonic() - t0 < 2.0
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}" in msg and "GET /instances" in msg and "NetworkPolicy" in msg


@pytest.mark.parametrize("kind", ["silent", "drip"])
async def test_silent_or_dripping_endpoint_bounded(kind):
    async def silent(ep, r, w):
        await read_request(r)
        await asyncio.sleep(30)

    async def drip(ep, r, w):
        await read_request(r)
        await ep.write(w, b'HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{"instances": [')
        while True:
            await asyncio.sleep(0.05)
            await ep.write(w, b" ")

    async with Endpoint(silent if kind == "silent" else drip) as ep:
        t0 = time.monotonic()
        with pytest.raises(C.CoordinatorUnreachable) as e:
            async with C.Coordinator(ep.url, timeout=0.7) as c:
                await c.instances()
        took = time.monotonic() - t0
    assert 0.6 < took < 1.5, took
    assert "within 0.7s" in str(e.value) and ep.url in str(e.value)


@pytest.mark.parametrize("chunked", [False, True])
async def test_huge_reply_is_cut_at_the_bound(chunked):
    cap = 256 * 1024
    total = 64 * 1024 * 1024

    async def huge(ep, r, w):
        await read_request(r)
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked
                   else b"Content-Length: %d\r\n\r\n" % total))
        await ep.write(w, head)
        block = b"[" * 65536
        frame = (b"%x\r\n" % len(block)) + block + b"\r\n" if chunked else block
        for _ in range(total // len(block)):
            await ep.write(w, frame)

    async with Endpoint(huge) as ep:
        with pytest.raises(C.ReplyTooLarge) as e:
            async with C.Coordinator(ep.url, timeout=5, max_reply_bytes=cap) as c:
                await c.instances()
        await asyncio.sleep(0.2)
    msg = str(e.value)
    assert ep.url in msg and str(cap) in msg and "max_reply_bytes" in msg
    if not chunked:
        assert "announces" in msg          # refused from the header, body never read
    # the connection was dropped: the endpoint could write only what fits in socket buffers
    assert ep.sent < cap + 8 * 1024 * 1024, ep.sent


async def test_announced_length_over_bound_reads_nothing():
    async def liar(ep, r, w):
        await read_request(r)
        await ep.write(w, b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n{}")
        await asyncio.sleep(5)

    async with Endpoint(liar) as ep:
        t0 = time.monotonic()
        with pytest.raises(C.ReplyTooLarge):
            async with C.Coordinator(ep.url, timeout=3) as c:
                await c.instances()
        assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("reply,err,words", [
    (b"garbage\r\n\r\n", C.CoordinatorError, ["127.0.0.1"]),
    (http("200 OK", b"<html>hi</html>"), C.CoordinatorReplyError, ["not JSON", "<html>"]),
    (http("200 OK", b"[" * 200_000), C.CoordinatorReplyError, ["not JSON"]),
    (http("200 OK", b'{"workers": []}'), C.CoordinatorReplyError, ["expected", "instances"]),
    (http("200 OK", b'{"instances": [{"ip": "1.2.3.4", "http_port": 1}]}'),
     C.CoordinatorReplyError, ["instances[0]", "instance_id"]),
    (http("200 OK", b'{"instances": [{"instance_id": "x", "ip": "1.2.3.4", "http_port": "80"}]}'),
     C.CoordinatorReplyError, ["instances[0]", "http_port"]),
    (http("404 Not Found", b'{"detail":"Not Found"}'), C.CoordinatorReplyError,
     ["HTTP 404", "lmcache coordinator"]),
    (http("302 Found", b"", {"Location": "http://169.254.169.254/"}), C.CoordinatorReplyError,
     ["HTTP 302"]),
    (http("200 OK", gzip.compress(b'{"instances": []}'), {"Content-Encoding": "gzip"}),
     C.CoordinatorReplyError, ["gzip"]),
])
async def test_garbage_replies_are_clear_errors(reply, err, words):
    async def answer(ep, r, w):
        await read_request(r)
        await ep.write(w, reply)

    async with Endpoint(answer) as ep:
        t0 = time.monotonic()
        with pytest.raises(err) as e:
            async with C.Coordinator(ep.url, timeout=2) as c:
                await c.instances()
        assert time.monotonic() - t0 < 2.5
    for word in words:
        assert word in str(e.value), (word, str(e.value))


async def test_delete_answer_other_than_204_is_an_error():
    async def answer(ep, r, w):
        await read_request(r)
        await ep.write(w, http("200 OK", b"{}"))

    async with Endpoint(answer) as ep:
        with pytest.raises(C.CoordinatorReplyError) as e:
            async with C.Coordinator(ep.url, timeout=2) as c:
                await c.deregister("x")
    assert "DELETE /instances/x" in str(e.value) and "expected 204" in str(e.value)


async def test_not_confirmed_when_the_id_keeps_being_listed():
    """An endpoint that accepts the DELETE yet keeps listing the id (what a coordinator shows
    when the server is alive and re-registers between DELETE and GET)."""
    listing = json.dumps({"instances": [{"instance_id": "x", "ip": "1.2.3.4", "http_port": 1,
                                         "registration_time": 1.0, "metadata": {},
                                         "p2p_advertised_url": "1.2.3.4:8200",
                                         "mq_port": 5555}]}).encode()
    deletes = 0

    async def answer(ep, r, w):
        nonlocal deletes
        while True:
            req = await read_request(r)
            if req.startswith(b"DELETE"):
                deletes += 1
                await ep.write(w, b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                await ep.write(w, http("200 OK", listing))

    async with Endpoint(answer) as ep:
        t0 = time.monotonic()
        with pytest.raises(C.DeregistrationNotConfirmed) as e:
            async with C.Coordinator(ep.url, timeout=1) as c:
                await c.deregister_and_confirm("x", timeout=1.5, resend_after=0.5)
        assert time.monotonic() - t0 < 2.5
    assert deletes >= 2
    assert "still running" in str(e.value) and ep.url in str(e.value)


@pytest.mark.parametrize("url,base", [("10.0.0.1:9300", "http://10.0.0.1:9300"),
                                      ("http://c.ns.svc:9300/", "http://c.ns.svc:9300"),
                                      ("https://[fd00::1]:9300", "https://[fd00::1]:9300")])
def test_base_url(url, base):
    assert C.base_url(url) == base


@pytest.mark.parametrize("url", ["", "ftp://x:1", "http://u:p@x:1", "http://x:1/api", "x:99999",
                                 "http://x:1?a=b", None])
def test_base_url_refuses(url):
    with pytest.raises(ValueError):
        C.base_url(url)


# --------------------------------------------------------------------------------------------
# A real `lmcache server` (P2P on, the flags docs/mp-mode.md prescribes)
# --------------------------------------------------------------------------------------------

async def test_real_server_registration_crash_and_delete(coord, tmp_path):
    """What the controller will see and do for a real server: its registration carries the
    advertise IP from LMCACHE_COORDINATOR_ADVERTISE_IP, mq_port = --port and the P2P URL; a
    SIGKILLed server stays listed; DELETE + GET removes it."""
    from lmcache_mp import Server, nixl_site
    try:
        nixl_site()
    except consumers.ConsumerEnvMissing as e:
        pytest.fail(str(e))
    iid = f"kvm-{uuid.uuid4()}-1"
    ports = {"rpc": free_port(), "p2p": free_port(), "http": free_port()}
    srv = Server(coord, iid, "127.0.0.5", ports, tmp_path)
    try:
        srv.wait_registered()
        async with C.Coordinator(coord.url) as c:
            got = {i.instance_id: i for i in await c.instances()}[iid]
            assert (got.ip, got.mq_port, got.p2p_advertised_url) == \
                ("127.0.0.5", ports["rpc"], f"127.0.0.5:{ports['p2p']}")
            assert got.p2p and got.http_port == ports["http"]
            for port in (ports["rpc"], ports["p2p"]):  # bound on all interfaces, not only the
                socket.create_connection(("127.0.0.9", port), timeout=2).close()  # advertised one
            srv.crash()
            await asyncio.sleep(3)  # 3 heartbeats missed: a crash deregisters nothing
            assert iid in {i.instance_id for i in await c.instances()}
            assert await c.deregister_and_confirm(iid, timeout=5) < 2.0
            assert iid not in {i.instance_id for i in await c.instances()}
    finally:
        if srv.alive():
            srv.stop()
