"""``python -m bench.chunks [--reps N] [--size BYTES] [--limit BYTES]``: the cost of chunking.

Side by side through one real Mosquitto with the project's policy (8 MiB packets): the time
from publishing a model-sized message (4,506,456 bytes by default: the mlp 64-[1024, 1024]-10
of tests/test_chunks_e2e.py as fp32) to having it whole at a subscriber, sent whole (one
QoS 1 publish) or in the chunks a broker limited to ``--limit`` bytes (256 KiB) would need
(``fedbus.chunks.split`` at the sender, ``Reassembler`` with its SHA-256 check at the
receiver). Runs alternate whole and chunked so that the machine's load hits both alike.
Prints the medians and the ratio; BENCHMARKS.md ("Chunked messages") quotes a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from fedbus.broker import LocalBroker
from fedbus.chunks import ChunkLimits, Reassembler, chunk_data_size, is_chunk, read_chunk, split
from fedbus.topics import Topics
from fedbus.transport import ConnectionSettings, Message, MqttClient

TOPICS = Topics()


class _Receiver:
    def __init__(self, size: int) -> None:
        self.done = threading.Event()
        self.size = size
        self.reassembler = Reassembler(ChunkLimits(2 * size, 4 * size, 4 * size))

    def on_message(self, msg: Message) -> None:
        if is_chunk(msg.payload):
            out = self.reassembler.add("c", read_chunk(msg.payload, 16 * 2**20),
                                       time.monotonic())
            if out.status == "complete" and out.payload is not None:
                self.done.set()
        elif len(msg.payload) == self.size:
            self.done.set()


def _client(broker: LocalBroker, user: str, on_message: object) -> MqttClient:
    account = broker.coordinator if user == "coordinator" else broker.devices[user]
    client = MqttClient(
        ConnectionSettings(host=broker.host, port=broker.port, client_id=user, username=user,
                           password=account.password, session_expiry=0),
        on_message=on_message,  # type: ignore[arg-type]
    )
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--size", type=int, default=4_506_456)
    parser.add_argument("--limit", type=int, default=256 * 1024)
    args = parser.parse_args()
    payload = os.urandom(args.size)
    receiver = _Receiver(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp) / "broker", device_ids=("dev-a",))
        broker.start()
        sub = _client(broker, "dev-a", receiver.on_message)
        pub = _client(broker, "coordinator", lambda _m: None)
        try:
            sub.subscribe(TOPICS.model, qos=1)
            sub.subscribe(TOPICS.model_chunks, qos=1)
            for c in (sub, pub):
                c.start()
                assert c.wait_connected(10), "no connection"
            time.sleep(0.5)
            data = chunk_data_size(args.limit, TOPICS.model_chunk(65_534))
            times: dict[str, list[float]] = {"whole": [], "chunked": []}
            for rep in range(args.reps + 2):  # two warm-up rounds
                for how in ("whole", "chunked") if rep % 2 else ("chunked", "whole"):
                    receiver.done.clear()
                    started = time.perf_counter()
                    if how == "whole":
                        pub.publish(TOPICS.model, payload, qos=1)
                    else:
                        for i, chunk in enumerate(split(payload, data, f"m{rep}")):
                            pub.publish(TOPICS.model_chunk(i), chunk, qos=1)
                    assert receiver.done.wait(30), f"{how}: nothing arrived"
                    if rep >= 2:
                        times[how].append(time.perf_counter() - started)
        finally:
            for c in (sub, pub):
                c.stop()
            broker.stop()
    whole, chunked = (statistics.median(times[k]) for k in ("whole", "chunked"))
    n = -(-args.size // data)
    print(f"{args.size:,} bytes, {args.reps} runs each, alternating; chunked: {n} chunks of "
          f"at most {data:,} bytes (a {args.limit:,}-byte packet limit)")
    print(f"whole   median {whole * 1000:.1f} ms ({args.size / whole / 1e6:.0f} MB/s)")
    print(f"chunked median {chunked * 1000:.1f} ms ({args.size / chunked / 1e6:.0f} MB/s)")
    print(f"chunked / whole: {chunked / whole:.2f}x")


if __name__ == "__main__":
    main()
