"""Signed tasks and models: the coordinator's Ed25519 signature in the ``sig`` field.

What is signed (docs/protocol.md section 7.6), for a message published on topic ``T``:

    b"fedbus-sig-v1" 0x00  ||  UTF-8 of T  ||  0x00  ||  M

where ``M`` is the message's msgpack map **without** its ``sig`` entry: the map header for
one entry less, in its shortest form, followed by every other entry's bytes (key and value)
exactly as they travel, in the order they travel. A signer packs the map without ``sig``
(that is ``M``), signs, and appends ``"sig": bin(64)`` as one more entry; a verifier cuts
the ``sig`` entry out of the payload it received and rebuilds ``M`` without re-encoding any
value, so no canonical encoding of floats, integers or key order is needed. The topic in
the signed bytes stops a valid signature from being replayed on another topic (a task as a
model, one trial's prefix in another); ``kind`` and ``run`` are inside ``M``.

A public key travels as text: ``ed25519:`` followed by the 32 bytes of the raw public key
(RFC 8032) in base64url without padding, e.g. in the credentials file's ``coordinator_key``.
PEM (SubjectPublicKeyInfo) is accepted too. Private keys are PKCS#8 PEM files, mode 0600,
written once and never overwritten.

The functions over bytes are pure; ``ensure_private_key`` and ``load_public_key`` do the
file work.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedbus.errors import ConfigError, ProtocolError
from fedbus.wire_reader import MAX_FIELDS, Reader

__all__ = [
    "DOMAIN",
    "KEY_PREFIX",
    "SIGNATURE_FIELD",
    "SIGNATURE_LENGTH",
    "SignatureError",
    "Verifier",
    "add_signature",
    "ensure_private_key",
    "key_text",
    "load_private_key",
    "load_public_key",
    "parse_public_key",
    "sign_message",
    "signed_bytes",
    "split_signature",
    "verify_message",
]

DOMAIN = b"fedbus-sig-v1\x00"
SIGNATURE_FIELD = "sig"
SIGNATURE_LENGTH = 64
KEY_PREFIX = "ed25519:"


class SignatureError(Exception):
    """A task or model whose signature is missing, malformed or does not verify.

    ``reason`` is ``missing``, ``malformed`` or ``invalid``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason} signature: {detail}")
        self.reason = reason
        self.detail = detail


def signed_bytes(topic: str, body: bytes | memoryview) -> bytes:
    """The bytes the Ed25519 signature covers: domain, topic, 0x00, then ``M`` (``body``)."""
    return b"".join((DOMAIN, topic.encode("utf-8"), b"\x00", body))


def add_signature(body: bytes, signature: bytes) -> bytes:
    """``body`` (a packed map ``M``, header in shortest form) with ``sig`` appended."""
    if len(signature) != SIGNATURE_LENGTH:
        raise ValueError(f"an Ed25519 signature has {SIGNATURE_LENGTH} bytes, not {len(signature)}")
    reader = Reader(body, max_str_len=0, max_bin_len=0)
    count = reader.map_header(1 << 32)
    start = reader.tell()
    packer = msgpack.Packer(use_bin_type=True)
    return b"".join((
        packer.pack_map_header(count + 1), body[start:],
        packer.pack(SIGNATURE_FIELD), packer.pack(signature),
    ))


def sign_message(key: Ed25519PrivateKey, topic: str, body: bytes) -> bytes:
    """The payload to publish on ``topic``: ``body`` (the packed message without ``sig``)
    with its signature appended."""
    return add_signature(body, key.sign(signed_bytes(topic, body)))


def split_signature(payload: bytes) -> tuple[bytes, bytes | None]:
    """``(M, signature)`` of a received payload: ``M`` is the payload without its ``sig``
    entry (header for one entry less, shortest form); the signature is None when the map
    has no ``sig`` key. ``ProtocolError`` (``malformed``/``schema``) when the payload is not
    one msgpack map of at most 64 keys without repeated ``sig``; ``SignatureError``
    (``malformed``) when ``sig`` is not a bin."""
    reader = Reader(payload, max_str_len=4096, max_bin_len=len(payload))
    kind, _ = reader.peek()
    if kind != "map":
        raise ProtocolError("schema", f"message is a {kind}, expected a map")
    count = reader.map_header(MAX_FIELDS)
    after_header = reader.tell()
    span: tuple[int, int] | None = None
    signature: object = None
    for _ in range(count):
        start = reader.tell()
        key = reader.key()
        if key != SIGNATURE_FIELD:
            reader.skip()
            continue
        if span is not None:
            raise ProtocolError("malformed", "key 'sig' appears twice in one map")
        signature = reader.leaf()
        span = (start, reader.tell())
    reader.end()
    if span is None:
        return payload, None
    if not isinstance(signature, memoryview):
        raise SignatureError("malformed", "field 'sig' is not a bin")
    header = msgpack.Packer().pack_map_header(count - 1)
    view = memoryview(payload)
    body = b"".join((header, view[after_header:span[0]], view[span[1]:]))
    return body, bytes(signature)


