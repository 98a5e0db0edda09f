"""The ``fedbus`` command: broker, devices, certs, coordinator, agent, demo, report and
status."""

from __future__ import annotations

import logging
import sys

import click

from fedbus import __version__
from fedbus.errors import FedbusError

__all__ = ["cli", "main"]

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


@click.group(
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
def cli(log_level: str) -> None:
    """fedbus: federated learning for fleets of small devices over MQTT.

    \b
    Try everything on one machine:   fedbus demo
    Run a broker for a trial:        fedbus broker --devices 8
    Add a device while it runs:      fedbus devices --credentials c.json add device-09
    Certificates for a real broker:  fedbus certs --dir pki --server-name broker.lan
    On the server:                   fedbus coordinator --credentials c.json --eval-data t.npz
    On each device:                  fedbus agent --device-id device-01 --data data.npz ...
    Watch the fleet and the run:     fedbus status --credentials c.json

    Every command has its own --help.
    """
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def _register() -> None:
    from fedbus.cli.agent import agent
    from fedbus.cli.broker import broker
    from fedbus.cli.certs import certs
    from fedbus.cli.coordinator import coordinator
    from fedbus.cli.demo import demo
    from fedbus.cli.devices import devices
    from fedbus.cli.report import report
    from fedbus.cli.status import status

    for command in (broker, devices, certs, coordinator, agent, demo, report, status):
        cli.add_command(command)


_register()


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
