"""kvmesh.backends.resp: the subscription's RESP2 reader (pure)."""

from __future__ import annotations

from kvmesh.backends import resp

CH = b"__keyevent@0__:set"


def subscription_bytes() -> bytes:
    """A SUBSCRIBE confirmation, keyevent messages and a PONG, as one connection receives them."""
    msg = resp.command("message", CH, b"k1") + resp.command("message", CH, b"kvmesh:addr:x")
    msg += resp.command("message", CH, b"kvmesh:barrier:ab12") + resp.command("message", CH, b"k1")
    sub = b"*3\r\n$9\r\nsubscribe\r\n$18\r\n" + CH + b"\r\n:1\r\n"
    return sub + msg + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"


def test_parse_frames_at_every_split_point():
    data = subscription_bytes()
    for cut in range(len(data) + 1):  # every split point parses to the same frames
        f1, pos = resp.parse_frames(data[:cut])
        f2, pos2 = resp.parse_frames(data[:cut][pos:] + data[cut:])
        assert pos2 == len(data[:cut][pos:] + data[cut:])
        frames = f1 + f2
        assert frames[0] == [b"subscribe", CH, 1] and frames[-1] == [b"pong", b""]
        assert frames[1:-1] == [[b"message", CH, k] for k in
                                (b"k1", b"kvmesh:addr:x", b"kvmesh:barrier:ab12", b"k1")]


def test_parse_frames_error_reply():
    assert resp.parse_frames(b"-ERR no\r\n") == ([("-", b"ERR no")], 9)
