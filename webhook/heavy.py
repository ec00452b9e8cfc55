"""Parse and decide one AdmissionReview's bytes (pure), and a worker process for large ones.

Why a process: JSON parsing and serialising are single C calls that hold the GIL for the whole
body (orjson.loads of a 3 MiB review: ~6 ms on a loaded 2-core machine), and a thread holding
the GIL that the OS deschedules stalls the event loop until it runs again, so on a thread every
other admission waited tens of ms behind a large pod. In a worker process the loop only moves
bytes. Ordinary reviews (a few KiB, ~0.1 ms) stay on the loop: a process round trip would cost
them more than it saves.

The worker holds the policy view it was last sent (PolicySnapshot, sent again only when the
webhook's version changes), so a review costs one pickle of its bytes each way.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import pickle
import signal
import struct
import sys
from dataclasses import dataclass
from typing import Any, Optional, Union

import orjson

from kvmesh.webhook import admission

log = logging.getLogger("kvmesh.webhook")


@dataclass(frozen=True)
class Refusal:
    """The caller's fault: a 4xx naming the problem."""

    status: int
    kind: str
    message: str


@dataclass(frozen=True)
class Failure:
    """kvmesh's fault while deciding request `uid`: admit it un-injected."""

    uid: str
    kind: str
    message: str


Decision = Union[tuple[dict, admission.Outcome], Refusal, Failure]


def decide_raw(raw: bytes, selected: Optional[str], policy: Any,
               memo: Optional[admission.Memo], seeds: admission.SeedState,
               max_nodes: int, native_sidecars: Optional[bool] = None) -> Decision:
    """Parse and decide. Pure CPU, no logging or metrics (the caller does those)."""
    nodes = raw.count(b"{") + raw.count(b"[")
    if nodes > max_nodes:
        return Refusal(413, "too-many-nodes", f"body holds {nodes:,} JSON objects and arrays, "
                       f"more than the {max_nodes:,} kvmesh parses (a pod holds a few hundred)")
    try:
        body = orjson.loads(raw)
        # orjson refuses to write more than 254 levels; no Kubernetes object comes near,
        # and everything downstream (memo key, diff, messages) may then recurse safely.
        if isinstance(body, (dict, list)):
            orjson.dumps(body)
    except orjson.JSONEncodeError:
        return Refusal(400, "too-deep", "body is nested deeper than 254 levels")
    except ValueError as e:  # orjson.JSONDecodeError, invalid UTF-8 included
        return Refusal(400, "not-json", f"body is not valid JSON: {e}")
    try:
        return admission.review(body, policy, selected=bool(selected), memo=memo, seeds=seeds,
                                native_sidecars=native_sidecars)
    except admission.BadReview as e:
        return Refusal(400, "not-a-review", str(e))
    except Exception as e:  # a kvmesh bug: never block the workload for it
        return Failure(body["request"]["uid"],  # review() validated it before deciding
                       type(e).__name__, str(e)[:200])


# --- the worker process --------------------------------------------------------------------------
# `python -m kvmesh.webhook.heavy`, fed over its stdin/stdout: each message is a 4-byte length and
# a pickle (a request's pickle is followed by the body's bytes, as many as it says). Only the
# webhook writes to it (a pipe it created), so the pickles are trusted.

_FRAME = struct.Struct(">I")


def _read_frame(f: Any) -> Optional[bytes]:
    head = f.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    return f.read(_FRAME.unpack(head)[0])


def _worker_main() -> None:
    """Decide requests until stdin closes (the webhook exited: so does the worker)."""
    held: Optional[tuple[Any, Any]] = None  # (version, policy) last sent
    rx, tx = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries answers only; a stray print must not corrupt them
    # Ctrl-C on the process group is the webhook's to handle; the worker ends with its stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # on a busy node the webhook's event loop runs first; the worker takes what is left
        os.nice(10)
    except OSError:
        pass
    ready = pickle.dumps("ready")  # imports done: the webhook may send work
    tx.write(_FRAME.pack(len(ready)) + ready)
    tx.flush()
    while (frame := _read_frame(rx)) is not None:
        selected, version, policy, seeds, max_nodes, sidecars, size = pickle.loads(frame)
        raw = rx.read(size)
        if len(raw) < size:
            return
        if policy is not None:
            held = (version, policy)
        try:
            if held is None or held[0] != version:  # never: the pool resends after a restart
                raise RuntimeError(f"worker holds policy {held and held[0]}, not {version}")
            got: Any = decide_raw(raw, selected, held[1], None, seeds, max_nodes, sidecars)
            if isinstance(got, tuple):  # serialised here, so the loop never holds the GIL
                got = (orjson.dumps(got[0]), got[1])
        except Exception as e:  # decide_raw catches the pipeline's; this is the worker's
            got = Failure("", type(e).__name__, str(e)[:200])
        out = pickle.dumps(got, protocol=pickle.HIGHEST_PROTOCOL)
        tx.write(_FRAME.pack(len(out)) + out)
        tx.flush()


