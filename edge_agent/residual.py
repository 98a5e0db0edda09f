"""Error feedback for top-k updates.

Top-k sends only the largest changes; on its own that biases the model towards whatever
is large in every single update. With error feedback the agent remembers what it did not
send — the dropped elements plus the quantisation error of the sent values — and adds it
to its next delta before compressing, so every change is sent eventually and the sum of
what the coordinator receives tracks the sum of the real deltas (``encode_with_feedback``).

The residual is kept in the agent's durable state (``edge_agent.state``), per run, and
saved in the same transaction that puts the update into the outbox. If the update is then
rejected or dropped, its content goes back into the residual, so a lost update's changes
are sent later instead of disappearing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from fedbus.codec_spec import CodecSpec
from fedbus.update_codec import decode_update_delta, encode_update_delta

__all__ = ["encode_with_feedback"]


def encode_with_feedback(
    delta: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    spec: CodecSpec,
    *,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, Any] | bytes, str | None, dict[str, np.ndarray]]:
    """Encode ``delta + residual`` with ``spec``: ``(wire_delta, compression, new_residual)``.

    ``new_residual`` is exactly what the coordinator will not see of ``delta + residual``
    (computed by decoding the wire form as the coordinator does).
    """
    corrected = {
        name: np.asarray(value, np.float32)
        + (residual[name] if residual is not None else np.float32(0))
        for name, value in delta.items()
    }
    wire, compression = encode_update_delta(corrected, spec, rng=rng)
    received = wire if compression is not None else msgpack.unpackb(msgpack.packb(wire))
    shapes = {name: value.shape for name, value in corrected.items()}
    sent = decode_update_delta(received, compression, expected_shapes=shapes)
    return wire, compression, {name: corrected[name] - sent[name] for name in corrected}
