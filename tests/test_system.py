"""Agent and coordinator exchanging real messages through a real Mosquitto.

The coordinator runs in a thread of the test process (so its counters can be read);
agents are real ``fedbus agent`` processes; hostile devices are MQTT clients that
publish crafted payloads with real device credentials.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from inmemory import wait_for
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from coordinator.aggregation import is_finite
from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService, RunSummary
from fedbus import __version__
from fedbus.broker import LocalBroker
from fedbus.datasets import dirichlet_split, load_digits, train_test_split, write_npz
from fedbus.envelope import pack, unpack
from fedbus.messages import GlobalModel, Receipt, Update, new_update_id
from fedbus.processes import Child, ChildGroup
from fedbus.transport import ConnectionSettings, Message, MqttClient
from fedbus.update_codec import decode_delta, encode_delta

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory) -> tuple[list[Path], tuple[np.ndarray, np.ndarray]]:
    root = tmp_path_factory.mktemp("data")
    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, seed=0)
    paths = []
    for i, idx in enumerate(dirichlet_split(y_train, 3, alpha=1.0, seed=0)):
        path = root / f"part{i}.npz"
        write_npz(path, x_train[idx], y_train[idx])
        paths.append(path)
    return paths, (x_test, y_test)


class CoordinatorThread:
    def __init__(self, service: CoordinatorService) -> None:
        self.service = service
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.summary = self.service.run()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def start(self) -> CoordinatorThread:
        self._thread.start()
        return self

    def join(self, timeout: float) -> RunSummary:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.service.stop()
            self._thread.join(10)
            raise AssertionError(f"coordinator did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.service.core.counters)


@pytest.fixture
def start_coordinator(
    broker: LocalBroker, digits_split, tmp_path: Path
) -> Iterator[Callable[..., CoordinatorThread]]:
    started: list[CoordinatorThread] = []

    def start(evaluate: bool = True, **overrides) -> CoordinatorThread:
        settings = dict(
            host=broker.host, port=broker.port, prefix=broker.prefix, task_id="t1",
            epochs=2, batch_size=16, lr=0.05, duration=60.0, state_dir=tmp_path / "run",
            signing_key=broker.signing_key_file,  # the agents verify with its public key
        )
        settings.update(overrides)
        service = CoordinatorService(
            CoordinatorConfig(**settings),
            password=broker.coordinator.password,
            eval_data=digits_split[1] if evaluate else None,
        )
        thread = CoordinatorThread(service).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.service.stop()
        thread._thread.join(10)


@pytest.fixture
def start_agent(broker: LocalBroker, tmp_path: Path) -> Iterator[Callable[..., Child]]:
    agents = ChildGroup()

    def start(device: str, data: Path, *extra: str) -> Child:
        return agents.add(Child(
            [sys.executable, "-m", "fedbus", "agent", "--device-id", device, "--data", str(data),
             "--credentials", str(broker.credentials_file),
             "--state-dir", str(tmp_path / "state" / device), *extra],
            log_path=tmp_path / f"{device}.log", name=f"agent {device}",
        ))

    yield start
    agents.stop_all(10.0)


class Device:
    """A device account driven by the test: publishes whatever it is told to."""

    def __init__(self, broker: LocalBroker, device_id: str) -> None:
        self.device_id = device_id
        self.topics = broker.topics
        self.received: list[Message] = []
        self.client = MqttClient(
            ConnectionSettings(host=broker.host, port=broker.port, client_id=device_id,
                               username=device_id,
                               password=broker.credentials(device_id).password),
            on_message=self.received.append,
        )
        for topic in (self.topics.model, self.topics.receipt(device_id)):
            self.client.subscribe(topic)
        self.client.start()
        assert self.client.wait_connected(5), self.client.last_error

    def receipts(self) -> list[Receipt]:
        topic = self.topics.receipt(self.device_id)
        return [Receipt.from_wire(unpack(m.payload)) for m in self.received if m.topic == topic]

    def latest_model(self) -> GlobalModel | None:
        models = [m for m in self.received if m.topic == self.topics.model]
        return GlobalModel.from_wire(unpack(models[-1].payload, "model")) if models else None

    def update(self, delta: dict[str, np.ndarray], *, base_version: int = 0, task_id: str = "t1",
               device_id: str | None = None, codec: str = "fp32",
               run_id: str | None = None) -> bytes:
        return pack(Update(
            update_id=new_update_id(), device_id=device_id or self.device_id, task_id=task_id,
            base_version=base_version, num_samples=10, delta=encode_delta(delta, codec),
            metrics={}, sent_at=time.time(), run_id=run_id or self.run_id(),
        ).to_wire())

    def run_id(self) -> str:
        """The coordinator's run, from the retained model."""
        wait_for(lambda: self.latest_model() is not None, 10, "the retained model")
        model = self.latest_model()
        assert model is not None
        return model.run_id

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        return self.client.publish(topic, payload, retain=retain).wait(5)

    def close(self) -> None:
        self.client.stop()


