"""A small certificate authority for one fedbus installation (``cryptography``, no openssl).

Three kinds of certificate, all signed by the installation's own CA:

- the **CA** itself (``ca.crt``; its key ``ca.key`` is written once, mode 0600, and never
  overwritten: losing or replacing it means re-issuing every certificate);
- the **broker's server certificate**, whose subject alternative names list every DNS name
  and IP address clients use to reach it (loopback included), so that clients can verify
  the host name;
- a **client certificate per device** whose subject common name is the device id. Mosquitto's
  ``use_identity_as_username true`` takes that common name as the MQTT username, so the ACL
  (``%u`` patterns) treats a certificate exactly like a password login of the same name.

Keys are ECDSA on NIST P-256 with SHA-256 signatures: supported by every OpenSSL that
Mosquitto 2.0 builds against (Debian 12: OpenSSL 3.0) and by Python's ``ssl`` in TLS 1.2
and 1.3, accepted at OpenSSL 3's default security level, fast enough to generate on a
Raspberry Pi in milliseconds, and far smaller than RSA. Ed25519 certificates would be
nicer still, but TLS libraries and embedded MQTT clients support them unevenly.

The ``build_*`` functions are pure (keys and times are arguments); ``ensure_ca``,
``write_certificate`` and friends do the file work.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedbus.errors import ConfigError

__all__ = [
    "CA_CERT_FILE",
    "CA_DAYS",
    "CA_KEY_FILE",
    "CLIENT_DAYS",
    "LOOPBACK_NAMES",
    "SERVER_DAYS",
    "CertificateAuthority",
    "IssuedCertificate",
    "build_ca",
    "build_client_certificate",
    "build_server_certificate",
    "certificate_identity",
    "ensure_ca",
    "issue_client_certificate",
    "issue_server_certificate",
    "issued_serials",
    "load_ca",
    "new_key",
    "record_issued",
    "server_certificate_covers",
    "write_issued",
]

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
# the register of client certificates the CA issued: one JSON line each (serial number,
# identity), appended; what fedbus.revocation revokes a device's certificates by
ISSUED_FILE = "issued.jsonl"
# Validity in days. The CA outlives its certificates; a leaf can be re-issued at any time
# from the CA without touching the devices' trust (they trust the CA, not the leaf).
CA_DAYS = 10 * 365
SERVER_DAYS = 2 * 365
CLIENT_DAYS = 2 * 365
# Certificates are valid from a little before "now", so that a device whose clock runs a
# few minutes behind accepts a freshly issued one.
_BACKDATE = dt.timedelta(minutes=10)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key, both PEM."""

    certificate_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)


# -- pure: keys and certificates --------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(now: dt.datetime, days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise ValueError(f"validity must be at least 1 day, got {days}")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now - _BACKDATE, now + dt.timedelta(days=days)


def build_ca(
    key: ec.EllipticCurvePrivateKey, *, common_name: str, now: dt.datetime, days: int = CA_DAYS
) -> CertificateAuthority:
    """A self-signed CA certificate for ``key`` that may sign leaf certificates only."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(now, days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, cert)


def _leaf(
    ca: CertificateAuthority,
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    now: dt.datetime,
    days: int,
    san: x509.SubjectAlternativeName | None = None,
) -> IssuedCertificate:
    start, end = _validity(now, days)
    ca_end = ca.certificate.not_valid_after_utc
    if end > ca_end:  # a leaf never outlives the CA that vouches for it
        end = ca_end
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or any(c.isspace() or c in "/:@" for c in name):
        raise ValueError(f"{name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name.lower())


def _server_names(names: Sequence[str]) -> list[str]:
    """Loopback names first, then ``names`` without duplicates or wildcard addresses."""
    out: list[str] = []
    for name in [*LOOPBACK_NAMES, *names]:
        if name in ("0.0.0.0", "::"):  # "every interface" is not a name clients use
            continue
        key = name.lower()
        if key not in out:
            out.append(key)
    return out


def build_server_certificate(
    ca: CertificateAuthority,
    key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    *,
    now: dt.datetime,
    days: int = SERVER_DAYS,
) -> IssuedCertificate:
    """The broker's certificate, valid for ``names`` (DNS names or IP addresses) and for
    loopback (``localhost``, 127.0.0.1, ::1)."""
    all_names = _server_names(names)
    san = x509.SubjectAlternativeName([_general_name(n) for n in all_names])
    return _leaf(ca, key, common_name=all_names[-1], usage=ExtendedKeyUsageOID.SERVER_AUTH,
                 now=now, days=days, san=san)


def build_client_certificate(
    ca: CertificateAuthority,
    key: ec.EllipticCurvePrivateKey,
    identity: str,
    *,
    now: dt.datetime,
    days: int = CLIENT_DAYS,
) -> IssuedCertificate:
    """A client certificate whose subject common name is ``identity`` (a device id, or
    ``coordinator``): Mosquitto's ``use_identity_as_username`` makes it the username."""
    if not identity or any(c.isspace() for c in identity):
        raise ValueError(f"invalid certificate identity {identity!r}")
    return _leaf(ca, key, common_name=identity, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                 now=now, days=days)


