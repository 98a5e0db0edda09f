"""Codec specs: the one-line string that names how updates (or the model) are encoded.

Grammar (the task's ``codec`` field and the coordinator's ``--codec``/``--model-codec``)::

    spec     := base ["+zstd"] | sparse
    base     := "fp32" | "fp16" | "int8" | "int4" | "topk:" FRACTION [":" VALUES]
    VALUES   := "fp32" | "fp16" | "int8" | "int4"          (default int8)
    sparse   := "sparse:" FRACTION [":" SVALUES]           (revision 2.7)
    SVALUES  := "sign" | "int4" | "int8"                   (default sign)
    FRACTION := a decimal number in (0, 1], e.g. 0.1, 0.05, 1e-3

Examples: ``int8``, ``int4+zstd``, ``topk:0.01:int8+zstd``, ``sparse:0.007:sign``,
``sparse:0.01:int4``. ``sparse`` (``fedbus.sparse_delta``) is already entropy-coded and
takes no ``+zstd``. Specs are case-sensitive and contain no spaces. ``str(spec)`` is the
canonical form (the values codec always written, the fraction as Python's shortest float
repr), and ``parse_codec(str(spec)) == spec``;
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
    "SPARSE_VALUE_CODECS",
    "VALUE_CODECS",
    "CodecSpec",
    "parse_codec",
]

VALUE_CODECS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
SPARSE_VALUE_CODECS: tuple[str, ...] = ("sign", "int4", "int8")
BASE_CODECS: tuple[str, ...] = (*VALUE_CODECS, "topk", "sparse")
COMPRESSIONS: tuple[str, ...] = ("zstd",)
MAX_SPEC_LEN = 64

_FRACTION = re.compile(r"^(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec spec; build one with ``parse_codec``.

    ``base`` is one of ``BASE_CODECS``; for ``topk`` and ``sparse``, ``fraction`` is the
    share of entries kept and ``values`` the codec of the kept values (both None otherwise);
    ``zstd`` says whether the encoded map is zstd-compressed as a whole.
    """

    base: str
    fraction: float | None = None
    values: str | None = None
    zstd: bool = False

    def __post_init__(self) -> None:
        if self.base not in BASE_CODECS:
            raise ValueError(f"unknown codec {self.base!r}; known: {', '.join(BASE_CODECS)}")
        if self.base in ("topk", "sparse"):
            f = self.fraction
            if not (isinstance(f, float) and math.isfinite(f) and 0.0 < f <= 1.0):
                raise ValueError(f"{self.base} fraction must be a number in (0, 1], got {f!r}")
            allowed = VALUE_CODECS if self.base == "topk" else SPARSE_VALUE_CODECS
            if self.values not in allowed:
                raise ValueError(
                    f"{self.base} values codec must be one of {', '.join(allowed)}, "
                    f"got {self.values!r}"
                )
            if self.base == "sparse" and self.zstd:
                raise ValueError("sparse is entropy-coded already: it takes no +zstd")
        elif self.fraction is not None or self.values is not None:
            raise ValueError(
                f"only topk and sparse take a fraction and a values codec, not {self.base}"
            )

    def __str__(self) -> str:
        text = self.base
        if self.base in ("topk", "sparse"):
            text = f"{self.base}:{self.fraction!r}:{self.values}"
        return text + ("+zstd" if self.zstd else "")

    @property
    def compression(self) -> str | None:
        """What says how a delta of this spec travels: ``"zstd"``, ``"sparse"`` or None."""
        return "sparse" if self.base == "sparse" else "zstd" if self.zstd else None

    @property
    def lossy(self) -> bool:
        """True unless every value survives exactly or as float16 (fp32, fp16)."""
        return self.base not in ("fp32", "fp16")

    @property
    def is_topk(self) -> bool:
        return self.base == "topk"

    @property
    def error_feedback(self) -> bool:
        """Whether the agent keeps what this codec leaves out for its next update (top-k
        and sparse: ``edge_agent.residual``)."""
        return self.base in ("topk", "sparse")


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
    base = parts[0]
    if base not in ("topk", "sparse"):
        if len(parts) != 1 or base not in VALUE_CODECS:
            raise ValueError(
                f"bad codec spec {spec!r}: expected fp32, fp16, int8, int4, "
                "topk:FRACTION[:VALUES] (optionally followed by +zstd) or "
                "sparse:FRACTION[:sign|int4|int8]"
            )
        return CodecSpec(base, zstd=zstd)
    if len(parts) not in (2, 3):
        raise ValueError(f"bad codec spec {spec!r}: expected {base}:FRACTION[:VALUES]")
    if not _FRACTION.match(parts[1]):
        raise ValueError(
            f"bad codec spec {spec!r}: {base} fraction {parts[1]!r} is not a number"
        )
    fraction = float(parts[1])
    values = parts[2] if len(parts) == 3 else ("int8" if base == "topk" else "sign")
    try:
        return CodecSpec(base, fraction, values, zstd)
    except ValueError as exc:
        raise ValueError(f"bad codec spec {spec!r}: {exc}") from None