@pytest.fixture
def device(broker: LocalBroker) -> Iterator[Callable[[str], Device]]:
    made: list[Device] = []

    def make(device_id: str) -> Device:
        made.append(Device(broker, device_id))
        return made[-1]

    yield make
    for d in made:
        d.close()


def _zero_like_model(dev: Device) -> dict[str, np.ndarray]:
    wait_for(lambda: dev.latest_model() is not None, 10, "the retained model")
    model = dev.latest_model()
    assert model is not None
    return {k: np.zeros_like(v) for k, v in decode_delta(model.tensors).items()}


# -- the tests ------------------------------------------------------------------------------


def test_agents_and_coordinator_improve_the_model(
    start_coordinator, start_agent, digits_split, tmp_path
):
    paths, (x_test, y_test) = digits_split
    coord = start_coordinator(mode="fedbuff", buffer_size=2, max_versions=8, min_devices=2)
    exported = tmp_path / "dev-a.int8.npz"
    agents = [start_agent("dev-a", paths[0], "--export", str(exported)),
              start_agent("dev-b", paths[1])]
    summary = coord.join(timeout=90)
    assert summary.final_version == 8
    first, last = summary.history[0].accuracy, summary.history[-1].accuracy
    assert first is not None and last is not None
    assert first < 0.3 and last > 0.75, (first, last)
    assert summary.counters["updates_accepted"] >= 16
    assert summary.counters["updates_rejected"] == 0
    assert summary.counters["bytes_received"] > 0
    for agent in agents:
        assert agent.terminate(15) == 0
        log = agent.log_path.read_text()
        assert "accepted" in log and "Traceback" not in log
        assert "(int8 0." in log  # the int8 model's local accuracy goes with each update
    # the exported int8 model runs with numpy alone and has learned something
    from fedbus.export import Int8Model

    int8 = Int8Model.load(exported)
    assert float((int8.predict(x_test) == y_test).mean()) > 0.5


def test_compute_seconds_fixes_a_simulated_device_period(start_coordinator, start_agent,
                                                         digits_split):
    paths, _ = digits_split
    coord = start_coordinator(mode="fedasync", max_versions=4)
    start_agent("dev-a", paths[0], "--compute-seconds", "0.4", "--slowdown", "2")
    summary = coord.join(timeout=90)
    assert summary.final_version == 4
    # one update per version; each took slowdown x compute_seconds = 0.8 s on the device
    times = [r.seconds for r in summary.history[1:]]
    gaps = [b - a for a, b in pairwise(times)]
    assert gaps and min(gaps) >= 0.75, gaps


def test_fedavg_rounds_wait_for_every_online_device(start_coordinator, start_agent, digits_split):
    paths, _ = digits_split
    coord = start_coordinator(mode="fedavg", max_versions=3, round_deadline=30.0, min_devices=2)
    start_agent("dev-a", paths[0])
    start_agent("dev-b", paths[1], "--slowdown", "3")
    summary = coord.join(timeout=90)
    assert summary.final_version == 3
    # every round holds exactly one update from each of the two devices
    assert summary.counters["updates_accepted"] == 6
    assert summary.history[-1].accuracy > summary.history[0].accuracy


