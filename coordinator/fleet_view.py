"""Reading and showing the coordinator's fleet snapshot (``fedbus status``).

``read_fleet`` checks a ``fleet`` message (docs/protocol.md section 7.7) as it arrives from
the broker; ``fleet_view`` lays a checked snapshot out as a ``rich`` renderable (a line
about the run and one table row per device), the same for the live view and ``--once``.
Pure: the time ``now`` is given, nothing is printed here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fedbus.envelope import DecodeLimits, unpack
from fedbus.errors import ProtocolError

__all__ = ["FLEET_LIMITS", "fleet_view", "human_bytes", "read_fleet", "seconds_ago"]

# what `fedbus status` accepts: a snapshot of coordinator.fleet.MAX_FLEET_DEVICES devices
# (about 400 bytes each) fits well within it
FLEET_LIMITS = DecodeLimits(max_bytes=16 * 1024 * 1024, max_bin_len=0, max_str_len=1024,
                            max_array_len=10_000, max_map_len=256)

_NUMBER = (int, float)
_RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "task": (str,), "run": (str,), "mode": (str,), "version": (int,),
    "accuracy": _NUMBER, "loss": _NUMBER, "evaluated_version": (int,),
    "updates_accepted": (int,), "updates_rejected": (int,), "bytes_received": (int,),
    "bytes_model_published": (int,), "ended": (str,), "updates_per_second": _NUMBER,
    "devices_known": (int,), "devices_online": (int,), "started_at": _NUMBER,
    "state": (str,), "control": (dict,),  # revision 2.5
}
_DEVICE_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "state": (str,), "online": (bool,), "last_seen": _NUMBER,
    "agent": (str,), "run": (str,), "model_version": (int,), "accepted": (int,),
    "rejected": (dict,), "repeated": (int,), "bytes": (int,), "mean_staleness": _NUMBER,
    "loss": _NUMBER, "acc": _NUMBER, "acc_int8": _NUMBER, "error": (dict,),
}


def _checked(obj: Any, fields: Mapping[str, tuple[type, ...]], what: str) -> dict[str, Any]:
    """``obj`` with every known field present (absent: None) and of its type."""
    if not isinstance(obj, dict):
        raise ProtocolError("schema", f"fleet: {what} must be a map")
    out: dict[str, Any] = {}
    for key, types in fields.items():
        value = obj.get(key)
        wrong_bool = isinstance(value, bool) and bool not in types
        if value is not None and (wrong_bool or not isinstance(value, types)):
            raise ProtocolError("schema", f"fleet: {what} field {key!r} has the wrong type")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError("schema", f"fleet: {what} field {key!r} is not finite")
        out[key] = value
    return out


def read_fleet(payload: bytes, limits: DecodeLimits = FLEET_LIMITS) -> dict[str, Any]:
    """Decode and check a ``fleet`` message; ``ProtocolError`` if it is not one. Unknown
    keys are dropped, missing ones read as None, so a newer coordinator's snapshot reads."""
    obj = unpack(payload, "fleet", limits)
    ts = obj.get("ts")
    if not isinstance(ts, _NUMBER) or isinstance(ts, bool) or not math.isfinite(ts):
        raise ProtocolError("schema", "fleet: ts must be a finite number")
    devices = obj.get("devices")
    if not isinstance(devices, list):
        raise ProtocolError("schema", "fleet: devices must be an array")
    out = [_checked(d, _DEVICE_FIELDS, "device") for d in devices]
    for device in out:
        if device["id"] is None:
            raise ProtocolError("schema", "fleet: a device has no id")
        rejected = device["rejected"] or {}
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                   for k, v in rejected.items()):
            raise ProtocolError("schema", "fleet: rejected must map reasons to counts")
        device["rejected"] = rejected
        error = device["error"]
        if error is not None:
            device["error"] = _checked(error, {"kind": (str,), "text": (str,), "ts": _NUMBER},
                                       "error")
    return {"v": obj["v"], "kind": "fleet", "ts": float(ts),
            "run": _checked(obj.get("run", {}), _RUN_FIELDS, "run"), "devices": out}


