"""fedbus.pki and fedbus.tls without a broker: certificates, files, the TLS policy, and
what a failed handshake means."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedbus import pki
from fedbus.errors import ConfigError
from fedbus.tls import (
    TlsSettings,
    check_transport_choice,
    client_context,
    describe_failure,
    is_loopback,
    uses_tls,
)

NOW = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.build_ca(pki.new_key(), common_name="test CA", now=NOW, days=365)


def _san(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (set(san.get_values_for_type(x509.DNSName)),
            {str(a) for a in san.get_values_for_type(x509.IPAddress)})


# -- certificates ------------------------------------------------------------------------------


def test_the_ca_signs_leaves_only_and_uses_p256(ca: pki.CertificateAuthority) -> None:
    cert = ca.certificate
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(
        days=365, minutes=10)


def test_the_server_certificate_names_loopback_and_the_given_hosts(
    ca: pki.CertificateAuthority,
) -> None:
    issued = pki.build_server_certificate(
        ca, pki.new_key(), ["Broker.LAN", "192.168.1.10", "0.0.0.0", "broker.lan"], now=NOW,
        days=30)
    cert = issued.certificate
    dns, ips = _san(cert)
    assert dns == {"localhost", "broker.lan"}  # lower case, once; 0.0.0.0 is no name
    assert ips == {"127.0.0.1", "::1", "192.168.1.10"}
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == ca.certificate.subject
    ca.certificate.public_key().verify(  # type: ignore[union-attr]
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))


def test_a_client_certificate_carries_the_device_id_as_its_common_name(
    ca: pki.CertificateAuthority,
) -> None:
    issued = pki.build_client_certificate(ca, pki.new_key(), "device-07", now=NOW, days=10)
    assert pki.certificate_identity(issued.certificate_pem) == "device-07"
    cert = issued.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-07"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # valid from ten minutes before NOW (clocks a little behind), for 10 days
    assert cert.not_valid_before_utc == NOW - dt.timedelta(minutes=10)
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=10)


def test_a_leaf_never_outlives_its_ca(ca: pki.CertificateAuthority) -> None:
    issued = pki.build_client_certificate(ca, pki.new_key(), "d1", now=NOW, days=5000)
    assert issued.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


@pytest.mark.parametrize("bad", ["", "two words", "a/b", "host:1883"])
def test_bad_server_names_are_refused(ca: pki.CertificateAuthority, bad: str) -> None:
    with pytest.raises(ValueError, match="neither an IP address nor a DNS name"):
        pki.build_server_certificate(ca, pki.new_key(), [bad], now=NOW)


@pytest.mark.parametrize("bad", ["", "two words"])
def test_bad_client_identities_are_refused(ca: pki.CertificateAuthority, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid certificate identity"):
        pki.build_client_certificate(ca, pki.new_key(), bad, now=NOW)


def test_server_certificate_covers_names_and_time(ca: pki.CertificateAuthority) -> None:
    pem = pki.build_server_certificate(ca, pki.new_key(), ["b.lan"], now=NOW,
                                       days=60).certificate_pem
    assert pki.server_certificate_covers(pem, ["b.lan"], now=NOW)
    assert pki.server_certificate_covers(pem, ["B.LAN", "127.0.0.1"], now=NOW)
    assert not pki.server_certificate_covers(pem, ["other.lan"], now=NOW)
    assert not pki.server_certificate_covers(pem, ["10.0.0.1"], now=NOW)
    # renewed once fewer than 30 days are left
    assert pki.server_certificate_covers(pem, [], now=NOW + dt.timedelta(days=29))
    assert not pki.server_certificate_covers(pem, [], now=NOW + dt.timedelta(days=31))


# -- files --------------------------------------------------------------------------------------


def test_ensure_ca_writes_the_key_once_with_mode_0600(tmp_path: Path) -> None:
    ca, created = pki.ensure_ca(tmp_path / "tls")
    assert created
    key = tmp_path / "tls" / pki.CA_KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    again, created = pki.ensure_ca(tmp_path / "tls")
    assert not created and key.read_bytes() == before
    assert again.certificate == ca.certificate


def test_half_a_ca_is_an_error_not_a_new_ca(tmp_path: Path) -> None:
    pki.ensure_ca(tmp_path)
    (tmp_path / pki.CA_CERT_FILE).unlink()
    key = (tmp_path / pki.CA_KEY_FILE).read_bytes()
    with pytest.raises(ConfigError, match=r"ca\.key exists but .*ca\.crt does not"):
        pki.ensure_ca(tmp_path)
    assert (tmp_path / pki.CA_KEY_FILE).read_bytes() == key


def test_a_ca_key_that_does_not_match_its_certificate_is_refused(tmp_path: Path) -> None:
    pki.ensure_ca(tmp_path / "a")
    pki.ensure_ca(tmp_path / "b")
    (tmp_path / "a" / pki.CA_KEY_FILE).write_bytes((tmp_path / "b" / pki.CA_KEY_FILE).read_bytes())
    with pytest.raises(ConfigError, match="is not the key of"):
        pki.load_ca(tmp_path / "a")


def test_issued_files_are_never_overwritten(tmp_path: Path) -> None:
    ca, _ = pki.ensure_ca(tmp_path)
    cert, key = tmp_path / "d1.crt", tmp_path / "d1.key"
    pki.issue_client_certificate(ca, "d1", cert, key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        pki.issue_client_certificate(ca, "d1", cert, key)
    assert key.read_bytes() == before


# -- the TLS policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("localhost", True),
    ("LOCALHOST", True), ("10.0.0.1", False), ("broker.lan", False), ("0.0.0.0", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_tls_by_default_beyond_loopback() -> None:
    assert not uses_tls("127.0.0.1", None, ca_file=None, cert_file=None)
    assert uses_tls("127.0.0.1", None, ca_file=Path("ca.crt"), cert_file=None)
    assert uses_tls("broker.lan", None, ca_file=None, cert_file=None)
    assert not uses_tls("broker.lan", False, ca_file=None, cert_file=None)


def test_plain_mqtt_beyond_loopback_needs_insecure_plaintext() -> None:
    with pytest.raises(ValueError, match=r"plain MQTT to broker\.lan"):
        check_transport_choice("broker.lan", False, insecure_plaintext=False, ca_file=None,
                               cert_file=None, key_file=None)
    check_transport_choice("broker.lan", False, insecure_plaintext=True, ca_file=None,
                           cert_file=None, key_file=None)
    check_transport_choice("127.0.0.1", False, insecure_plaintext=False, ca_file=None,
                           cert_file=None, key_file=None)
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        check_transport_choice("broker.lan", None, insecure_plaintext=False, ca_file=None,
                               cert_file=Path("c"), key_file=None)
    with pytest.raises(ValueError, match="tls is off but"):
        check_transport_choice("127.0.0.1", False, insecure_plaintext=False,
                               ca_file=Path("ca"), cert_file=None, key_file=None)


def test_agent_config_port_follows_tls() -> None:
    from edge_agent.config import AgentConfig

    remote = AgentConfig(device_id="d1", data=Path("x"), host="broker.lan")
    assert remote.uses_tls() and remote.broker_port() == 8883
    assert remote.tls_settings() == TlsSettings()
    local = AgentConfig(device_id="d1", data=Path("x"))
    assert not local.uses_tls() and local.broker_port() == 1883
    assert local.tls_settings() is None
    with pytest.raises(ValueError, match=r"plain MQTT to broker\.lan"):
        AgentConfig(device_id="d1", data=Path("x"), host="broker.lan", tls=False)


def test_client_context_verifies_the_server_over_tls_12_or_newer(tmp_path: Path) -> None:
    pki.ensure_ca(tmp_path)
    ctx = client_context(TlsSettings(ca_file=tmp_path / pki.CA_CERT_FILE))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_an_expired_or_future_client_certificate_is_a_config_error(tmp_path: Path) -> None:
    ca, _ = pki.ensure_ca(tmp_path)
    cert, key = tmp_path / "d1.crt", tmp_path / "d1.key"
    pki.issue_client_certificate(ca, "d1", cert, key, days=1, now=NOW)
    settings = TlsSettings(ca_file=tmp_path / pki.CA_CERT_FILE, cert_file=cert, key_file=key)
    client_context(settings, now=NOW)
    with pytest.raises(ConfigError, match="expired on 2026-01-16"):
        client_context(settings, now=NOW + dt.timedelta(days=2))
    with pytest.raises(ConfigError, match="clock"):
        client_context(settings, now=NOW - dt.timedelta(days=1))


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load the CA file"):
        client_context(TlsSettings(ca_file=tmp_path / "nope.crt"))


# -- what a failed handshake means -------------------------------------------------------------


def _handshake_error(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                     server_hostname: str) -> BaseException:
    """The client's exception from one handshake against an in-process TLS server."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            try:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname):
                    pass
            except OSError as exc:
                return exc
        raise AssertionError("the handshake succeeded")
    finally:
        thread.join(5)
        listener.close()


