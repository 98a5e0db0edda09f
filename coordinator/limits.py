"""How many bytes the coordinator takes in one message (pure: no network, no clock).

Two numbers follow from the model, so that a hostile device cannot make the coordinator
receive more than an honest one ever needs (docs/operations.md, "What a hostile device can
cost the coordinator"):

- ``default_max_update_bytes``: the task's ``max_update_bytes`` when ``--max-update-bytes``
  is not given. Twice the largest ``delta`` any codec can produce for the model
  (``update_codec.delta_wire_bound``: 8 bytes per parameter and 1 KiB per tensor, zstd's
  worst expansion included), plus the most bytes the other fields of an update can take
  (``messages.UPDATE_FIELDS_BOUND``: 32 metrics with 4,096-byte names), plus 64 KiB; at
  most what fits the broker's packet limit. The demo's mlp 64-[64]-10 (4,814 parameters)
  gets 299,783 bytes where the fixed default was 4 MiB; its int8 updates take 5.9 KB.
- ``receive_packet_limit``: the Maximum Packet Size of the coordinator's CONNECT (MQTT v5
  3.1.2.11.4). The broker must not send it a larger packet (3.1.2.25): Mosquitto drops such
  a message for the coordinator alone and logs "Dropping too large outgoing PUBLISH"; the
  sender's PUBACK still says success. It is the largest message the coordinator has to
  read: an update of ``max_update_bytes``, a model message of this model (a replay of one
  of its own on the model topic must still be noticed, ``CoordinatorService._check_ours``)
  or a task or status message (64 KiB), plus 1 KiB for the PUBLISH packet's header, topic
  and properties; at most the broker's packet limit.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedbus.messages import UPDATE_FIELDS_BOUND
from fedbus.update_codec import delta_wire_bound

__all__ = [
    "MODEL_FIELDS_BOUND",
    "PACKET_HEADROOM",
    "SMALL_MESSAGE_BYTES",
    "UPDATE_MARGIN",
    "default_max_update_bytes",
    "model_size_bound",
    "receive_packet_limit",
]

UPDATE_MARGIN = 64 * 1024  # beyond twice the largest delta: room for optional fields
PACKET_HEADROOM = 1024  # fixed header, topic, packet id and properties of a PUBLISH
SMALL_MESSAGE_BYTES = 64 * 1024  # a task or status message (docs/protocol.md 4.2)
# a model's fields besides its tensors: task id, run id, version, created_at, compression,
# the 64-byte signature and their keys (about 250 bytes; 4 KiB leaves room)
MODEL_FIELDS_BOUND = 4096


def default_max_update_bytes(
    expected_shapes: Mapping[str, tuple[int, ...]], packet_limit: int
) -> int:
    """``max_update_bytes`` derived from the model: ``2 x delta_wire_bound +
    UPDATE_FIELDS_BOUND + UPDATE_MARGIN``, at most ``packet_limit - PACKET_HEADROOM`` (an
    update must fit one packet of the broker). Every honest update of this model, in any
    codec, fits it (unless the broker's packet limit is smaller)."""
    bound = 2 * delta_wire_bound(expected_shapes) + UPDATE_FIELDS_BOUND + UPDATE_MARGIN
    return max(1, min(bound, packet_limit - PACKET_HEADROOM))


def model_size_bound(expected_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Most bytes a model message of these tensors takes, in any model codec."""
    return delta_wire_bound(expected_shapes) + MODEL_FIELDS_BOUND


def receive_packet_limit(
    max_update_bytes: int, expected_shapes: Mapping[str, tuple[int, ...]], packet_limit: int
) -> int:
    """The Maximum Packet Size the coordinator announces in its CONNECT: its largest
    message (an update, a model of this model, a task or status message) plus
    ``PACKET_HEADROOM``, at most ``packet_limit``."""
    largest = max(max_update_bytes, model_size_bound(expected_shapes), SMALL_MESSAGE_BYTES)
    return min(packet_limit, largest + PACKET_HEADROOM)
