"""Per-device admission: one device's messages cannot take the coordinator's time from the
others.

The coordinator judges messages one at a time, in arrival order, on one thread (that is what
lets it acknowledge an update only once its verdict is durable, docs/protocol.md 10.6). So a
device that publishes expensive messages fast - a 4 MiB payload of a million empty maps
costs tens of milliseconds to refuse - would otherwise make every other device's update
wait behind its backlog.

``Admission`` keeps one token bucket per device whose currency is the time the coordinator
spent on that device's messages (the service charges the CPU time of its network thread): a
bucket holds at most ``burst`` seconds and refills at ``share`` seconds per second (the
fraction of the thread one device may use, sustained). A message is admitted while its
device's bucket is above zero, *before* anything of it is decoded; once handled, its measured
cost is taken from the bucket, which may go below zero (the cost of a message is only known
afterwards). A device whose bucket is empty is refused until it has refilled above zero:
``retry_after`` says when. Charging measured time rather than counting messages or bytes
prices each message at what it really cost the others, whatever its shape.

Pure: no clock, no threads; the caller passes ``now`` (monotonic seconds) and the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Admission", "AdmissionPolicy", "Decision"]

# a device's bucket is forgotten once it is full again (it would admit anyway); checked
# every this many calls, so memory stays bounded by the devices active recently
_PRUNE_EVERY = 1024


@dataclass(frozen=True)
class AdmissionPolicy:
    """``share``: the fraction of the coordinator's message-handling time one device may use
    sustained (0 switches admission off); ``burst``: the seconds of handling time a device
    that has been quiet may use at once."""

    share: float = 0.02
    burst: float = 0.25

    def __post_init__(self) -> None:
        if not (isinstance(self.share, int | float) and math.isfinite(self.share)
                and 0 <= self.share <= 1):
            raise ValueError(f"device share must be between 0 and 1, got {self.share!r}")
        if not (isinstance(self.burst, int | float) and math.isfinite(self.burst)
                and self.burst > 0):
            raise ValueError(f"device burst must be finite and > 0 seconds, got {self.burst!r}")

    @property
    def enabled(self) -> bool:
        return self.share > 0


@dataclass(frozen=True)
class Decision:
    """``admitted``, or refused until ``retry_after`` seconds from now have passed."""

    admitted: bool
    retry_after: float = 0.0


_ADMIT = Decision(True)


@dataclass
class _Bucket:
    level: float  # seconds of handling time the device may still use (may be < 0)
    at: float  # when level was last brought up to date


class Admission:
    """The buckets of every device that used any of the coordinator's time lately."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self._buckets: dict[str, _Bucket] = {}
        self._calls = 0

    def _level(self, device: str, now: float) -> _Bucket | None:
        """The device's bucket refilled up to ``now`` (None: full, not tracked)."""
        bucket = self._buckets.get(device)
        if bucket is None:
            return None
        elapsed = max(0.0, now - bucket.at)
        bucket.level = min(self.policy.burst, bucket.level + elapsed * self.policy.share)
        bucket.at = max(bucket.at, now)
        return bucket

    def admit(self, device: str, now: float) -> Decision:
        """May ``device``'s next message be handled now? Refused while its bucket is at or
        below zero, with the seconds until it is above zero again."""
        if not self.policy.enabled:
            return _ADMIT
        bucket = self._level(device, now)
        if bucket is None or bucket.level > 0:
            return _ADMIT
        # whole milliseconds, one more than the level needs to reach zero: above zero then
        wait = math.ceil(-bucket.level / self.policy.share * 1000.0 + 1.0) / 1000.0
        return Decision(False, wait)

    def charge(self, device: str, seconds: float, now: float) -> None:
        """Take ``seconds`` (what handling the device's admitted message cost) from its
        bucket."""
        if not self.policy.enabled:
            return
        bucket = self._level(device, now)
        if bucket is None:
            bucket = self._buckets[device] = _Bucket(self.policy.burst, now)
        bucket.level -= max(0.0, seconds)
        self._calls += 1
        if self._calls % _PRUNE_EVERY == 0:
            self._prune(now)

    def _prune(self, now: float) -> None:
        for device in list(self._buckets):
            bucket = self._level(device, now)
            if bucket is not None and bucket.level >= self.policy.burst:
                del self._buckets[device]

    def level(self, device: str, now: float) -> float:
        """Seconds of handling time ``device`` may use now (``burst`` when untracked)."""
        bucket = self._level(device, now)
        return self.policy.burst if bucket is None else bucket.level

    @property
    def tracked(self) -> int:
        """Devices with a bucket that is not full (memory held)."""
        return len(self._buckets)
