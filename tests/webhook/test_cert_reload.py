"""Rotating the serving certificate under load: no request fails, new handshakes see the new
certificate, and a half-written pair never replaces a good one."""

import datetime as dt
import json
import os
import socket
import ssl
import threading
import time

from kvmesh.certs import authority
from support import Webhook, review_for

POD = {"metadata": {"generateName": "q-", "labels": {"kvmesh.dev/inject": "enabled"}},
       "spec": {"containers": [{"name": "vllm", "image": "lmcache/vllm-openai:v0.3.9",
                                "command": ["vllm", "serve", "m"]}]}}


def served_serial(port: int, cafile: str) -> int:
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            from cryptography import x509
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def write_atomically(path, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def test_rotation_under_load_drops_nothing(tmp_path):
    w = Webhook(tmp_path)
    try:
        ca_pem = (tmp_path / "ca.crt").read_bytes()
        first = served_serial(w.port, str(tmp_path / "ca.crt"))
        failures, done = [], threading.Event()
        count = [0]

        def load():
            body = json.dumps(review_for(POD)).encode()
            while not done.is_set() and count[0] < 2000:
                try:
                    status, _ = w.request("/mutate", body)
                    if status != 200:
                        failures.append(status)
                except Exception as e:  # a dropped connection is a failure
                    failures.append(repr(e))
                count[0] += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        # Rotate: a new leaf from a new CA; the client trusts both during the overlap.
        now = dt.datetime.now(dt.timezone.utc)
        ca2 = authority.new_ca(now)
        leaf = authority.issue_leaf(ca2, ["127.0.0.1"], now)
        bundle = tmp_path / "bundle.crt"
        bundle.write_bytes(ca_pem + ca2.cert_pem)
        w.ctx = ssl.create_default_context(cafile=str(bundle))
        # Key first, then cert: between the two writes the pair does not match, and the old
        # pair must keep serving.
        write_atomically(tmp_path / "tls.key", leaf.key_pem)
        time.sleep(1.5)
        write_atomically(tmp_path / "tls.crt", leaf.cert_pem)
        deadline = time.monotonic() + 10
        while served_serial(w.port, str(bundle)) == first:
            assert time.monotonic() < deadline, "new certificate never served"
            time.sleep(0.2)
        time.sleep(0.5)
        done.set()
        for t in threads:
            t.join()
        assert failures == []
        assert count[0] > 50
        assert served_serial(w.port, str(bundle)) == leaf.cert.serial_number
        metrics = w.get("/metrics")[1].decode()
        assert 'kvmesh_webhook_cert_reloads_total{result="ok"} 2.0' in metrics
        # the mismatched pair was seen for 1.5 s of 1 s ticks: reported once, not per tick
        assert 'kvmesh_webhook_cert_reloads_total{result="error"} 1.0' in metrics
    finally:
        w.stop()
    assert "keeping the previous pair" in (tmp_path / "webhook.log").read_text()
