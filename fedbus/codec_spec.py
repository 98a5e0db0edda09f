"""Codec specs: the one-line string that names how updates (or the model) are encoded.

Grammar (the task's ``codec`` field and the coordinator's ``--codec``/``--model-codec``)::

    spec     := base ["+zstd"]
    base     := "fp32" | "fp16" | "int8" | "int4" | "topk:" FRACTION [":" VALUES]
    VALUES   := "fp32" | "fp16" | "int8" | "int4"          (default int8)
    FRACTION := a decimal number in (0, 1], e.g. 0.1, 0.05, 1e-3

Examples: ``int8``, ``int4+zstd``, ``topk:0.01:int8+zstd``. Specs are case-sensitive and
contain no spaces. ``str(spec)`` is the canonical form (the values codec always written,
the fraction as Python's shortest float repr), and ``parse_codec(str(spec)) == spec``;
a spec written canonically (``topk:0.1:int8``) comes back unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "BASE_CODECS",
    "COMPRESSIONS",
    "MAX_SPEC_LEN",
    "VALUE_CODECS",
    "CodecSpec",
    "parse_codec",
]

VALUE_CODECS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
BASE_CODECS: tuple[str, ...] = (*VALUE_CODECS, "topk")
COMPRESSIONS: tuple[str, ...] = ("zstd",)
MAX_SPEC_LEN = 64

_FRACTION = re.compile(r"^(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec spec; build one with ``parse_codec``.

    ``base`` is one of ``BASE_CODECS``; for ``topk``, ``fraction`` is the share of entries
    kept and ``values`` the codec of the kept values (both None otherwise); ``zstd`` says
    whether the encoded map is zstd-compressed as a whole.
    """

    base: str
    fraction: float | None = None
    values: str | None = None
    zstd: bool = False

    def __post_init__(self) -> None:
        if self.base not in BASE_CODECS:
            raise ValueError(f"unknown codec {self.base!r}; known: {', '.join(BASE_CODECS)}")
        if self.base == "topk":
            f = self.fraction
            if not (isinstance(f, float) and math.isfinite(f) and 0.0 < f <= 1.0):
                raise ValueError(f"topk fraction must be a number in (0, 1], got {f!r}")
            if self.values not in VALUE_CODECS:
                raise ValueError(
                    f"topk values codec must be one of {', '.join(VALUE_CODECS)}, "
                    f"got {self.values!r}"
                )
        elif self.fraction is not None or self.values is not None:
            raise ValueError(f"only topk takes a fraction and a values codec, not {self.base}")

    def __str__(self) -> str:
        text = self.base
        if self.base == "topk":
            text = f"topk:{self.fraction!r}:{self.values}"
        return text + ("+zstd" if self.zstd else "")

    @property
    def compression(self) -> str | None:
        """The wire ``compression`` field this spec produces: ``"zstd"`` or None."""
        return "zstd" if self.zstd else None

    @property
    def lossy(self) -> bool:
        """True unless every value survives exactly or as float16 (fp32, fp16)."""
        return self.base not in ("fp32", "fp16")

    @property
    def is_topk(self) -> bool:
        return self.base == "topk"


def parse_codec(spec: str) -> CodecSpec:
    """Parse a codec spec (module doc for the grammar); ``ValueError`` with one line if bad."""
    if not isinstance(spec, str):
        raise ValueError(f"codec spec must be a string, got {type(spec).__name__}")
    if not spec or len(spec) > MAX_SPEC_LEN:
        raise ValueError(f"codec spec must be 1-{MAX_SPEC_LEN} characters, got {len(spec)}")
    body, zstd = spec, False
    if body.endswith("+zstd"):
        body, zstd = body[: -len("+zstd")], True
    if "+" in body:
        raise ValueError(f"bad codec spec {spec!r}: the only suffix is +zstd")
    parts = body.split(":")
    if parts[0] != "topk":
        if len(parts) != 1 or parts[0] not in VALUE_CODECS:
            raise ValueError(
                f"bad codec spec {spec!r}: expected fp32, fp16, int8, int4 or "
                "topk:FRACTION[:VALUES], optionally followed by +zstd"
            )
        return CodecSpec(parts[0], zstd=zstd)
    if len(parts) not in (2, 3):
        raise ValueError(f"bad codec spec {spec!r}: expected topk:FRACTION[:VALUES]")
    if not _FRACTION.match(parts[1]):
        raise ValueError(f"bad codec spec {spec!r}: topk fraction {parts[1]!r} is not a number")
    fraction = float(parts[1])
    values = parts[2] if len(parts) == 3 else "int8"
    try:
        return CodecSpec("topk", fraction, values, zstd)
    except ValueError as exc:
        raise ValueError(f"bad codec spec {spec!r}: {exc}") from None
