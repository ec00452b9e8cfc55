"""The local control plane's certificates (no cluster needed): what kube-apiserver and its
clients are given works for mutual TLS, with the user and groups where the API server reads
them."""

from __future__ import annotations

import socket
import ssl
import threading

from cryptography.hazmat.primitives import serialization

from kvmesh.local.devcluster import _PKI


def test_serving_and_client_certificates_make_mutual_tls(tmp_path):
    pki = _PKI(tmp_path)
    crt, key = pki.serving("apiserver", ["kubernetes", "localhost", "127.0.0.1", "10.96.0.1"])
    admin_crt, admin_key = pki.client("admin", "kvmesh-admin", ("system:masters",))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(crt, key)
    server.load_verify_locations(pki.ca_cert)
    server.verify_mode = ssl.CERT_REQUIRED  # as --client-ca-file does
    client = ssl.create_default_context(cafile=str(pki.ca_cert))
    client.load_cert_chain(admin_crt, admin_key)
    seen = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def accept():
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as s:
                seen["subject"] = s.getpeercert()["subject"]
                s.sendall(b"ok")
        t = threading.Thread(target=accept)
        t.start()
        with socket.create_connection(listener.getsockname()) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.recv(2) == b"ok"
        t.join(10)
    assert seen["subject"] == ((("organizationName", "system:masters"),),
                               (("commonName", "kvmesh-admin"),))
    assert oct(admin_key.stat().st_mode & 0o777) == "0o600"


def test_service_account_keys_are_a_pair(tmp_path):
    pub, key = _PKI(tmp_path).sa_keypair()
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == pub.read_bytes()
