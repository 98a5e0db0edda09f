"""The child processes of the harness: ``python -m bench.procs ROLE JSON``.

Roles:

- ``coordinator``: a real ``CoordinatorService`` (the coordinator process of ``fedbus
  coordinator``: its MQTT client, queue, validation, aggregation, receipts and retained model)
  with no evaluation data. Notes the arrival of the first update and the acceptance of each
  update (``harness.accepted_recorder``) and writes a JSON result.
- ``subscriber``: the baseline, a bare paho MQTT v5 client subscribed to the same update topics
  with QoS 1 that only notes when each message arrived.
- ``publisher``: device clients (one connection per device account, as the ACL requires)
  publishing pre-encoded valid updates with QoS 1, flat out or at a fixed rate.
- ``torch-idle``: ``import torch`` and wait (the footprint baseline).
- ``rss-stages``: the resident memory after each step an agent takes (footprint breakdown).

Each role writes ``ready`` (a file) when it can receive or has loaded, and its result as JSON
to ``out``. Timing uses ``time.monotonic`` within a process and ``time.time`` across
processes (latency: the publisher's ``sent_at`` and the consumer's clock are the same clock
on one machine).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"  # as the fedbus CLI


def _write(path: str, obj: Any) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def _touch(path: str | None) -> None:
    if path:
        Path(path).write_text("ready")


def close_client(client: Any) -> None:
    """Disconnect and stop paho's loop. paho 2.2's ``loop_stop`` can race with its own
    thread clearing ``_thread`` after a DISCONNECT (AttributeError on None.join)."""
    try:
        client.disconnect()
        client.loop_stop()
    except (AttributeError, OSError):
        pass


def _password(credentials: str, username: str) -> str:
    data = json.loads(Path(credentials).read_text())
    if username == "coordinator":
        return data["coordinator"]["password"]
    return data["devices"][username]["password"]


# -- coordinator -------------------------------------------------------------------------


def coordinator(a: dict[str, Any]) -> None:
    """A real CoordinatorService; logging at the CLI's default level (info) to a file."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    from bench.harness import accepted_recorder
    from coordinator.config import CoordinatorConfig
    from coordinator.process_setup import set_up_process
    from coordinator.service import CoordinatorService, freeze_heap
    from fedbus.credentials import read_credentials

    set_up_process()  # as fedbus coordinator does
    config = CoordinatorConfig(
        host=a["host"], port=a["port"], username="coordinator", prefix=a["prefix"],
        task_id=a["task_id"], arch="mlp", model_args=json.dumps(a["model_args"]),
        codec=a.get("codec", "int8"), mode=a["mode"], buffer_size=a["k"],
        max_versions=a["max_versions"], duration=a["duration"],
        # 4 MiB, the fixed default the other benchmarks were measured with; None (given):
        # derived from the model (bench.flood)
        max_staleness=a.get("max_staleness", 10), max_update_bytes=a.get("max_update_bytes",
                                                                          4 * 1024 * 1024),
        state_dir=Path(a["state_dir"]) if a.get("state_dir") else None,
        signing_key=read_credentials(a["credentials"], "coordinator").signing_key_file,
        **a.get("config", {}),  # any further CoordinatorConfig settings (bench.flood)
    )
    service = CoordinatorService(config, password=_password(a["credentials"], "coordinator"))
    records = accepted_recorder(service, clock=time.time if a.get("wall_clock") else
                                time.monotonic)

    def announce() -> None:
        if service.client.wait_connected(30):
            time.sleep(0.3)  # the SUBSCRIBE went out in on_connect; let the broker take it
            _touch(a.get("ready"))

    def idle_stop() -> None:
        # Stop once updates stopped coming (e.g. the broker lost some): a run that cannot
        # reach max_versions still reports what it completed.
        idle = a.get("idle_stop", 3.0)
        while True:
            time.sleep(0.5)
            if records and time.monotonic() - last_progress[0] > idle:
                service.stop()
                return

    last_progress = [time.monotonic()]
    original = service.core.on_update

    def on_update(device: str, payload: bytes, now: float, **kwargs: Any) -> list:
        last_progress[0] = time.monotonic()
        return original(device, payload, now, **kwargs)

    # a wrapper of this one instance's method, to note progress
    service.core.on_update = on_update  # type: ignore[method-assign, assignment]
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    threading.Thread(target=announce, daemon=True).start()
    threading.Thread(target=idle_stop, daemon=True).start()
    freeze_heap()  # as fedbus coordinator does
    cpu0 = time.process_time()
    summary = service.run()
    history = [(r.version, r.seconds) for r in summary.history]
    _write(a["out"], {
        "first_update_seconds": summary.first_update_seconds,
        "history": history,
        "counters": summary.counters,
        "stop_reason": summary.stop_reason,
        "wall_seconds": summary.wall_seconds,
        "cpu_seconds_total": time.process_time() - cpu0,
        "accepted": [list(r) for r in records],
    })


