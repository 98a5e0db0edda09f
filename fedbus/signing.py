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

Revision 2.8 (section 11.10): a device may sign its updates the same way, with its own key,
on its update topic ``<prefix>/update/<device>``. The coordinator learns the devices' public
keys from the device-key file (``parse_device_keys``), never from a message.

The functions over bytes are pure; ``ensure_private_key`` and ``load_public_key`` do the
file work.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Mapping
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
    "DEVICE_KEYS_FILE",
    "DOMAIN",
    "KEY_PREFIX",
    "SIGNATURE_FIELD",
    "SIGNATURE_LENGTH",
    "DeviceKeyFile",
    "SignatureError",
    "Verifier",
    "add_signature",
    "device_keys_text",
    "ensure_private_key",
    "key_text",
    "load_private_key",
    "load_public_key",
    "parse_device_keys",
    "parse_public_key",
    "private_key_pem",
    "register_device_key",
    "sign_message",
    "signed_bytes",
    "split_signature",
    "update_signature_problem",
    "verify_message",
]

_log = logging.getLogger(__name__)

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


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """``key`` as an unencrypted PKCS#8 PEM file's bytes."""
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
            fh.write(private_key_pem(key))
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


# -- device-signed updates (revision 2.8) ------------------------------------------------

# the device-key file beside the operator's credentials file (docs/protocol.md section 11.10)
DEVICE_KEYS_FILE = "signing/devices.pub"


def parse_device_keys(text: str) -> dict[str, Ed25519PublicKey]:
    """The device keys of a device-key file: one ``<device-id> ed25519:<43 chars>`` per line
    (any run of spaces or tabs between the two), blank lines and lines starting with ``#``
    ignored. ``ValueError`` naming the line for anything else: a line that is not two words,
    an invalid device id or key, a device listed twice."""
    from fedbus.topics import validate_device_id

    keys: dict[str, Ed25519PublicKey] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if len(words) != 2:
            raise ValueError(f"line {number}: expected '<device-id> {KEY_PREFIX}<key>'")
        device, key = words
        try:
            validate_device_id(device)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if device in keys:
            raise ValueError(f"line {number}: device {device!r} is listed twice")
        if not key.startswith(KEY_PREFIX):
            raise ValueError(f"line {number}: the key must be {KEY_PREFIX}<base64url>")
        try:
            keys[device] = parse_public_key(key)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return keys


def device_keys_text(keys: dict[str, Ed25519PublicKey]) -> str:
    """A device-key file holding ``keys``, sorted by device id (``parse_device_keys`` reads
    it back)."""
    lines = ["# fedbus device keys: <device-id> <Ed25519 public key>; written by "
             "`fedbus devices`, read live by the coordinator"]
    lines += [f"{device} {key_text(keys[device])}" for device in sorted(keys)]
    return "\n".join(lines) + "\n"


def update_signature_problem(
    keys: Mapping[str, Ed25519PublicKey], topic: str, device_id: str, payload: bytes
) -> str | None:
    """Why an update received on ``topic`` (the update topic of ``device_id``) is not
    signed by ``device_id``'s key in ``keys``; None when it is. The key comes from ``keys``
    only, never from the message."""
    key = keys.get(device_id)
    if key is None:
        return f"no key is registered for device {device_id!r}; updates must be signed"
    try:
        verify_message(key, topic, payload)
    except SignatureError as exc:
        if exc.reason == "invalid":
            return f"invalid signature: not signed by {device_id}'s key {key_text(key)}"
        return f"{exc.reason} signature: {exc.detail}"
    return None


class DeviceKeyFile:
    """The device-key file as the coordinator reads it: read again whenever it changes
    (its size, modification time or inode; checked at every call, one ``stat``), so a key
    registered by ``fedbus devices`` counts from the next update on, without a restart.

    A missing file holds no key. A file that cannot be read or parsed keeps the keys read
    before (an error is logged once per change of the file): a half-edited file never
    drops every device at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._keys: dict[str, Ed25519PublicKey] = {}

    def keys(self) -> Mapping[str, Ed25519PublicKey]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._seen != (0, 0, 0):
                if self._seen is not None:
                    _log.warning("the device-key file %s is gone: no device key is known",
                                 self.path)
                self._seen, self._keys = (0, 0, 0), {}
            return self._keys
        except OSError as exc:
            _log.error("cannot read the device-key file %s: %s", self.path, exc)
            return self._keys
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen == self._seen:
            return self._keys
        self._seen = seen
        try:
            self._keys = parse_device_keys(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            _log.error("the device-key file %s is unusable, keeping the %d key(s) read "
                       "before: %s", self.path, len(self._keys), exc)
            return self._keys
        _log.info("device keys: %d device(s) in %s", len(self._keys), self.path)
        return self._keys


def register_device_key(path: Path, device_id: str, key: Ed25519PublicKey | None) -> None:
    """Set (or with ``key`` None, remove) ``device_id``'s entry of the device-key file
    ``path``, keeping the others; written to a temporary file and renamed, so a reader sees
    the old file or the new one, never half of one. ``ConfigError`` when the file is
    unusable."""
    try:
        keys = parse_device_keys(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot use the device-key file {path}: {exc}") from None
    if key is None:
        if keys.pop(device_id, None) is None:
            return
    else:
        keys[device_id] = key
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(device_keys_text(keys), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write the device-key file {path}: {exc}") from None