def certificate_identity(certificate_pem: bytes) -> str:
    """The subject common name of a PEM certificate (a device's MQTT username under mTLS)."""
    cert = x509.load_pem_x509_certificate(certificate_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError("the certificate has no common name")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def server_certificate_covers(
    certificate_pem: bytes, names: Sequence[str], *, now: dt.datetime, margin_days: int = 30
) -> bool:
    """True if the certificate names every one of ``names`` (and loopback) and stays valid
    for at least ``margin_days`` more days."""
    cert = x509.load_pem_x509_certificate(certificate_pem)
    if cert.not_valid_after_utc < now + dt.timedelta(days=margin_days):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(n).lower() for n in san.get_values_for_type(x509.DNSName)}
    have |= {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    want = set()
    for name in _server_names(names):
        try:
            want.add(str(ipaddress.ip_address(name)))
        except ValueError:
            want.add(name)
    return want <= have


# -- files ------------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; refuse to replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(
            f"{path} already exists; fedbus does not overwrite keys or certificates (move it "
            "away first to replace it)"
        ) from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def write_issued(issued: IssuedCertificate, cert_path: Path, key_path: Path) -> None:
    """Write a certificate (mode 0644) and its key (mode 0600). Neither may exist yet."""
    for path in (cert_path, key_path):
        if path.exists():
            raise ConfigError(
                f"{path} already exists; fedbus does not overwrite keys or certificates "
                "(move it away first to replace it)"
            )
    _write_new(key_path, issued.key_pem, 0o600)
    _write_new(cert_path, issued.certificate_pem, 0o644)


def load_ca(directory: Path) -> CertificateAuthority:
    """The CA in ``directory`` (``ca.crt`` and ``ca.key``)."""
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the certificate authority in {directory}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is not an ECDSA key")
    if cert.public_key() != key.public_key():
        raise ConfigError(f"{key_path} is not the key of {cert_path}")
    return CertificateAuthority(key, cert)


def ensure_ca(
    directory: Path, *, common_name: str = "fedbus CA", days: int = CA_DAYS,
    now: dt.datetime | None = None,
) -> tuple[CertificateAuthority, bool]:
    """Load the CA in ``directory``, or create it there when neither file exists.

    Returns the CA and whether it was created. Half a CA (one file without the other) is a
    ConfigError, never silently replaced.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if cert_path.exists() or key_path.exists():
        if not (cert_path.exists() and key_path.exists()):
            present, missing = (
                (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
            )
            raise ConfigError(
                f"{present} exists but {missing} does not; restore it, or move {present} away "
                "to make a new CA (every certificate must then be issued again)"
            )
        return load_ca(directory), False
    ca = build_ca(new_key(), common_name=common_name, now=now or _utcnow(), days=days)
    _write_new(key_path, _key_pem(ca.key), 0o600)
    _write_new(cert_path, ca.certificate_pem, 0o644)
    return ca, True


def issue_server_certificate(
    ca: CertificateAuthority, names: Sequence[str], cert_path: Path, key_path: Path, *,
    days: int = SERVER_DAYS, now: dt.datetime | None = None,
) -> IssuedCertificate:
    """Issue a server certificate with a new key and write it (the files must not exist)."""
    issued = build_server_certificate(ca, new_key(), names, now=now or _utcnow(), days=days)
    write_issued(issued, cert_path, key_path)
    return issued


def issue_client_certificate(
    ca: CertificateAuthority, identity: str, cert_path: Path, key_path: Path, *,
    days: int = CLIENT_DAYS, now: dt.datetime | None = None, register: Path | None = None,
) -> IssuedCertificate:
    """Issue a client certificate for ``identity`` with a new key and write it (the files
    must not exist); ``register``: the CA's directory, whose register notes it."""
    issued = build_client_certificate(ca, new_key(), identity, now=now or _utcnow(), days=days)
    write_issued(issued, cert_path, key_path)
    if register is not None:
        record_issued(register, issued.certificate_pem)
    return issued


def record_issued(directory: Path, certificate_pem: bytes) -> None:
    """Note a client certificate the CA in ``directory`` issued in its register."""
    cert = x509.load_pem_x509_certificate(certificate_pem)
    line = json.dumps({"serial": format(cert.serial_number, "x"),
                       "identity": certificate_identity(certificate_pem)})
    fd = os.open(directory / ISSUED_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with os.fdopen(fd, "a") as fh:
        fh.write(line + "\n")


def issued_serials(directory: Path, identity: str) -> list[int]:
    """Serial numbers of the client certificates the register lists for ``identity``."""
    try:
        text = (directory / ISSUED_FILE).read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read {directory / ISSUED_FILE}: {exc}") from None
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            if entry["identity"] == identity:
                found.append(int(entry["serial"], 16))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    return found