def _write_all(fd: int, head: bytes, body: bytes) -> None:
    """Blocking writes from a thread: each os.write releases the GIL while the worker reads."""
    for data in (head, body):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:1 << 20]):]


class WorkerGone(Exception):
    """The worker died or overran its time; it is replaced on the next request."""


class Pool:
    """One worker process, started with the webhook (so the first large review does not wait
    for Python to start), one request at a time, replaced when it dies or overruns `timeout`.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.proc: Optional[asyncio.subprocess.Process] = None
        self._sent: Any = None  # policy version the current worker holds
        self._lock = asyncio.Lock()
        self._starting: Optional[asyncio.Task] = None
        self._tx: Optional[int] = None  # the worker's stdin (blocking; written from a thread)
        self._writing: Optional[asyncio.Future] = None

    def begin(self) -> None:
        """Start the worker in the background (the webhook serves ordinary reviews meanwhile;
        a large one waits for it)."""
        async def start() -> None:
            try:
                await self.start()
            except WorkerGone as e:  # the first large review tries again
                log.error("the process for large reviews %s; the next large review starts "
                          "another", e)
        self._starting = asyncio.ensure_future(start())

    async def start(self) -> None:
        """Start a worker and wait until it has imported what it needs (raises WorkerGone)."""
        # Its stdin is a plain pipe written from a thread: copying a 3 MiB body through the
        # event loop's write buffer cost the loop more time than parsing it.
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: 1 MiB, the unprivileged maximum
        except OSError:
            pass
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kvmesh.webhook.heavy", stdin=r,
                stdout=asyncio.subprocess.PIPE)
        except Exception as e:  # out of processes or files: reported, retried later
            os.close(w)
            raise WorkerGone(f"could not start: {type(e).__name__}: {e}")
        finally:
            os.close(r)
        self._tx = w
        self._sent = None
        try:
            # Python's start-up, slow on a loaded node; nothing but large reviews waits on it
            await asyncio.wait_for(self._read(), self.timeout * 6)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            self.stop()
            raise WorkerGone(f"did not start: {type(e).__name__}: {e}")

    async def _read(self) -> bytes:
        assert self.proc is not None and self.proc.stdout
        n = _FRAME.unpack(await self.proc.stdout.readexactly(_FRAME.size))[0]
        return await self.proc.stdout.readexactly(n)

    async def decide(self, raw: bytes, selected: Optional[str], version: Any, policy: Any,
                     seeds: admission.SeedState, max_nodes: int,
                     native_sidecars: Optional[bool] = None) -> Any:
        """(response bytes, Outcome) | Refusal | Failure; raises WorkerGone."""
        async with self._lock:
            starting, self._starting = self._starting, None
            if starting is not None:
                await starting
            if self.proc is None or self.proc.returncode is not None:
                await self.start()
            assert self.proc is not None and self._tx is not None
            send = policy if version != self._sent else None
            head = pickle.dumps((selected, version, send, seeds, max_nodes, native_sidecars,
                                 len(raw)),
                                protocol=pickle.HIGHEST_PROTOCOL)
            try:
                self._sent = version
                write = self._writing = asyncio.get_running_loop().run_in_executor(
                    None, _write_all, self._tx, _FRAME.pack(len(head)) + head, raw)
                return pickle.loads(await asyncio.wait_for(self._exchange(write), self.timeout))
            except Exception as e:  # dead, stuck, or an answer that makes no sense
                self.stop()
                self.begin()  # the next large review should find a worker ready
                raise WorkerGone(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    async def _exchange(self, write: "asyncio.Future[None]") -> bytes:
        await write
        return await self._read()

    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> Optional[asyncio.subprocess.Process]:
        proc, self.proc, self._sent = self.proc, None, None
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        tx, self._tx = self._tx, None
        if tx is not None:
            writing = self._writing
            if writing is not None and not writing.done():
                # Closed once the writer thread is out (EPIPE now the worker is gone), so its
                # next write cannot land in a pipe that reused the number.
                writing.add_done_callback(lambda _: os.close(tx))
            else:
                os.close(tx)
        return proc

    async def close(self, timeout: float = 1.0) -> None:
        """Stop the worker and reap it (before the event loop closes)."""
        if self._starting is not None:
            self._starting.cancel()
            try:
                await self._starting
            except asyncio.CancelledError:
                pass
        proc = self.stop()
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                pass


if __name__ == "__main__":
    # Through the module's own name, so what it pickles (Refusal, Failure) is found by that name
    # in the webhook, not as __main__.Refusal.
    from kvmesh.webhook import heavy
    heavy._worker_main()