def test_the_task_waits_for_min_devices(start_coordinator, start_agent, digits_split):
    paths, _ = digits_split
    coord = start_coordinator(mode="fedbuff", buffer_size=2, max_versions=2, min_devices=2)
    start_agent("dev-a", paths[0])
    core = coord.service.core
    deadline = time.monotonic() + 60
    while "dev-a" not in core.online_devices():
        assert time.monotonic() < deadline, "dev-a never came online"
        time.sleep(0.1)
    time.sleep(2.0)  # dev-a is online and idle: it has no task to train for
    assert core.counters["updates_received"] == 0
    assert coord.service.bytes_model_published == 0
    start_agent("dev-b", paths[1])
    summary = coord.join(timeout=90)
    assert summary.final_version == 2
    # both devices were online before the first model: every version holds one of each
    assert summary.counters["updates_accepted"] == 4


def test_bad_updates_are_rejected_and_the_coordinator_keeps_serving(start_coordinator, device):
    coord = start_coordinator(mode="fedasync", max_norm=50.0)
    dev = device("dev-a")
    zero = _zero_like_model(dev)
    name = next(iter(zero))
    own = dev.topics.update("dev-a")

    nan = {**zero, name: np.full_like(zero[name], np.nan)}
    huge = {**zero, name: np.full_like(zero[name], 1e3)}
    wrong_shape = {**zero, name: np.zeros((3, 3), np.float32)}
    for payload in (
        b"\x00garbage",
        dev.update(nan),
        dev.update(huge),
        dev.update(wrong_shape),
        dev.update(zero, task_id="other-task"),
        dev.update(zero, base_version=5),
        dev.update(zero, device_id="dev-b"),
    ):
        assert dev.publish(own, payload)
    wait_for(lambda: coord.counters["updates_rejected"] == 7, 10, "seven rejections")
    c = coord.counters
    for reason in ("malformed", "non_finite", "norm", "shape", "wrong_task", "future_version",
                   "device_mismatch"):
        assert c[f"rejected_{reason}"] == 1, (reason, c)
    wait_for(lambda: len(dev.receipts()) >= 6, 10, "receipts for the parseable updates")
    assert {r.reason for r in dev.receipts()} >= {"non_finite", "norm", "shape", "wrong_task"}
    assert not any(r.accepted for r in dev.receipts())

    # still serving: a valid update is accepted and makes a new, finite version
    good = {k: np.full_like(v, 0.01) for k, v in zero.items()}
    payload = dev.update(good)
    assert dev.publish(own, payload)
    wait_for(lambda: coord.service.core.version == 1, 10, "version 1")
    assert is_finite(coord.service.core.state)
    # the same update again (a re-send) gets its first verdict again and is not applied twice
    assert dev.publish(own, payload)
    wait_for(lambda: coord.counters["updates_repeated"] == 1, 10, "the repeated verdict")
    wait_for(lambda: any(r.repeat and r.accepted for r in dev.receipts()), 10, "repeat receipt")
    assert coord.service.core.version == 1
    wait_for(lambda: (m := dev.latest_model()) is not None and m.version == 1, 10, "model v1")
    # an update of another run, and a valid update published retained, are refused
    assert dev.publish(own, dev.update(good, base_version=1, run_id="another-run"))
    wait_for(lambda: coord.counters["rejected_wrong_run"] == 1, 10, "wrong_run")
    assert dev.publish(own, dev.update(good, base_version=1), retain=True)
    wait_for(lambda: coord.counters["rejected_retained"] == 1, 10, "retained")
    assert coord.service.core.version == 1