# -- showing a snapshot --------------------------------------------------------------------


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1000:
        return f"{n} B"
    value, unit = n / 1000, "kB"
    for bigger in ("MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


def seconds_ago(then: float | None, now: float) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago``; ``-`` for never."""
    if then is None:
        return "-"
    age = max(0.0, now - then)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if age >= size:
            return f"{age // size:.0f}{unit} ago"
    return f"{age:.0f}s ago"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_STATE_STYLE = {"online": "green", "idle": "green", "training": "cyan", "offline": "red"}


def _run_line(run: Mapping[str, Any], ts: float, now: float) -> Text:
    accuracy = run["accuracy"]
    evaluated = run["evaluated_version"]
    held_out = "-" if accuracy is None else f"{accuracy:.4f}" + (
        "" if evaluated is None or evaluated == run["version"] else f" (v{evaluated})"
    )
    parts = [
        ("task ", f"{run['task'] or '-'}"), ("  run ", f"{run['run'] or '-'}"),
        ("  mode ", f"{run['mode'] or '-'}"), ("  version ", f"{_num(run['version'], 'd')}"),
        ("  held-out accuracy ", held_out),
        ("\nupdates/s ", _num(run["updates_per_second"], ".2f")),
        ("  accepted ", _num(run["updates_accepted"], "d")),
        ("  rejected ", _num(run["updates_rejected"], "d")),
        ("  received ", human_bytes(run["bytes_received"])),
        ("  models sent ", human_bytes(run["bytes_model_published"])),
        ("  devices online ", f"{_num(run['devices_online'], 'd')}/"
                              f"{_num(run['devices_known'], 'd')}"),
    ]
    text = Text()
    for label, value in parts:
        text.append(label, style="dim")
        text.append(value, style="bold")
    if run["ended"]:
        text.append("\nthe run has ended: ", style="yellow")
        text.append(run["ended"])
    elif run["state"] == "paused":
        text.append("\nthe run is paused: ", style="yellow")
        text.append("no new version until `fedbus run resume`")
    text.append(f"\nsnapshot {seconds_ago(ts, now)}", style="dim")
    return text


def _rejected(rejected: Mapping[str, int]) -> str:
    if not rejected:
        return "0"
    total = sum(rejected.values())
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in rejected.items()) + ")"


def _error(error: Mapping[str, Any] | None, now: float) -> str:
    if error is None:
        return ""
    return f"{error['kind'] or 'other'}: {error['text'] or ''} ({seconds_ago(error['ts'], now)})"


def fleet_view(snapshot: Mapping[str, Any], now: float) -> Group:
    """The run's line and the device table of a snapshot checked by ``read_fleet``."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in (
        ("device", "left"), ("state", "left"), ("last seen", "right"), ("agent", "left"),
        ("model", "right"), ("accepted", "right"), ("rejected", "left"), ("bytes", "right"),
        ("staleness", "right"), ("loss", "right"), ("int8 acc", "right"),
        ("last error", "left"),
    ):
        table.add_column(name, justify=justify,  # type: ignore[arg-type]
                         overflow="fold" if name == "last error" else "ellipsis")
    for d in snapshot["devices"]:
        state = d["state"] or "unknown"
        table.add_row(
            d["id"], Text(state, style=_STATE_STYLE.get(state, "")),
            seconds_ago(d["last_seen"], now), d["agent"] or "-",
            "-" if d["model_version"] is None else f"v{d['model_version']}",
            _num(d["accepted"], "d"), _rejected(d["rejected"]), human_bytes(d["bytes"]),
            _num(d["mean_staleness"], ".2f"), _num(d["loss"], ".3f"),
            _num(d["acc_int8"], ".3f"), Text(_error(d["error"], now), style="red"),
        )
    if not snapshot["devices"]:
        return Group(_run_line(snapshot["run"], snapshot["ts"], now), Text(""),
                     Text("no device has been seen yet", style="dim"))
    return Group(_run_line(snapshot["run"], snapshot["ts"], now), Text(""), table)
