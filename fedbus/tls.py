"""TLS for fedbus's MQTT clients: the choice between TLS and plain MQTT, the client's
``ssl.SSLContext``, and what a failed TLS connection means.

The policy, one rule for the agent and the coordinator alike: TLS unless asked otherwise
(``tls`` False), and plain MQTT to a host beyond loopback only with ``insecure_plaintext``.
Left unset (``tls`` None), TLS is used for any host that is not loopback and whenever a CA
or client certificate is given; plain MQTT on loopback otherwise.

Every TLS client verifies the broker: its certificate must chain to the given CA (or to the
system's trusted CAs when none is given) and name the host it was asked for, over TLS 1.2
or newer. A client certificate (mTLS) replaces the password: the broker takes its common
name as the MQTT username.

No MQTT here: ``fedbus.transport`` hands the context to paho and uses
``describe_failure`` to turn an ``ssl`` exception into a :class:`fedbus.errors.TlsError`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedbus.errors import ConfigError

__all__ = [
    "PLAIN_PORT",
    "TLS_PORT",
    "BrokerTarget",
    "Failure",
    "TlsSettings",
    "check_transport_choice",
    "client_context",
    "describe_failure",
    "is_loopback",
    "uses_tls",
]

PLAIN_PORT = 1883
TLS_PORT = 8883

# OpenSSL verify codes (x509_vfy.h) a client sees for the broker's certificate.
_UNKNOWN_CA_CODES = {2, 18, 19, 20, 21}
_EXPIRED_CODES = {9, 10}  # not yet valid, expired
_HOSTNAME_CODES = {62, 64}  # host name mismatch, IP address mismatch
# TLS alerts a broker sends when it refuses our client certificate (or wants one).
_CERT_ALERTS = (
    "ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED", "ALERT_CERTIFICATE_UNKNOWN", "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED", "ALERT_HANDSHAKE_FAILURE", "ALERT_ACCESS_DENIED",
)


@dataclass(frozen=True)
class TlsSettings:
    """What a TLS client trusts and, for mTLS, who it is."""

    ca_file: Path | None = None  # PEM CA(s) the broker's certificate must chain to; None: system
    cert_file: Path | None = None  # client certificate (PEM), its common name = the username
    key_file: Path | None = None  # its private key (PEM, unencrypted)

    @property
    def client_certificate(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class Failure:
    """What a failed TLS connection means: ``reason`` is a short code, ``detail`` one
    sentence, ``fatal`` whether retrying is pointless (a configuration mistake)."""

    reason: str
    detail: str
    fatal: bool


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uses_tls(host: str, tls: bool | None, *, ca_file: Path | None, cert_file: Path | None) -> bool:
    """The policy: ``tls`` when set; else TLS beyond loopback or when TLS files are given."""
    if tls is not None:
        return tls
    return not is_loopback(host) or ca_file is not None or cert_file is not None


class BrokerTarget:
    """Where a process's broker settings lead: the TLS policy applied to its ``host``,
    ``port``, ``tls``, ``tls_ca``, ``tls_cert`` and ``tls_key`` settings. Mixed into the
    agent's and the coordinator's configuration dataclasses, which declare those fields."""

    host: str
    port: int | None
    tls: bool | None
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None

    def uses_tls(self) -> bool:
        return uses_tls(self.host, self.tls, ca_file=self.tls_ca, cert_file=self.tls_cert)

    def broker_port(self) -> int:
        """``port``, or by default 8883 with TLS and 1883 without."""
        if self.port is not None:
            return self.port
        return TLS_PORT if self.uses_tls() else PLAIN_PORT

    def tls_settings(self) -> TlsSettings | None:
        """What the transport needs for TLS, or None for plain MQTT."""
        if not self.uses_tls():
            return None
        return TlsSettings(ca_file=self.tls_ca, cert_file=self.tls_cert, key_file=self.tls_key)


def check_transport_choice(
    host: str, tls: bool | None, *, insecure_plaintext: bool, ca_file: Path | None,
    cert_file: Path | None, key_file: Path | None,
) -> None:
    """``ValueError`` with one line when the TLS settings contradict each other or would send
    credentials in clear text beyond loopback."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("tls_cert and tls_key go together: give both (mTLS) or neither")
    if tls is False and (ca_file is not None or cert_file is not None):
        raise ValueError("tls is off but tls_ca/tls_cert are given: drop one or the other")
    on = uses_tls(host, tls, ca_file=ca_file, cert_file=cert_file)
    if not on and not is_loopback(host) and not insecure_plaintext:
        raise ValueError(
            f"plain MQTT to {host} (not loopback) would send passwords, models and updates in "
            "clear text: use TLS (the default; port 8883), or give insecure_plaintext "
            "(--insecure-plaintext) to accept that"
        )


