"""The CA life cycle: bootstrap, rotation with overlap, and leaf checks (pure)."""

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmesh.certs import authority as a

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def test_bootstrap_creates_a_ca_in_its_own_bundle():
    s = a.plan_ca(None, b"", T0)
    assert s.next is None and s.bundle == (s.current.cert_pem,)
    leaf = a.issue_leaf(s.current, ["kvmesh-webhook.kvmesh-system.svc", "127.0.0.1"], T0)
    assert a.leaf_trusted(leaf.cert_pem, s.bundle_pem, T0)
    assert not a.leaf_trusted(leaf.cert_pem, a.new_ca(T0).cert_pem, T0)


def test_rotation_keeps_every_served_leaf_trusted():
    s = a.plan_ca(None, b"", T0)
    old_leaf = a.issue_leaf(s.current, ["h"], T0)
    live = s.bundle_pem
    t = T0 + dt.timedelta(days=250)  # past 2/3 of the CA's 365 days
    s2 = a.plan_ca(s, live, t)
    assert s2.current == s.current and s2.next is not None  # successor not yet trusted
    assert a.bundle_contains(s2.bundle_pem, s2.next.cert_pem)
    assert a.bundle_contains(s2.bundle_pem, s.current.cert_pem)
    # Same answer until the live configuration carries the new bundle.
    assert a.plan_ca(s2, live, t).current == s.current
    s3 = a.plan_ca(s2, s2.bundle_pem, t)
    assert s3.current == s2.next and s3.next is None
    new_leaf = a.issue_leaf(s3.current, ["h"], t)
    # Old leaves (from before the promotion) and new ones are both trusted.
    for leaf in (old_leaf, new_leaf):
        assert a.leaf_trusted(leaf.cert_pem, s3.bundle_pem, min(t, leaf.cert.not_valid_after_utc
                                                                - dt.timedelta(seconds=1)))
    # Once the old CA expires it leaves the bundle.
    t_late = T0 + dt.timedelta(days=366)
    s4 = a.plan_ca(s3, s3.bundle_pem, t_late)
    assert not a.bundle_contains(s4.bundle_pem, s.current.cert_pem)


def test_secret_round_trip():
    s = a.plan_ca(None, b"", T0)
    s2 = a.plan_ca(s, b"", T0 + dt.timedelta(days=300))
    assert a.CAState.from_secret_data(s2.to_secret_data()) == s2


def test_leaf_reissue_rules():
    ca = a.new_ca(T0)
    leaf = a.issue_leaf(ca, ["h", "127.0.0.1"], T0)
    assert not a.leaf_needs_reissue(leaf.cert_pem, ca, ["h"], T0)
    assert a.leaf_needs_reissue(leaf.cert_pem, ca, ["other"], T0)
    assert a.leaf_needs_reissue(leaf.cert_pem, a.new_ca(T0), ["h"], T0)
    assert a.leaf_needs_reissue(leaf.cert_pem, ca, ["h"], T0 + dt.timedelta(days=6))
    assert a.leaf_needs_reissue(None, ca, ["h"], T0)
    assert not a.leaf_trusted(leaf.cert_pem, ca.cert_pem, T0 + dt.timedelta(days=8))


def test_client_certificate_names_user_and_groups():
    ca = a.new_ca(T0)
    cert = a.issue_client(ca, "kvmesh-admin", ("system:masters",), T0).cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kvmesh-admin"
    assert [o.value for o in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] \
        == ["system:masters"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.cert)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_signing_key_pair_matches():
    private, public = a.signing_key()
    key = serialization.load_pem_private_key(private, None)
    assert key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) == public
