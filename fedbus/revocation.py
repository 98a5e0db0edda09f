"""Revoking device certificates: the CA's certificate revocation list (CRL).

Mosquitto's mutual-TLS listener checks every client certificate against the CRL named by
its ``crlfile`` during the TLS handshake, and reads that file at start and again on
SIGHUP (measured with Debian's Mosquitto 2.0.11: a certificate revoked in a CRL written
while the broker runs is refused at the next handshake after the SIGHUP, not before; the
reload drops no session, and a TLS session resumed from before the revocation is refused
too). ``fedbus devices disable`` and ``remove`` revoke a device's certificates here, then
have the broker reload (``fedbus.broker.reload_broker``); ``enable`` lifts a disable.

A disable is a *hold* (reason certificateHold, which X.509 lets a CA lift again); a
remove is final (cessationOfOperation) and is never lifted. The CRL is signed by the CA
(so ``ca.key`` must be at hand), has no end before the CA's own (an expired CRL would make
OpenSSL refuse every certificate), and each new one is dated after the one it replaces
(OpenSSL prefers the newest of two CRLs from one issuer) and 10 minutes in the past
(a broker whose clock is a little behind must not see it as not yet valid).

Which certificates belong to a device: those the CA's register lists for its name
(``pki.record_issued``) and any others the caller passes (certificates issued before the
register existed).

``build_crl`` and ``read_crl`` are pure; the rest does the file work.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fedbus import pki
from fedbus.errors import ConfigError

__all__ = [
    "CRL_FILE",
    "Revoked",
    "build_crl",
    "ensure_crl",
    "lift_hold",
    "read_crl",
    "revoke",
]

CRL_FILE = "crl.pem"
_BACKDATE = dt.timedelta(minutes=10)
_STEP = dt.timedelta(seconds=1)  # the resolution of a CRL's date


@dataclass(frozen=True)
class Revoked:
    """One revoked certificate: its serial number, when, and whether only on hold."""

    serial: int
    revoked_at: dt.datetime
    hold: bool


# -- pure ---------------------------------------------------------------------------------------


def build_crl(ca: pki.CertificateAuthority, entries: Iterable[Revoked], *,
              last_update: dt.datetime) -> bytes:
    """The CA's CRL (PEM) listing ``entries``, dated ``last_update``, valid until the CA
    expires."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(last_update)
        .next_update(ca.certificate.not_valid_after_utc)
    )
    for entry in sorted(entries, key=lambda e: e.serial):
        reason = (x509.ReasonFlags.certificate_hold if entry.hold
                  else x509.ReasonFlags.cessation_of_operation)
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .add_extension(x509.CRLReason(reason), critical=False)
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def read_crl(pem: bytes, ca: pki.CertificateAuthority) -> tuple[dt.datetime, list[Revoked]]:
    """The date and entries of a CRL the CA signed (``ValueError`` otherwise)."""
    crl = x509.load_pem_x509_crl(pem)
    if crl.issuer != ca.certificate.subject or not crl.is_signature_valid(
        ca.key.public_key()
    ):
        raise ValueError("the CRL is not signed by this CA")
    entries = []
    for item in crl:
        try:
            reason = item.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = x509.ReasonFlags.unspecified
        entries.append(Revoked(item.serial_number, item.revocation_date_utc,
                               reason == x509.ReasonFlags.certificate_hold))
    return crl.last_update_utc, entries


def _date_after(previous: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    """The date of a new CRL: 10 minutes before ``now``, whole seconds, and after
    ``previous``; None while ``previous`` is too recent (wait a moment)."""
    wanted = (now - _BACKDATE).replace(microsecond=0)
    if previous is None or wanted > previous:
        return wanted
    later = previous.replace(microsecond=0) + _STEP
    return later if later <= now else wanted  # never dated in the future


# -- files --------------------------------------------------------------------------------------


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0644: a CRL is public) atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        os.fchmod(fh.fileno(), 0o644)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load(directory: Path) -> tuple[pki.CertificateAuthority, dt.datetime | None,
                                    list[Revoked]]:
    ca = pki.load_ca(directory)
    path = directory / CRL_FILE
    if not path.exists():
        return ca, None, []
    try:
        last, entries = read_crl(path.read_bytes(), ca)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the revocation list {path}: {exc}") from None
    return ca, last, entries


def _write(directory: Path, ca: pki.CertificateAuthority, previous: dt.datetime | None,
           entries: Iterable[Revoked], now: dt.datetime | None) -> Path:
    now = now or dt.datetime.now(dt.UTC)
    date = _date_after(previous, now)
    while previous is not None and date <= previous:  # two changes in the same second
        time.sleep(0.2)
        now = dt.datetime.now(dt.UTC)
        date = _date_after(previous, now)
    path = directory / CRL_FILE
    _replace(path, build_crl(ca, entries, last_update=date))
    return path


def ensure_crl(directory: Path, *, now: dt.datetime | None = None) -> Path:
    """The CRL of the CA in ``directory``, written empty if there is none yet (Mosquitto
    needs the file to exist when it starts)."""
    path = directory / CRL_FILE
    if not path.exists():
        ca = pki.load_ca(directory)
        _write(directory, ca, None, [], now)
    return path


def _serials(directory: Path, identity: str, certificates: Sequence[bytes]) -> set[int]:
    serials = set(pki.issued_serials(directory, identity))
    for pem in certificates:
        try:
            if pki.certificate_identity(pem) == identity:
                serials.add(x509.load_pem_x509_certificate(pem).serial_number)
        except ValueError:
            continue
    return serials


def revoke(directory: Path, identity: str, *, hold: bool, certificates: Sequence[bytes] = (),
           now: dt.datetime | None = None) -> list[int]:
    """Revoke every certificate of ``identity`` (from the register of the CA in
    ``directory`` and ``certificates``) in the CA's CRL; ``hold``: until ``lift_hold``.
    A final revocation is never turned into a hold. Returns the serial numbers revoked
    (empty: no certificate of ``identity`` is known, and nothing is written)."""
    serials = _serials(directory, identity, certificates)
    if not serials:
        return []
    ca, previous, entries = _load(directory)
    when = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    kept = {e.serial: e for e in entries}
    for serial in serials:
        old = kept.get(serial)
        if old is None or (old.hold and not hold):
            kept[serial] = Revoked(serial, when, hold)
    _write(directory, ca, previous, kept.values(), now)
    return sorted(serials)


def lift_hold(directory: Path, identity: str, *, certificates: Sequence[bytes] = (),
              now: dt.datetime | None = None) -> list[int]:
    """Take ``identity``'s certificates that are on hold off the CA's CRL (a final
    revocation stays). Returns the serial numbers let back in (empty: nothing written)."""
    serials = _serials(directory, identity, certificates)
    if not serials or not (directory / CRL_FILE).exists():
        return []
    ca, previous, entries = _load(directory)
    lifted = sorted(e.serial for e in entries if e.hold and e.serial in serials)
    if lifted:
        _write(directory, ca, previous, [e for e in entries if e.serial not in lifted], now)
    return lifted
