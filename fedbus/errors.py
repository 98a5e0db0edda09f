"""Exceptions shared by the agent, the coordinator and the CLI.

Errors carry data: the transport's errors keep the broker address, the reason code, the
message size and limit as attributes, so a caller decides on fields, never on the text.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnreachable",
    "ConfigError",
    "ConnectRefused",
    "ConnectTimeout",
    "FedbusError",
    "MessageTooLarge",
    "NotMqtt",
    "ProtocolError",
    "StateError",
    "TlsError",
    "TransportError",
]


class FedbusError(Exception):
    """Base class for every error fedbus raises on purpose. The CLI prints it as one line
    and exits with ``exit_code``."""

    exit_code = 1


class ConfigError(FedbusError):
    """A user's configuration mistake; the CLI prints it as one line, without a traceback,
    and exits with code 2 (which a systemd unit need not restart)."""

    exit_code = 2


class StateError(ConfigError):
    """A state directory that cannot be used as asked (held by another process, another
    run, another task, written by a newer fedbus): one line, no traceback."""


class ProtocolError(FedbusError):
    """A message from the network that does not follow the protocol.

    ``reason`` is a short machine-readable code (``malformed``, ``schema``, ``dtype``, ...)
    that the coordinator counts and puts in receipts; ``str(exc)`` is the human detail.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TransportError(FedbusError):
    """Something between this process and the broker failed. ``host`` and ``port`` say
    which broker; ``fatal`` is True when retrying cannot help (a configuration mistake)."""

    fatal = False

    def __init__(self, host: str, port: int, message: str) -> None:
        super().__init__(message)
        self.host = host
        self.port = port


class BrokerUnreachable(TransportError):
    """No TCP connection: ``cause`` is what the operating system said (refused, no route,
    unknown host, timed out)."""

    def __init__(self, host: str, port: int, cause: str) -> None:
        super().__init__(host, port, f"cannot reach the broker at {host}:{port}: {cause}")
        self.cause = cause


class NotMqtt(TransportError):
    """TCP connected, but no MQTT CONNACK came back: not an MQTT broker, a TLS-only port,
    or a broker that refuses MQTT v5. ``detail`` says what was seen."""

    def __init__(self, host: str, port: int, detail: str) -> None:
        super().__init__(
            host, port, f"{host}:{port} gave no MQTT answer: {detail}"
        )
        self.detail = detail


class ConnectRefused(TransportError):
    """The broker answered CONNECT with a failure ``reason_code``. Codes that retrying
    cannot fix (bad credentials, not authorised, ...) make it ``fatal``."""

    def __init__(
        self, host: str, port: int, username: str, reason_code: int, reason: str, *, fatal: bool
    ) -> None:
        super().__init__(
            host, port,
            f"broker at {host}:{port} refused user {username!r}: {reason} "
            f"(CONNACK 0x{reason_code:02X})",
        )
        self.username = username
        self.reason_code = reason_code
        self.reason = reason
        self.fatal = fatal
        self.exit_code = 2 if fatal else 1


class TlsError(TransportError):
    """The TLS connection to the broker failed. ``reason`` is a short code:
    ``unknown_ca``, ``hostname_mismatch``, ``server_certificate_expired`` and
    ``server_certificate_invalid`` (we refused the broker's certificate),
    ``certificate_refused`` (the broker refused ours, or wants one), ``not_tls`` and
    ``closed`` (no TLS, or the connection ended during or right after the handshake),
    ``handshake`` (anything else). Certificate problems are ``fatal``: a configuration
    mistake that retrying cannot fix."""

    def __init__(self, host: str, port: int, reason: str, detail: str, *, fatal: bool) -> None:
        super().__init__(host, port, f"TLS to {host}:{port} failed: {detail}")
        self.reason = reason
        self.detail = detail
        self.fatal = fatal
        self.exit_code = 2 if fatal else 1


class ConnectTimeout(TransportError):
    """Not connected for ``seconds`` (the ``connect_timeout`` setting); ``last_error`` is the
    most recent failure, if any."""

    fatal = True

    def __init__(
        self, host: str, port: int, seconds: float, last_error: TransportError | None
    ) -> None:
        why = f": {last_error}" if last_error is not None else ""
        super().__init__(
            host, port, f"not connected to the broker at {host}:{port} for {seconds:g} s{why}"
        )
        self.seconds = seconds
        self.last_error = last_error


class MessageTooLarge(TransportError):
    """A message that the broker would refuse (it disconnects a client that sends a packet
    above its maximum): ``size`` bytes of packet against a ``limit`` of bytes, the limit
    coming from the broker's CONNACK or, before the first connect, from the settings."""

    def __init__(self, host: str, port: int, topic: str, size: int, limit: int) -> None:
        super().__init__(
            host, port,
            f"a message of {size:,} bytes on {topic} exceeds the broker's maximum packet size "
            f"of {limit:,} bytes",
        )
        self.topic = topic
        self.size = size
        self.limit = limit

    exit_code = 2  # a model or update too large for the broker is a configuration mistake