def test_verification_failures_are_named_and_fatal(tmp_path: Path) -> None:
    ca, _ = pki.ensure_ca(tmp_path / "ours")
    pki.ensure_ca(tmp_path / "other")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    pki.issue_server_certificate(ca, [], cert, key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)

    trusting_other = client_context(TlsSettings(ca_file=tmp_path / "other" / pki.CA_CERT_FILE))
    failure = describe_failure(_handshake_error(server, trusting_other, "127.0.0.1"),
                               handshake_done=False, client_certificate=False)
    assert (failure.reason, failure.fatal) == ("unknown_ca", True)

    trusting_ours = client_context(TlsSettings(ca_file=tmp_path / "ours" / pki.CA_CERT_FILE))
    failure = describe_failure(_handshake_error(server, trusting_ours, "other.example"),
                               handshake_done=False, client_certificate=False)
    assert (failure.reason, failure.fatal) == ("hostname_mismatch", True)
    assert "other.example" in failure.detail


def test_a_connection_closed_during_or_after_the_handshake_is_retried() -> None:
    during = describe_failure(ConnectionResetError(), handshake_done=False,
                              client_certificate=False)
    assert (during.reason, during.fatal) == ("closed", False)
    assert "is this a TLS port" in during.detail
    after = describe_failure(ssl.SSLEOFError(), handshake_done=True, client_certificate=True)
    assert (after.reason, after.fatal) == ("closed", False)
    assert "refused our client certificate" in after.detail


