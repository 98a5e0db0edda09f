"""``fedbus run pause|resume|stop``: the operator's commands to a running coordinator
(protocol revision 2.5), over MQTT with the operator's credentials."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click

from fedbus.cli._options import config_options, load_process_config
from fedbus.cli.status import ENV_PREFIX, HELPS, StatusConfig

__all__ = ["run"]

_HELPS = {**HELPS, "timeout": "Seconds to wait for the broker and for the coordinator's "
          "answer."}


def _command(name: str, summary: str) -> click.Command:
    @click.command(
        name,
        help=summary,
        epilog="Settings are those of `fedbus status`: flags, then FEDBUS_STATUS_* "
        "environment variables, then the [status] table of --config, then defaults.",
    )
    @click.option(
        "--config", "config_file", type=click.Path(path_type=Path), default=None,
        help="TOML file with a [status] table of the settings below.",
    )
    @click.option("--reason", default=None,
                  help="Why (at most 200 bytes): logged by the coordinator; a stop's reason "
                  "ends up in the ended task the devices see.")
    @config_options(StatusConfig, _HELPS, ENV_PREFIX)
    def command(config_file: Path | None, reason: str | None, **flags: Any) -> None:
        cfg, password = load_process_config(
            StatusConfig, flags, env_prefix=ENV_PREFIX, config_file=config_file,
            section="status", username=lambda c: c.username,
        )
        click.echo(_send(cfg, password, name, reason))

    return command


def _send(cfg: StatusConfig, password: str, command: str, reason: str | None) -> str:
    """Publish the command, wait for the coordinator's answer in the fleet snapshot; the
    line to print, or a one-line ``FedbusError``."""
    from coordinator.control import operator_answer
    from coordinator.fleet_view import read_fleet
    from coordinator.fleet_watch import FleetWatcher
    from fedbus.envelope import pack
    from fedbus.errors import ConfigError, FedbusError, ProtocolError
    from fedbus.messages import MAX_CONTROL_REASON, Control, new_update_id
    from fedbus.topics import Topics

    if reason is not None and (len(reason.encode()) > MAX_CONTROL_REASON
                               or not reason.isprintable()):
        raise ConfigError(f"--reason must be printable text of at most {MAX_CONTROL_REASON} "
                          "bytes")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("fedbus.transport").setLevel(logging.WARNING)
    request = Control(new_update_id(), command, time.time(), reason)
    topic = Topics(cfg.prefix).control
    watcher = FleetWatcher(cfg.settings(password), cfg.prefix, timeout=cfg.timeout)
    watcher.start()
    try:
        deadline = time.monotonic() + cfg.timeout
        sent = watcher.publish(topic, pack(request.to_wire()))
        sent.wait(max(0.1, deadline - time.monotonic()))
        if not sent.ok:
            why = sent.reason or "no answer"
            raise FedbusError(
                f"the broker refused the {command} command on {topic} ({why}): only the "
                "operator account may send it; is "
                f"{cfg.username!r} the operator (`fedbus devices operator`), with a broker "
                "set up by fedbus 2.5 or later (restart `fedbus broker` to update its rules)?"
            )
        while (left := deadline - time.monotonic()) > 0:
            payload = watcher.next_payload(min(left, 0.5))
            fatal = watcher.fatal()
            if fatal is not None:
                raise fatal
            if payload is None:
                continue
            try:
                answer = operator_answer(read_fleet(payload), request.request_id, command)
            except ProtocolError:
                continue
            if answer is not None:
                done, line = answer
                if not done:
                    raise FedbusError(line)
                return line
        raise FedbusError(
            f"no answer to {command} within {cfg.timeout:g} s: is a coordinator (fedbus with "
            f"protocol revision 2.5 or newer) serving prefix {cfg.prefix!r} on this broker?"
        )
    finally:
        watcher.stop()


@click.group("run")
def run() -> None:
    """Pause, resume or stop the coordinator's run, from any machine with the operator's
    credentials (the operator account, as for `fedbus status`).

    \b
    pause   no new model version is made and agents stop training (they stay
            connected and idle); updates already on their way are still judged and
            kept, never lost
    resume  the run goes on: agents train on the newest model
    stop    the run ends as at --max-versions: the coordinator applies what it holds,
            tells the devices the run has ended, and exits

    Each command waits for the coordinator's answer (its fleet snapshot) and prints one
    line. Start a coordinator paused with `fedbus coordinator --start paused`.

    \b
    Example, against a broker started with `fedbus broker --dir ./trial`:
      fedbus run pause --credentials trial/credentials.json --reason "sensor swap"
    """


run.add_command(_command("pause", "Pause the run: no new version; agents stay idle."))
run.add_command(_command("resume", "Resume a paused run."))
run.add_command(_command("stop", "End the run: agents are told, the coordinator exits."))