def client_context(settings: TlsSettings, *, now: dt.datetime | None = None) -> ssl.SSLContext:
    """A client context that verifies the broker (CA, host name) over TLS 1.2 or newer and,
    with a client certificate, presents it. ``ConfigError`` for unreadable files, a key that
    does not match its certificate, or a client certificate outside its validity period."""
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=None if settings.ca_file is None else str(settings.ca_file),
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA file {settings.ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if settings.cert_file is not None:
        key = settings.key_file
        _check_client_certificate(settings.cert_file, now or dt.datetime.now(dt.UTC))
        try:
            ctx.load_cert_chain(str(settings.cert_file), None if key is None else str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the client certificate {settings.cert_file} with key {key}: {exc}"
            ) from None
    return ctx


def _check_client_certificate(path: Path, now: dt.datetime) -> None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the client certificate {path}: {exc}") from None
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now > end:
        raise ConfigError(
            f"the client certificate {path} expired on {end:%Y-%m-%d %H:%M} UTC: the broker "
            "would refuse it; issue a new one (docs/operations.md, certificates)"
        )
    if now < start:
        raise ConfigError(
            f"the client certificate {path} is valid only from {start:%Y-%m-%d %H:%M} UTC: "
            "is this device's clock right?"
        )


def describe_failure(
    exc: BaseException, *, handshake_done: bool, client_certificate: bool
) -> Failure:
    """What ``exc`` (raised during or right after a TLS handshake) means for the user.

    ``handshake_done``: the handshake had completed (with TLS 1.3 a broker that refuses the
    client's certificate says so only after it, on the first read).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        message = exc.verify_message or str(exc)
        if code in _HOSTNAME_CODES:
            return Failure("hostname_mismatch", f"the broker's certificate does not name this "
                           f"host ({message}); connect with a name the certificate lists", True)
        if code in _UNKNOWN_CA_CODES:
            return Failure("unknown_ca", f"the broker's certificate is not signed by a CA we "
                           f"trust ({message}); check tls_ca", True)
        if code in _EXPIRED_CODES:
            return Failure("server_certificate_expired", f"the broker's certificate is outside "
                           f"its validity period ({message}); renew it, or check this clock",
                           True)
        return Failure("server_certificate_invalid",
                       f"the broker's certificate failed verification ({message})", True)
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
        reason = str(getattr(exc, "reason", "") or exc)
        if any(alert in reason for alert in _CERT_ALERTS):
            if client_certificate:
                why = "refused our client certificate (expired, revoked or signed by a CA it "
                why += "does not trust)"
            else:
                why = "wants a client certificate (an mTLS port: give tls_cert and tls_key, or "
                why += "use the password port)"
            return Failure("certificate_refused", f"the broker {why}: {reason}", True)
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason:
            return Failure("not_tls", "the server does not speak TLS on this port (plain MQTT "
                           "is usually 1883, TLS 8883)", False)
        return Failure("handshake", f"the TLS handshake failed: {reason}", False)
    if handshake_done:
        if client_certificate:
            detail = ("the broker closed the TLS connection before its CONNACK: it probably "
                      "refused our client certificate (expired, revoked or from another CA)")
        else:
            detail = ("the broker closed the TLS connection before its CONNACK: it probably "
                      "wants a client certificate (an mTLS port)")
        return Failure("closed", detail, False)
    return Failure("closed", "the connection closed during the TLS handshake: is this a TLS "
                   "port? (plain MQTT is usually 1883, TLS 8883)", False)