# -- fedbus certs --------------------------------------------------------------------------------


def test_certs_command_issues_keeps_and_renews(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedbus.cli.certs import certs

    pki_dir = tmp_path / "pki"
    run = CliRunner().invoke
    result = run(certs, ["--dir", str(pki_dir), "--server-name", "broker.lan",
                         "--device", "device-09", "--days", "30"])
    assert result.exit_code == 0, result.output
    cert = pki_dir / "clients" / "device-09.crt"
    assert pki.certificate_identity(cert.read_bytes()) == "device-09"
    dns, ips = _san(x509.load_pem_x509_certificate((pki_dir / "server.crt").read_bytes()))
    assert "broker.lan" in dns and "127.0.0.1" in ips
    ca_key, first = (pki_dir / "ca.key").read_bytes(), cert.read_bytes()

    result = run(certs, ["--dir", str(pki_dir), "--device", "device-09"])
    assert result.exit_code == 0 and "kept" in result.output
    assert cert.read_bytes() == first

    result = run(certs, ["--dir", str(pki_dir), "--device", "device-09", "--renew"])
    assert result.exit_code == 0, result.output
    assert cert.read_bytes() != first
    assert [p.read_bytes() for p in (pki_dir / "clients").glob("device-09.crt.old-*")] == [first]
    assert (pki_dir / "ca.key").read_bytes() == ca_key  # the CA is never replaced

    result = run(certs, ["--dir", str(pki_dir), "--device", "not valid"])
    assert result.exit_code != 0 and "invalid device id" in result.output
