"""A minimal RESP2 reader and writer for one SUBSCRIBEd Redis connection (pure, no I/O).

The address index reads its keyevent subscription off a plain asyncio stream and parses
everything that arrived in one go (many messages per read), with an inline fast path for the
one frame shape that dominates: a pubsub ``message``.
"""

from __future__ import annotations

# The start of every pubsub message frame: `*3`, `$7 message`, then the channel's bulk header.
_MESSAGE_HEAD = b"*3\r\n$7\r\nmessage\r\n$"
_MESSAGE_HEAD_LEN = len(_MESSAGE_HEAD)


def parse_frames(buf: bytes, pos: int = 0) -> tuple[list, int]:
    """Parse complete RESP2 top-level replies from ``buf[pos:]`` (what a SUBSCRIBEd connection
    receives: arrays of bulk strings/integers, plus ``+``/``-`` lines). Returns the frames and
    the offset of the first unparsed byte. Errors come back as ``("-", message)``."""
    frames: list = []
    n = len(buf)
    while pos < n:
        if buf.startswith(_MESSAGE_HEAD, pos):
            # Fast path, inline on purpose: a pubsub message, the bulk of the traffic.
            p = pos + _MESSAGE_HEAD_LEN
            eol = buf.find(b"\r\n", p)
            if eol < 0:
                break
            start = eol + 2
            end = start + int(buf[p:eol])
            if n < end + 3:
                break
            channel = buf[start:end]
            eol = buf.find(b"\r\n", end + 3)
            if eol < 0:
                break
            start = eol + 2
            end = start + int(buf[end + 3:eol])
            if n < end + 2:
                break
            frames.append([b"message", channel, buf[start:end]])
            pos = end + 2
            continue
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            break
        kind = buf[pos]
        if kind in (43, 45):  # '+' status, '-' error
            frames.append((chr(kind), buf[pos + 1:eol]))
            pos = eol + 2
            continue
        if kind != 42:  # '*'
            raise ValueError(f"unexpected RESP reply type {chr(kind)!r} on the subscription")
        got = _array(buf, eol + 2, int(buf[pos + 1:eol]), n)
        if got is None:
            break
        frame, pos = got
        frames.append(frame)
    return frames, pos


def _array(buf: bytes, p: int, count: int, n: int) -> tuple[list, int] | None:
    """The ``count`` integer/bulk elements of an array starting at ``p``; None if incomplete."""
    items: list = []
    for _ in range(max(count, 0)):
        eol = buf.find(b"\r\n", p)
        if eol < 0:
            return None
        t = buf[p]
        if t == 58:  # ':'
            items.append(int(buf[p + 1:eol]))
            p = eol + 2
        elif t == 36:  # '$'
            length = int(buf[p + 1:eol])
            if length < 0:
                items.append(None)
                p = eol + 2
                continue
            start = eol + 2
            if n < start + length + 2:
                return None
            items.append(buf[start:start + length])
            p = start + length + 2
        else:
            raise ValueError(f"unexpected RESP element type {chr(t)!r} on the subscription")
    return items, p


def command(*args: bytes | str) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)
