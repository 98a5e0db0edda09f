"""Exceptions shared by the agent, the coordinator and the CLI."""

from __future__ import annotations

__all__ = ["ConfigError", "FedbusError", "ProtocolError"]


class FedbusError(Exception):
    """Base class for every error fedbus raises on purpose."""


class ConfigError(FedbusError):
    """A user's configuration mistake; the CLI prints it as one line, without a traceback."""


class ProtocolError(FedbusError):
    """A message from the network that does not follow protocol v1.

    ``reason`` is a short machine-readable code (``malformed``, ``schema``, ``dtype``, ...)
    that the coordinator counts and puts in receipts; ``str(exc)`` is the human detail.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
