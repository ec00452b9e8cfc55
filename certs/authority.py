"""CA and serving certificates (pure: the clock and names come in as arguments).

ECDSA P-256 keys: small, fast handshakes, accepted by the Kubernetes API server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = dt.timedelta(days=365)
LEAF_VALIDITY = dt.timedelta(days=7)
# Renew when less than this fraction of the lifetime is left (cert-manager renews at 1/3).
RENEW_FRACTION = 1 / 3


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        k = serialization.load_pem_private_key(self.key_pem, None)
        assert isinstance(k, ec.EllipticCurvePrivateKey)
        return k


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _backdate(validity: dt.timedelta) -> dt.timedelta:
    # Tolerate clock skew between replicas and the API server, without eating short
    # (test) lifetimes.
    return min(dt.timedelta(minutes=5), validity / 10)


def new_ca(now: dt.datetime, common_name: str = "kvmesh-webhook-ca",
           validity: dt.timedelta = CA_VALIDITY) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _backdate(validity))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_leaf(ca: KeyPair, hosts: list[str], now: dt.datetime,
               validity: dt.timedelta = LEAF_VALIDITY) -> KeyPair:
    """A serving certificate for `hosts` (DNS names and/or IP addresses)."""
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    return _leaf(ca, [x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])], sans,
                 ExtendedKeyUsageOID.SERVER_AUTH, now, validity)


def issue_client(ca: KeyPair, user: str, groups: tuple[str, ...], now: dt.datetime,
                 validity: dt.timedelta = LEAF_VALIDITY) -> KeyPair:
    """A client certificate; the Kubernetes API server reads the user from the CN and the
    groups from the O attributes."""
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    subject.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
    return _leaf(ca, subject, [], ExtendedKeyUsageOID.CLIENT_AUTH, now, validity)


def _leaf(ca: KeyPair, subject: list[x509.NameAttribute], sans: list[x509.GeneralName],
          usage: x509.ObjectIdentifier, now: dt.datetime, validity: dt.timedelta) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = ca.cert
    not_after = min(now + validity, ca_cert.not_valid_after_utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name(subject))
               .issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - _backdate(validity))
               .not_valid_after(not_after))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = (builder
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def signing_key() -> tuple[bytes, bytes]:
    """A bare key pair (private PKCS#8 PEM, public PEM), e.g. for service-account tokens."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return _key_pem(key), public


def needs_renewal(cert: x509.Certificate, now: dt.datetime) -> bool:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= end - (end - start) * RENEW_FRACTION


# --- the CA Secret's life cycle (pure) ---------------------------------------------------------
#
# Secret data: ca.crt/ca.key = the CA that signs serving leaves now; next.crt/next.key = its
# successor while the webhook configuration does not trust it yet; bundle.crt = every CA the
# API server must trust (current, next, and previous CAs until they expire, because leaves
# they signed may still be served). Rotation never leaves a moment where a served leaf is not
# trusted: the successor enters the bundle first, becomes current only once the live
# configuration carries it, and the old CA stays in the bundle after that.


@dataclass(frozen=True)
class CAState:
    current: KeyPair
    next: "KeyPair | None"
    bundle: tuple[bytes, ...]  # PEM certificates

    def to_secret_data(self) -> dict[str, bytes]:
        data = {"ca.crt": self.current.cert_pem, "ca.key": self.current.key_pem,
                "bundle.crt": b"".join(self.bundle)}
        if self.next:
            data["next.crt"], data["next.key"] = self.next.cert_pem, self.next.key_pem
        return data

    @classmethod
    def from_secret_data(cls, data: dict[str, bytes]) -> "CAState":
        nxt = None
        if data.get("next.crt") and data.get("next.key"):
            nxt = KeyPair(data["next.crt"], data["next.key"])
        return cls(KeyPair(data["ca.crt"], data["ca.key"]), nxt,
                   tuple(split_pem(data.get("bundle.crt", b"")) or [data["ca.crt"]]))

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(self.bundle)


def split_pem(blob: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    out = []
    for part in blob.split(marker):
        part = part.strip()
        if part:
            out.append(part + b"\n" + marker + b"\n")
    return out


def fingerprint(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())


def bundle_contains(bundle_pem: bytes, cert_pem: bytes) -> bool:
    fp = fingerprint(cert_pem)
    return any(fingerprint(c) == fp for c in split_pem(bundle_pem))


def plan_ca(state: "CAState | None", live_bundle: bytes, now: dt.datetime,
            validity: dt.timedelta = CA_VALIDITY) -> CAState:
    """The CA Secret's next state given what the live webhook configuration trusts."""
    if state is None:
        ca = new_ca(now, validity=validity)
        return CAState(ca, None, (ca.cert_pem,))
    current, nxt = state.current, state.next
    bundle = list(state.bundle)
    if nxt is not None and bundle_contains(live_bundle, nxt.cert_pem):
        current, nxt = nxt, None  # the API server trusts the successor: sign with it now
    if nxt is None and needs_renewal(current.cert, now):
        nxt = new_ca(now, validity=validity)
    for pem in (current.cert_pem, nxt.cert_pem if nxt else None):
        if pem and not bundle_contains(b"".join(bundle), pem):
            bundle.append(pem)
    # Drop expired CAs only: a previous CA's leaves expire no later than the CA itself.
    bundle = [b for b in bundle
              if x509.load_pem_x509_certificate(b).not_valid_after_utc > now]
    return CAState(current, nxt, tuple(bundle))


def leaf_trusted(leaf_pem: bytes, bundle_pem: bytes, now: dt.datetime) -> bool:
    """True when a CA of the bundle signed the leaf and the leaf is within its validity."""
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        return False
    for pem in split_pem(bundle_pem):
        ca = x509.load_pem_x509_certificate(pem)
        if ca.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(ca)
            return True
        except Exception:  # not its signature (or another key type): try the next CA
            continue
    return False


def leaf_needs_reissue(leaf_pem: "bytes | None", ca: KeyPair, hosts: list[str],
                       now: dt.datetime) -> bool:
    if not leaf_pem:
        return True
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    if needs_renewal(leaf, now):
        return True
    try:
        leaf.verify_directly_issued_by(ca.cert)
    except Exception:
        return True  # signed by a CA that is no longer current
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | \
        {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return not set(hosts) <= have
