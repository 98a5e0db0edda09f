"""Topic layout of the fedbus protocol (docs/protocol.md, section 3).

Every topic sits under one prefix (``fedbus`` by default) so several trials can share a
broker. Device ids are also the MQTT usernames and client ids, so they must be safe inside
a topic level and an ACL pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_PREFIX", "DEVICE_ID_PATTERN", "Topics", "validate_device_id"]

DEFAULT_PREFIX = "fedbus"
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}$")


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid id, else raise ``ValueError``."""
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.match(device_id):
        raise ValueError(
            f"invalid device id {device_id!r}: use 1-64 letters, digits, '_' or '-'"
        )
    if device_id == "coordinator":
        raise ValueError("'coordinator' is reserved for the coordinator's own account")
    return device_id


@dataclass(frozen=True)
class Topics:
    """All topic names of one fedbus deployment."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_PATTERN.match(self.prefix):
            raise ValueError(
                f"invalid topic prefix {self.prefix!r}: 1-4 levels of letters, digits, '_' or '-'"
            )

    @property
    def task(self) -> str:
        """Retained task description; written only by the coordinator."""
        return f"{self.prefix}/task"

    @property
    def model(self) -> str:
        """Retained current global model; written only by the coordinator."""
        return f"{self.prefix}/model"

    @property
    def model_chunks(self) -> str:
        """Filter of the topics holding chunks 1 and up of a chunked model (revision 2.6;
        chunk 0 is on ``model``)."""
        return f"{self.prefix}/model/chunk/+"

    def model_chunk(self, index: int) -> str:
        """Where chunk ``index`` of a chunked model is retained: chunk 0 on ``model`` (so
        that topic always holds the newest publication), the others on their own topic."""
        return self.model if index == 0 else f"{self.prefix}/model/chunk/{index}"

    def is_model_chunk(self, topic: str) -> bool:
        """Whether ``topic`` is one of the model's chunk topics (``model_chunks``)."""
        head = f"{self.prefix}/model/chunk/"
        return topic.startswith(head) and topic[len(head):].isdigit()

    @property
    def model_delta(self) -> str:
        """Retained change from the previous model version to the current one (revision
        2.7); written only by the coordinator."""
        return f"{self.prefix}/model_delta"

    @property
    def fleet(self) -> str:
        """Retained fleet snapshot for operators; written only by the coordinator, never
        readable by a device (protocol revision 2.3)."""
        return f"{self.prefix}/fleet"

    @property
    def control(self) -> str:
        """The operator's run commands (pause, resume, stop; not retained, QoS 1); written
        only by the operator account, read only by the coordinator (revision 2.5)."""
        return f"{self.prefix}/control"

    def update(self, device_id: str) -> str:
        """Where ``device_id`` publishes its updates (QoS 1); only that device may write it."""
        return f"{self.prefix}/update/{device_id}"

    def status(self, device_id: str) -> str:
        """Retained presence of ``device_id`` (its Last Will says ``offline``)."""
        return f"{self.prefix}/status/{device_id}"

    def receipt(self, device_id: str) -> str:
        """Where the coordinator tells ``device_id`` what became of its updates."""
        return f"{self.prefix}/receipt/{device_id}"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/update/+"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/status/+"

    def device_of(self, topic: str) -> str | None:
        """The device id in an update/status/receipt topic, or None if it is not one."""
        parts = topic.split("/")
        base = self.prefix.split("/")
        if len(parts) != len(base) + 2 or parts[: len(base)] != base:
            return None
        if parts[len(base)] not in ("update", "status", "receipt"):
            return None
        device = parts[-1]
        return device if DEVICE_ID_PATTERN.match(device) else None
