"""Revoking device certificates (fedbus.revocation), and `fedbus devices disable|enable`
refusing a certificate at the TLS handshake of a real Mosquitto without dropping anyone."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509

from fedbus import pki, revocation
from fedbus.broker import LocalBroker
from fedbus.tls import TlsSettings
from fedbus.transport import ConnectionSettings, MqttClient

if TYPE_CHECKING:
    from conftest import MqttClientFactory

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
TIMEOUT = 5.0


def _ca(directory: Path) -> pki.CertificateAuthority:
    ca, _ = pki.ensure_ca(directory, now=NOW - dt.timedelta(days=1))
    return ca


def _issue(directory: Path, ca: pki.CertificateAuthority, identity: str, name: str,
           register: bool = True) -> int:
    cert = directory / f"{name}.crt"
    issued = pki.issue_client_certificate(ca, identity, cert, directory / f"{name}.key",
                                          now=NOW, register=directory if register else None)
    return issued.certificate.serial_number


def _listed(directory: Path, ca: pki.CertificateAuthority) -> tuple[dt.datetime, dict[int, bool]]:
    last, entries = revocation.read_crl((directory / revocation.CRL_FILE).read_bytes(), ca)
    return last, {e.serial: e.hold for e in entries}


def test_a_crl_round_trips_and_lasts_as_long_as_the_ca(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    entries = [revocation.Revoked(7, NOW, True), revocation.Revoked(3, NOW, False)]
    pem = revocation.build_crl(ca, entries, last_update=NOW)
    last, read = revocation.read_crl(pem, ca)
    assert last == NOW and sorted(read, key=lambda e: e.serial) == entries[::-1]
    crl = x509.load_pem_x509_crl(pem)
    assert crl.next_update_utc == ca.certificate.not_valid_after_utc
    with pytest.raises(ValueError, match="not signed by this CA"):
        revocation.read_crl(pem, _ca(tmp_path / "other"))


def test_disable_holds_remove_is_final_and_enable_lifts_only_a_hold(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    a1, a2 = _issue(tmp_path, ca, "dev-a", "a1"), _issue(tmp_path, ca, "dev-a", "a2")
    b = _issue(tmp_path, ca, "dev-b", "b")
    # issued before the register existed: found by the certificate handed over
    c = _issue(tmp_path, ca, "dev-c", "c", register=False)
    revocation.ensure_crl(tmp_path, now=NOW)
    first, listed = _listed(tmp_path, ca)
    assert listed == {} and first == NOW - dt.timedelta(minutes=10)

    assert revocation.revoke(tmp_path, "dev-a", hold=True, now=NOW) == sorted([a1, a2])
    second, listed = _listed(tmp_path, ca)
    assert listed == {a1: True, a2: True}
    assert second > first  # OpenSSL prefers the newest CRL of an issuer: each is later
    assert revocation.revoke(tmp_path, "dev-c", hold=False, now=NOW) == []
    assert revocation.revoke(tmp_path, "dev-c", hold=False, now=NOW,
                             certificates=[(tmp_path / "c.crt").read_bytes(),
                                           (tmp_path / "b.crt").read_bytes()]) == [c]
    third, listed = _listed(tmp_path, ca)
    assert listed == {a1: True, a2: True, c: False} and third > second

    assert revocation.lift_hold(tmp_path, "dev-a", now=NOW) == sorted([a1, a2])
    assert _listed(tmp_path, ca)[1] == {c: False}
    revocation.revoke(tmp_path, "dev-b", hold=False, now=NOW)
    revocation.revoke(tmp_path, "dev-b", hold=True, now=NOW)  # a final one stays final
    assert revocation.lift_hold(tmp_path, "dev-b", now=NOW) == []
    assert _listed(tmp_path, ca)[1] == {c: False, b: False}


def test_reloading_a_directory_where_no_broker_runs_does_nothing(tmp_path: Path) -> None:
    from fedbus.broker import LOCK_FILE, reload_broker

    assert reload_broker(tmp_path) is None  # no lock file
    (tmp_path / LOCK_FILE).write_text(f"{os.getpid()}\n")  # a lock file nobody holds
    assert reload_broker(tmp_path) is None


def _handshake(broker: LocalBroker, username: str) -> bytes | OSError:
    """The first bytes the mutual-TLS listener answers to a CONNECT made with
    ``username``'s certificate, or the error that ended the TLS handshake."""
    import socket

    cert, key = broker.client_certificate(username)
    ctx = ssl.create_default_context(cafile=str(broker.ca_file))
    ctx.load_cert_chain(str(cert), str(key))
    connect = bytes([0x10, 13, 0, 4, *b"MQTT", 5, 0x02, 0, 60, 0, 0, 0])  # empty client id
    with socket.create_connection((broker.host, broker.mtls_port), timeout=TIMEOUT) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=broker.host) as tls:
                tls.sendall(connect)
                return tls.recv(4)
        except OSError as exc:
            return exc


def _devices(broker: LocalBroker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedbus", "devices", "--credentials",
         str(broker.credentials_file), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"},
    )


@pytest.mark.broker
def test_a_disabled_certificate_is_refused_at_the_handshake_and_nobody_else_drops(
        broker: LocalBroker, mqtt_client: MqttClientFactory) -> None:
    from conftest import CONNECT_TIMEOUT
    from test_tls import wait_for

    # a password session (plain listener) and two certificate sessions
    drops: list[Any] = []
    coordinator = mqtt_client(broker, "coordinator")
    coordinator.on_disconnect = lambda *a: drops.append(a)
    sessions = {}
    for device in ("dev-a", "dev-b"):
        cert, key = broker.client_certificate(device)
        client = MqttClient(
            ConnectionSettings(broker.host, broker.mtls_port, device, device, "",
                               reconnect_max=1.0, connack_timeout=3.0,
                               tls=TlsSettings(broker.ca_file, cert, key)),
            on_message=lambda m: None)
        client.start()
        assert client.wait_connected(CONNECT_TIMEOUT), client.last_error
        sessions[device] = client
    try:
        done = _devices(broker, "disable", "dev-a")
        assert done.returncode == 0, done.stderr
        assert "on hold" in done.stdout and "re-read it" in done.stdout

        # dev-a: its live session was ended, and the TLS handshake now refuses its
        # certificate (before, it got CONNACK 0x00 with no rights)
        refused = _handshake(broker, "dev-a")
        assert isinstance(refused, ssl.SSLError | ConnectionError), refused
        wait_for(lambda: not sessions["dev-a"].connected, TIMEOUT, "dev-a disconnected")
        # nobody else dropped: dev-b's certificate session and the password session stay,
        # and both still work; a new password login succeeds
        assert sessions["dev-b"].connects == 1 and sessions["dev-b"].connected
        assert sessions["dev-b"].publish(f"{broker.prefix}/update/dev-b", b"x").wait(TIMEOUT)
        assert coordinator.is_connected() and drops == []
        mqtt_client(broker, "dev-c")

        done = _devices(broker, "enable", "dev-a")
        assert done.returncode == 0, done.stderr
        assert "let back in" in done.stdout
        answer = _handshake(broker, "dev-a")
        assert isinstance(answer, bytes) and answer[:1] == b"\x20", answer
        assert sessions["dev-b"].connects == 1 and drops == []
        # (this one takes dev-b's session over: the client id is the certificate's name)
        answer = _handshake(broker, "dev-b")
        assert isinstance(answer, bytes) and answer[:1] == b"\x20", answer
    finally:
        for client in sessions.values():
            client.stop()
