"""Helpers for tests that run the coordinator service (and agents) on the in-memory broker
(fedbus.memory_transport) instead of a real Mosquitto."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService, RunSummary
from fedbus.envelope import pack, unpack
from fedbus.memory_transport import MemoryBroker
from fedbus.messages import GlobalModel, Receipt, Status
from fedbus.topics import Topics
from fedbus.transport import ConnectionSettings, Message

ARGS = '{"in_features": 4, "num_classes": 2, "hidden": [3]}'
TOPICS = Topics()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


class Running:
    """A coordinator service running in a thread against the in-memory broker."""

    def __init__(self, broker: MemoryBroker, **overrides: Any) -> None:
        overrides.setdefault("state_dir", None)
        overrides.setdefault("buffer_size", 2)
        new_run = overrides.pop("new_run", False)
        wait = overrides.pop("wait", True)
        self.service = CoordinatorService(
            CoordinatorConfig(model_args=ARGS, **overrides), password="x",
            transport_factory=broker.factory, new_run=new_run,
        )
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if wait:  # subscribed, so nothing a device sends is published to nobody
            wait_for(lambda: self.service.client.connected or self.error is not None,
                     what="the coordinator connected")

    def _run(self) -> None:
        try:
            self.summary = self.service.run()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 10.0) -> RunSummary | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the coordinator did not stop"
        return self.summary

    def stop(self) -> RunSummary | None:
        self.service.stop()
        return self.join()


class Device:
    """A device client on the in-memory broker: publishes raw payloads, keeps receipts."""

    def __init__(self, broker: MemoryBroker, device: str = "dev-a") -> None:
        self.device = device
        self.receipts: queue.SimpleQueue[Receipt] = queue.SimpleQueue()
        self.models: list[GlobalModel] = []
        self.client = broker.factory(
            ConnectionSettings("memory", 0, device, device, "x"), on_message=self._on_message
        )
        self.client.subscribe(TOPICS.receipt(device))
        self.client.subscribe(TOPICS.model, qos=0)
        self.client.start()
        assert self.client.wait_connected(5)

    def _on_message(self, msg: Message) -> None:
        if msg.topic == TOPICS.model:
            self.models.append(GlobalModel.from_wire(unpack(msg.payload, "model")))
        else:
            self.receipts.put(Receipt.from_wire(unpack(msg.payload, "receipt")))

    def online(self) -> None:
        self.client.publish(TOPICS.status(self.device),
                            pack(Status(self.device, "online", ts=1.0).to_wire()), retain=True)

    def send(self, payload: bytes) -> Receipt:
        """Publish ``payload`` and return its receipt. Receipts of other update ids that
        arrive meanwhile are skipped: a broker may deliver an update again after a
        coordinator crash (it had no PUBACK), and the resumed coordinator answers that copy
        as a repeat before the one sent now."""
        try:
            update_id = unpack(payload).get("update_id")
        except Exception:  # a malformed payload: its receipt names no id it could match
            update_id = None
        self.client.publish(TOPICS.update(self.device), payload)
        deadline = time.monotonic() + 5
        while True:
            receipt = self.receipts.get(timeout=max(0.01, deadline - time.monotonic()))
            if update_id is None or receipt.update_id in (update_id, None):
                return receipt