def test_a_flooding_device_is_refused_while_the_others_are_still_judged(
    start_coordinator, device
):
    """Issue 8: one device publishing 1 MiB updates back to back, expensive to read (a
    million empty maps under an unknown key), goes over its share of the coordinator's time
    and is refused unjudged with rate_limited receipts; another device's updates, sent
    meanwhile, are still judged and accepted. (With the limit derived from this model, about
    240 KB, the broker would drop these messages for the coordinator: the old fixed 4 MiB
    limit, as a run recorded with it keeps, lets them through to be refused.)"""
    coord = start_coordinator(
        # mean: the honest updates below are all zero, which quorum never counts as agreeing
        evaluate=False, mode="fedasync", device_share=0.01, device_burst=0.01, aggregator="mean",
        model_args='{"in_features": 64, "hidden": [16], "num_classes": 10}',
        max_update_bytes=4 << 20,
    )
    flooder, honest = device("dev-b"), device("dev-a")
    zero = _zero_like_model(honest)
    run = honest.run_id()
    filler = b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x80" * (1 << 20)
    flood = [pack({"v": 2, "kind": "update", "update_id": f"flood-{i}", "dev": "dev-b",
                   "run": run, "task": "t1", "base": 0, "n": 10, "m": {}})
             for i in range(30)]
    # the same envelope with one more key, "x", holding the filler (fixmap of 9 -> 10 keys)
    flood = [bytes([p[0] + 1]) + p[1:] + pack("x") + filler for p in flood]
    sent = [flooder.client.publish(flooder.topics.update("dev-b"), p) for p in flood]
    for i in range(3):
        version = coord.service.core.version
        assert honest.publish(honest.topics.update("dev-a"),
                              honest.update(zero, base_version=version))
        wait_for(lambda i=i: len(honest.receipts()) == i + 1, 10, f"honest receipt {i + 1}")
    assert all(r.wait(10) for r in sent)
    wait_for(lambda: coord.service.counters()["updates_rate_limited"]
             + coord.counters["updates_received"] >= 33, 10, "every message handled")
    assert [r.accepted for r in honest.receipts()] == [True, True, True]
    limited = [r for r in flooder.receipts() if r.reason == "rate_limited"]
    judged = coord.counters["updates_received"] - 3
    # 10 ms of burst lets a few through (each costs milliseconds to receive and read)
    assert judged <= 20 and len(limited) == 30 - judged, (judged, len(limited))
    assert all(r.retry_after is not None and r.retry_after > 0 and not r.accepted
               for r in limited)
    assert {r.update_id for r in limited} <= {f"flood-{i}" for i in range(30)}
    assert coord.service.counters()["bytes_rate_limited"] >= len(limited) << 20


def test_a_device_cannot_write_for_another_or_replace_the_model(start_coordinator, device):
    coord = start_coordinator(mode="fedasync")
    mallory, observer = device("dev-a"), device("dev-c")
    zero = _zero_like_model(mallory)
    poisoned = {k: np.full_like(v, 0.5) for k, v in zero.items()}

    forged = mallory.update(poisoned, device_id="dev-b")
    assert not mallory.publish(mallory.topics.update("dev-b"), forged)
    fake_model = pack(GlobalModel("t1", 99, encode_delta(poisoned, "fp32"), 0.0,
                                  run_id=mallory.run_id()).to_wire())
    assert not mallory.publish(mallory.topics.model, fake_model, retain=True)
    assert not mallory.publish(mallory.topics.task, b"x", retain=True)

    # barrier: a legitimate update after the forged ones arrives, so they would have too
    assert mallory.publish(mallory.topics.update("dev-a"), mallory.update(zero))
    wait_for(lambda: coord.counters["updates_received"] >= 1, 10, "the legitimate update")
    time.sleep(0.3)
    assert coord.counters["updates_received"] == 1
    assert coord.counters["updates_accepted"] == 1

    late = device("dev-b")  # a fresh subscriber sees the coordinator's retained model
    _zero_like_model(late)
    model = late.latest_model()
    assert model is not None and model.task_id == "t1" and model.version <= 1
    assert observer.latest_model() is not None and observer.latest_model().version <= 1


