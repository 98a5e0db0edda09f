"""Several real edge agents in one process: ``python -m bench.agents_host ...``.

Each device runs the real ``edge_agent.agent.Agent`` on its own thread, with its own MQTT
connection, credentials, session and state directory, exactly as ``fedbus agent`` would;
only ``import torch`` (about 220 MiB and 2 s) is shared, so the fault benchmark can put 50
agents on a 2-core machine. SIGTERM stops them all (each publishes its offline status);
SIGKILL kills them all at once, as a power cut of the host would.

    python -m bench.agents_host --credentials c.json --state-root DIR \\
        --device device-01=data/device-01.npz --device device-02=... [agent flags]

Agent flags after the known options are passed to every agent's configuration
(``--compute-seconds 0.5``, ``--on-run-end exit``, ...), as ``name=value`` settings.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(threadName)s %(name)s: %(message)s"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agents_host")
    parser.add_argument("--credentials", required=True)
    parser.add_argument("--state-root", required=True)
    parser.add_argument("--device", action="append", required=True, metavar="ID=DATA")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="an AgentConfig setting for every agent, e.g. compute_seconds=0.5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)

    from edge_agent.agent import Agent, LocalData
    from edge_agent.config import AgentConfig
    from fedbus.config import load_config
    from fedbus.credentials import read_credentials
    from fedbus.datasets import load_local_data

    settings: dict[str, Any] = dict(item.split("=", 1) for item in args.set)
    agents: list[Agent] = []
    for spec in args.device:
        device, data = spec.split("=", 1)
        access = read_credentials(args.credentials, device)
        config = load_config(AgentConfig, flags={
            **settings, "device_id": device, "data": data, "host": access.host,
            "port": str(access.port), "prefix": access.prefix,
            "coordinator_key": access.coordinator_key or "",
            "state_dir": str(Path(args.state_root) / device),
        }, env={}, env_prefix="FEDBUS_AGENT")
        x, y = load_local_data(config.data)
        agents.append(Agent(config, LocalData(x, y), password=access.password))

    def stop(*_: object) -> None:
        for agent in agents:
            agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failures: list[str] = []

    def run(agent: Agent) -> None:
        try:
            agent.run()
        except Exception as exc:  # one agent's failure is reported, the others go on
            failures.append(f"{agent.config.device_id}: {exc}")
            logging.getLogger("bench.agents_host").error("%s failed: %s",
                                                        agent.config.device_id, exc)

    threads = [threading.Thread(target=run, args=(a,), name=a.config.device_id)
               for a in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