def verify_message(key: Ed25519PublicKey, topic: str, payload: bytes) -> None:
    """Check that ``payload``, received on ``topic``, carries a valid signature by ``key``.

    Raises ``SignatureError`` (``missing``, ``malformed``, ``invalid``); a payload that is
    not a msgpack map at all is ``SignatureError`` ``malformed`` too."""
    try:
        body, signature = split_signature(payload)
    except ProtocolError as exc:
        raise SignatureError("malformed", exc.detail) from None
    if signature is None:
        raise SignatureError("missing", "the message has no 'sig' field")
    if len(signature) != SIGNATURE_LENGTH:
        raise SignatureError(
            "malformed", f"'sig' has {len(signature)} bytes, not {SIGNATURE_LENGTH}"
        )
    try:
        key.verify(signature, signed_bytes(topic, body))
    except InvalidSignature:
        raise SignatureError(
            "invalid", f"not signed by the coordinator's key {key_text(key)} for {topic}"
        ) from None


@dataclass(frozen=True)
class Verifier:
    """The coordinator's public key, as an agent holds it."""

    key: Ed25519PublicKey

    def verify(self, topic: str, payload: bytes) -> None:
        verify_message(self.key, topic, payload)

    def __str__(self) -> str:
        return key_text(self.key)


# -- keys --------------------------------------------------------------------------------


def key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``ed25519:`` + base64url (no padding) of the raw 32-byte public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from its ``ed25519:`` text or a PEM block; ``ValueError`` otherwise."""
    text = text.strip()
    if text.startswith(KEY_PREFIX):
        encoded = text[len(KEY_PREFIX):]
        if len(encoded) != 43 or not all(c.isalnum() or c in "-_" for c in encoded):
            raise ValueError(f"{text!r} is not {KEY_PREFIX} and 43 base64url characters")
        raw = base64.urlsafe_b64decode(encoded + "=")
        return Ed25519PublicKey.from_public_bytes(raw)
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        key = serialization.load_pem_public_key(text.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the PEM public key is not an Ed25519 key")
        return key
    raise ValueError(f"expected '{KEY_PREFIX}<base64url>' or a PEM public key, got {text[:40]!r}")


def load_public_key(value: str) -> Verifier:
    """The coordinator's key from ``--coordinator-key``: its ``ed25519:`` text, or the path
    of a file holding that text or a PEM public key. ``ConfigError`` when unusable."""
    if value.strip().startswith(KEY_PREFIX):
        source, text = "coordinator_key", value
    else:
        source = f"coordinator key file {value}"
        try:
            text = Path(value).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the {source}: {exc}") from None
    try:
        return Verifier(parse_public_key(text))
    except ValueError as exc:
        raise ConfigError(f"{source} is not an Ed25519 public key: {exc}") from None


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PKCS#8 PEM file; ``ConfigError`` when unusable."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"the signing key {path} is not an Ed25519 key")
    return key


def ensure_private_key(path: Path, *, adopt: Path | None = None) -> Ed25519PrivateKey:
    """The signing key in ``path``; when there is none, ``adopt``'s key (copied in) or a
    new one, written once with mode 0600 (never overwritten), and its public key beside it
    as ``<stem>.pub`` (the ``ed25519:`` text). ``ConfigError`` for an unreadable key."""
    if path.exists():
        key = load_private_key(path)
    else:
        key = load_private_key(adopt) if adopt is not None else Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made meanwhile by another process: that one counts
            return load_private_key(path)
        except OSError as exc:
            raise ConfigError(f"cannot write the signing key {path}: {exc}") from None
        with os.fdopen(fd, "wb") as fh:
            fh.write(_private_pem(key))
            fh.flush()
            os.fsync(fh.fileno())
    public = path.with_suffix(".pub")
    text = key_text(key) + "\n"
    try:
        if not public.exists() or public.read_text() != text:
            tmp = public.with_name(public.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, public)
    except OSError as exc:
        raise ConfigError(f"cannot write the public key {public}: {exc}") from None
    return key