def test_wrong_password_is_one_clear_line(broker: LocalBroker, digits_split, tmp_path):
    paths, _ = digits_split
    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "agent", "--device-id", "dev-a", "--data", str(paths[0]),
         "--host", broker.host, "--port", str(broker.port), "--password", "wrong"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "refused" in error_lines[0], result.stderr


def test_agents_and_coordinator_survive_a_broker_restart(
    broker: LocalBroker, start_coordinator, start_agent, digits_split
):
    paths, _ = digits_split
    coord = start_coordinator(mode="fedbuff", buffer_size=1, max_versions=1000, duration=90)
    agent = start_agent("dev-a", paths[0])
    wait_for(lambda: coord.service.core.version >= 2, 40, "two versions before the restart")
    broker.restart()
    before = coord.service.core.version
    wait_for(lambda: coord.service.core.version >= before + 3, 40, "progress after the restart")
    assert agent.alive, "the agent died when the broker went away"
    coord.service.stop()
    coord.join(15)


def test_long_training_does_not_starve_the_keepalive(
    broker: LocalBroker, start_coordinator, start_agent, digits_split
):
    paths, _ = digits_split
    # keepalive 2 s: the broker drops a client silent for 1.5 keepalives by the MQTT spec
    # (Mosquitto 2.0.11 took about 6 s with keepalive 1, measured), and paho closes the
    # connection itself when a PINGRESP is a keepalive late. 300 local epochs are
    # seconds of CPU-bound training, stretched past 12 s by the slowdown: a network thread
    # starved by training would be dropped several times over. (With keepalive 1 s, a busy
    # machine running the suite on two workers delayed the thread by a second at times.)
    coord = start_coordinator(mode="fedasync", max_versions=1, epochs=300)
    agent = start_agent("dev-a", paths[0], "--keepalive", "2", "--slowdown", "3")
    summary = coord.join(timeout=90)
    assert summary.final_version == 1
    assert agent.terminate(15) == 0
    log = agent.log_path.read_text()
    trained = [line for line in log.splitlines() if "trained on v0" in line]
    assert trained and float(trained[0].split(" in ")[1].split("s;")[0]) > 2.0, trained
    assert "lost the connection" not in log
    assert "exceeded timeout" not in broker.log_file.read_text()


