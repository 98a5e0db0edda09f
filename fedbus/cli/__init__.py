"""The ``fedbus`` command: broker, devices, certs, coordinator, agent, demo, report and
status."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Mapping
from typing import Any

import click

from fedbus import __version__
from fedbus.errors import FedbusError

__all__ = ["COMMANDS", "LazyGroup", "cli", "main"]

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Every subcommand: its name and where it lives ("module:attribute"). A command's module is
# imported only when that command runs (or for the list in `fedbus --help`), so `fedbus agent`
# on a device never imports the coordinator's modules. A new command is one line here.
COMMANDS: Mapping[str, str] = {
    "agent": "fedbus.cli.agent:agent",
    "broker": "fedbus.cli.broker:broker",
    "certs": "fedbus.cli.certs:certs",
    "coordinator": "fedbus.cli.coordinator:coordinator",
    "data": "fedbus.cli.data:data",
    "demo": "fedbus.cli.demo:demo",
    "devices": "fedbus.cli.devices:devices",
    "region-aggregator": "fedbus.cli.region:region_aggregator",
    "report": "fedbus.cli.report:report",
    "run": "fedbus.cli.run:run",
    "status": "fedbus.cli.status:status",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module when the subcommand is looked up."""

    def __init__(self, *args: Any, lazy_commands: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            module, _, attribute = self.lazy_commands[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy_commands[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="fedbus")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    envvar="FEDBUS_LOG_LEVEL",
    help="How much to log (env FEDBUS_LOG_LEVEL).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"], case_sensitive=False),
    default="text",
    show_default=True,
    envvar="FEDBUS_LOG_FORMAT",
    help="Log lines as text, or as one JSON object per line for log collectors (fields: ts, "
    "time, level, logger, message, process, exc) (env FEDBUS_LOG_FORMAT).",
)
def cli(log_level: str, log_format: str) -> None:
    """fedbus: federated learning for fleets of small devices over MQTT.

    \b
    Try everything on one machine:   fedbus demo
    Run a broker for a trial:        fedbus broker --devices 8
    Add a device while it runs:      fedbus devices --credentials c.json add device-09
    Certificates for a real broker:  fedbus certs --dir pki --server-name broker.lan
    On the server:                   fedbus coordinator --credentials c.json --eval-data t.npz
    On each device:                  fedbus agent --device-id device-01 --data data.npz ...
    Check a device's data first:     fedbus data check data.csv --task run/task.json
    Watch the fleet and the run:     fedbus status --credentials c.json
    Aggregate a bridged region:      fedbus region-aggregator --region eu --credentials c.json
    Pause, resume or stop the run:   fedbus run pause --credentials c.json

    Every command has its own --help.
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format.lower() == "json":
        from fedbus.logformat import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def main() -> None:
    """Console entry point: user mistakes become one line on stderr, never a traceback."""
    try:
        cli.main(prog_name="fedbus", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except FedbusError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