# -- bare subscriber -------------------------------------------------------------------------


def subscriber(a: dict[str, Any]) -> None:
    """Bare paho: subscribe to every update topic at QoS 1 and note arrival times."""
    import msgpack
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    n = a["n"]
    want_ids = bool(a.get("ids"))
    clock = time.time if a.get("wall_clock") else time.monotonic
    arrivals: list[tuple[float, float]] = []  # (clock, process cpu)
    ids: list[str] = []
    done = threading.Event()

    def on_connect(client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(f"{a['prefix']}/update/+", qos=1)

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, _codes: Any, _p: Any) -> None:
        _touch(a.get("ready"))

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        arrivals.append((clock(), time.process_time()))
        if want_ids:  # after the timestamp: identifies the update for the latency join
            ids.append(msgpack.unpackb(msg.payload, raw=False)["update_id"])
        if len(arrivals) >= n:
            done.set()

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id="coordinator", protocol=mqtt.MQTTv5)
    client.username_pw_set("coordinator", _password(a["credentials"], "coordinator"))
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect(a["host"], a["port"], keepalive=30, clean_start=True, properties=props)
    client.loop_start()
    done.wait(a["duration"])
    _write(a["out"], {
        "received": len(arrivals),
        "times": [t for t, _ in arrivals] if a.get("all_times") else
        [arrivals[0][0], arrivals[-1][0]] if arrivals else [],
        "cpu": [arrivals[0][1], arrivals[-1][1]] if arrivals else [],
        "ids": ids,
    })
    close_client(client)


# -- publisher -----------------------------------------------------------------------------