def test_an_agent_that_cannot_take_part_waits_instead_of_crashing(
    start_coordinator, start_agent, digits_split
):
    paths, _ = digits_split
    # the devices hold 64 features; this task's model wants 32
    coord = start_coordinator(
        mode="fedasync", model_args='{"in_features": 32, "num_classes": 10}', duration=30,
        evaluate=False,
    )
    agent = start_agent("dev-a", paths[0])
    log_path = agent.log_path
    wait_for(lambda: "cannot take part" in log_path.read_text(), 30, "the agent to give up")
    time.sleep(1.0)
    assert agent.alive, log_path.read_text()[-2000:]
    assert coord.counters["updates_received"] == 0
    assert "Traceback" not in log_path.read_text()
    # its status says why, and the coordinator's fleet view shows it (protocol revision 2.3)
    fleet = coord.service.fleet.devices
    wait_for(lambda: "dev-a" in fleet and fleet["dev-a"].error is not None, 10, "the error")
    device = fleet["dev-a"]
    assert device.agent == __version__ and device.online
    assert device.error is not None and device.error["kind"] == "data"
    assert "the model expects (32,)" in device.error["text"], device.error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, list[Sample]]:
    """The coordinator's metrics by family name ({} while the endpoint is not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(families: dict[str, list[Sample]], sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count")
    for s in families.get(family, []):
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


def test_the_coordinator_serves_prometheus_metrics_during_a_run(
    start_coordinator, start_agent, digits_split
):
    paths, _ = digits_split
    port = _free_port()
    coord = start_coordinator(mode="fedbuff", buffer_size=2, max_versions=1000, min_devices=2,
                              metrics_port=port)
    start_agent("dev-a", paths[0])
    start_agent("dev-b", paths[1])
    seen: dict[str, list[Sample]] = {}

    def progressed() -> bool:
        seen.clear()
        seen.update(_scrape(port))
        return (_value(seen, "fedbus_model_version") >= 2
                and _value(seen, "fedbus_heldout_accuracy") > 0)

    wait_for(progressed, 60, "two model versions in the scraped metrics")
    coord.service.stop()
    coord.join(timeout=30)
    assert _value(seen, "fedbus_updates_total", outcome="accepted", reason="none") >= 4
    assert _value(seen, "fedbus_updates_total", outcome="rejected", reason="norm") == 0
    assert _value(seen, "fedbus_model_versions_total") >= 2
    assert _value(seen, "fedbus_update_staleness_count") >= 4
    assert _value(seen, "fedbus_update_latency_seconds_count") >= 4
    assert _value(seen, "fedbus_update_bytes_received_total") > 0
    assert _value(seen, "fedbus_bytes_sent_total", kind="model") > 0
    assert _value(seen, "fedbus_bytes_sent_total", kind="receipt") > 0
    assert _value(seen, "fedbus_devices_online") == 2
    assert _value(seen, "fedbus_heldout_loss") > 0
    # the endpoint stops with the service
    assert _scrape(port) == {}


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; `make test` installs it
# where the browser test keeps its screenshot (CI keeps the directory as an artifact)
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def test_the_dashboard_shows_a_new_version_without_a_reload(
    start_coordinator, start_agent, digits_split
):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: `make test` installs it"
    paths, _ = digits_split
    port = _free_port()
    coord = start_coordinator(mode="fedbuff", buffer_size=2, max_versions=1000, min_devices=2,
                              dashboard_port=port)
    start_agent("dev-a", paths[0], "--compute-seconds", "1")
    start_agent("dev-b", paths[1], "--compute-seconds", "1")
    wait_for(lambda: coord.service.dashboard_port == port, 30, "the dashboard to listen")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            loads: list[str] = []
            page.on("load", lambda p: loads.append(p.url))
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function(
                "() => document.getElementById('version').textContent.startsWith('v')"
                " && document.getElementById('conn').textContent === 'live'", timeout=30_000)
            first = int(page.inner_text("#version")[1:])
            # a later version arrives over the event stream: the page is not loaded again
            page.wait_for_function(
                "first => parseInt(document.getElementById('version').textContent.slice(1)) "
                "> first"
                " && document.querySelectorAll('#acc circle').length >= 2", arg=first,
                timeout=60_000)
            page.wait_for_function(
                "() => document.querySelectorAll('#fleet tbody tr').length === 2",
                timeout=30_000)
            fleet = page.inner_text("#fleet")
            accuracy = float(page.inner_text("#accuracy"))
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert len(loads) == 1, loads
    assert "dev-a" in fleet and "dev-b" in fleet
    assert 0 < accuracy <= 1
    coord.service.stop()
    coord.join(timeout=30)
    assert coord.service.dashboard_port is None  # it stops with the service


def test_an_agent_follows_model_deltas_instead_of_whole_models(start_coordinator, start_agent,
                                                               digits_split):
    """Revision 2.7: after the first delta applies, the agent unsubscribes from the whole
    model; every later version it trains on is rebuilt from a delta, checked bit for bit
    against the delta's digest (a mismatch would subscribe it to the whole model again)."""
    paths, _ = digits_split
    coord = start_coordinator(mode="fedasync", max_versions=2)
    agent = start_agent("dev-a", paths[0])
    summary = coord.join(timeout=60)
    assert summary.final_version == 2  # the update on v1 was trained on the rebuilt v1
    assert summary.counters["updates_accepted"] >= 2
    assert coord.service.bytes_model_delta_published > 0
    assert agent.terminate(15) == 0
    log = agent.log_path.read_text()
    assert "following model deltas from v1 on" in log, log
    assert "whole model again" not in log and "Traceback" not in log