def publisher(a: dict[str, Any]) -> None:
    """Publish ``n`` valid updates round-robin over the device accounts.

    ``rate`` 0: flat out, each connection with at most ``window`` unacknowledged messages
    (QoS 1 flow control). Otherwise message ``i`` is sent at ``start + i / rate``.
    ``base_version`` of message ``i`` is ``max(0, i // k - lag)``: the coordinator makes a
    version every ``k`` accepted updates, so this is current give or take ``lag`` versions
    whatever the interleaving of the connections.
    """
    import msgpack
    import paho.mqtt.client as mqtt

    from fedbus.envelope import pack
    from fedbus.messages import Update

    delta = msgpack.unpackb(Path(a["template"]).read_bytes(), raw=False)
    devices = a["devices"]
    n, k, lag, rate = a["n"], a["k"], a["lag"], a.get("rate", 0.0)
    tag = a["tag"]
    clients = []
    windows = []
    failures = []
    connected = [threading.Event() for _ in devices]
    for i, device in enumerate(devices):
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=device, protocol=mqtt.MQTTv5)
        client.username_pw_set(device, _password(a["credentials"], device))
        window = threading.Semaphore(a.get("window", 20))

        def on_publish(_c: mqtt.Client, _u: Any, _mid: int, reason: Any, _p: Any,
                       window: threading.Semaphore = window) -> None:
            if reason.is_failure:
                failures.append(str(reason))
            window.release()

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any,
                       event: threading.Event = connected[i]) -> None:
            if not reason.is_failure:
                event.set()

        client.on_publish = on_publish
        client.on_connect = on_connect
        client.connect(a["host"], a["port"], keepalive=30, clean_start=True)
        client.loop_start()
        clients.append(client)
        windows.append(window)
    for event in connected:
        if not event.wait(10):
            raise SystemExit("publisher: a device could not connect")
    run_id = _run_of_task(clients[0], a["prefix"])
    sent_at: dict[str, float] = {}
    start = time.monotonic()
    for i in range(n):
        j = i % len(devices)
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        windows[j].acquire()
        uid = f"{tag}-{i:07d}"
        now = time.time()
        payload = pack(Update(
            update_id=uid, device_id=devices[j], task_id=a["task_id"],
            base_version=max(0, i // k - lag), num_samples=10, delta=delta,
            metrics={"loss": 0.5}, sent_at=now, run_id=run_id,
        ).to_wire())
        clients[j].publish(f"{a['prefix']}/update/{devices[j]}", payload, qos=1)
        if a.get("log_sent"):
            sent_at[uid] = now
    for window in windows:  # every PUBACK back
        for _ in range(a.get("window", 20)):
            window.acquire(timeout=30)
    elapsed = time.monotonic() - start
    _write(a["out"], {"sent": n, "seconds": elapsed, "failures": failures,
                      "sent_at": sent_at})
    for client in clients:
        close_client(client)


def _run_of_task(client: Any, prefix: str, timeout: float = 10.0) -> str:
    """The coordinator's run id, read from the retained task as an agent reads it."""
    from fedbus.envelope import unpack
    from fedbus.messages import Task

    got: list[str] = []
    done = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if not got:
            got.append(Task.from_wire(unpack(bytes(msg.payload), "task")).run_id)
            done.set()

    client.on_message = on_message
    client.subscribe(f"{prefix}/task", qos=1)
    if not done.wait(timeout):
        raise SystemExit("publisher: no retained task (is the coordinator running?)")
    client.unsubscribe(f"{prefix}/task")
    return got[0]


# -- footprint probes ------------------------------------------------------------------------


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                key, _, value = line.partition(":")
                out[key] = int(value.split()[0])
    return out


def torch_idle(a: dict[str, Any]) -> None:
    import torch  # noqa: F401 - the point of this process

    _touch(a.get("ready"))
    time.sleep(a.get("seconds", 60))


def rss_stages(a: dict[str, Any]) -> None:
    """VmRSS/VmHWM after each step an agent takes, in one process, in the agent's order.

    Also records whether that path imported ``torch._dynamo`` (any ``torch.optim`` optimizer
    would: about 70 MiB that the agent avoids with its own SGD step, edge_agent.optim).
    """
    stages = [("python", _rss())]
    import msgpack  # noqa: F401
    import numpy as np
    import paho.mqtt.client  # noqa: F401

    stages.append(("numpy, msgpack, paho", _rss()))
    import torch

    stages.append(("import torch", _rss()))
    torch.set_num_threads(1)
    import edge_agent.agent  # noqa: F401
    import fedbus.cli  # what `python -m fedbus agent` loads: every command's modules
    import fedbus.zoo
    from edge_agent.train import train_local, warm_up
    from fedbus.datasets import load_digits
    from fedbus.messages import TrainSpec

    stages.append(("import fedbus CLI and agent modules", _rss()))
    warm_up()
    stages.append(("warm_up (one tiny step, edge_agent.optim SGD)", _rss()))
    args = {"in_features": 64, "num_classes": 10}
    model = fedbus.zoo.build_model("mlp", args)
    base = fedbus.zoo.get_state(model)
    stages.append(("build model (QAT mlp)", _rss()))
    x, y = load_digits()
    train_local(model, x[:180], y[:180], TrainSpec(epochs=2, batch_size=16), seed=0)
    stages.append(("train_local (2 epochs, 180 samples)", _rss()))
    _encode_and_export(model, base, args, x[:180], y[:180], np.random.default_rng(0))
    stages.append(("encode int8 delta, int8 export and accuracy", _rss()))
    _write(a["out"], {"stages": stages, "torch_dynamo_imported": "torch._dynamo" in sys.modules})


def _encode_and_export(model: Any, base: dict, args: dict, x: Any, y: Any, rng: Any) -> None:
    """What the agent does after training: encode the delta, then its int8 metrics."""
    from fedbus.codec_spec import parse_codec
    from fedbus.envelope import pack
    from fedbus.export import export_int8, int8_accuracy
    from fedbus.update_codec import encode_update_delta
    from fedbus.zoo import get_state

    new = get_state(model)
    wire, _ = encode_update_delta({k: new[k] - base[k] for k in base}, parse_codec("int8"),
                                  rng=rng)
    pack({"delta": wire})
    int8_accuracy(export_int8(model, arch="mlp", model_args=args), x, y)


ROLES = {
    "coordinator": coordinator,
    "subscriber": subscriber,
    "publisher": publisher,
    "torch-idle": torch_idle,
    "rss-stages": rss_stages,
}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ROLES:
        raise SystemExit(f"usage: python -m bench.procs {{{','.join(ROLES)}}} JSON")
    ROLES[argv[0]](json.loads(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
