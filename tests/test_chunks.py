"""fedbus.chunks: splitting and reassembling chunked messages (protocol revision 2.6).

Expected values are worked out by hand: a 10-byte payload in chunks of at most 3 bytes is
4 chunks, bytes [i*10//4, (i+1)*10//4): "ab", "cde", "fg", "hij".
"""

from __future__ import annotations

import hashlib
import itertools

import msgpack
import pytest

from fedbus.chunks import (
    CHUNK_HEADER_BOUND,
    HELD_PER_CHUNK,
    Chunk,
    ChunkLimits,
    Reassembler,
    chunk_bounds,
    chunk_data_size,
    is_chunk,
    peek_chunk_id,
    read_chunk,
    split,
)
from fedbus.errors import ProtocolError
from fedbus.transport import publish_packet_size

PAYLOAD = b"abcdefghij"
DIGEST = hashlib.sha256(PAYLOAD).digest()
BIG = ChunkLimits(max_message_bytes=1000, max_sender_bytes=10_000, max_total_bytes=100_000,
                  timeout=60.0)


def chunks_of(payload: bytes = PAYLOAD, size: int = 3, mid: str = "m1") -> list[Chunk]:
    return [read_chunk(c, 1000) for c in split(payload, size, mid)]


def raw(**fields: object) -> bytes:
    base: dict[str, object] = {"v": 2, "kind": "chunk", "id": "m1", "i": 0, "n": 4,
                               "size": 10, "sha256": DIGEST, "data": b"ab"}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not None}, use_bin_type=True)


# -- split and the wire ----------------------------------------------------------------------


def test_split_balances_the_chunks_by_hand() -> None:
    chunks = chunks_of()
    assert [bytes(c.data) for c in chunks] == [b"ab", b"cde", b"fg", b"hij"]
    assert [(c.index, c.count, c.size) for c in chunks] == [(0, 4, 10), (1, 4, 10),
                                                            (2, 4, 10), (3, 4, 10)]
    assert all(c.digest == DIGEST and c.id == "m1" for c in chunks)
    assert chunk_bounds(3, 4, 10) == (7, 10)


def test_split_exact_bytes_of_one_chunk() -> None:
    first = split(PAYLOAD, 3, "m1")[0]
    # fixmap of 8, then v, kind, id, i, n, size, sha256, data, in this order (data last)
    expected = (b"\x88\xa1v\x02\xa4kind\xa5chunk\xa2id\xa2m1\xa1i\x00\xa1n\x04\xa4size\x0a"
                b"\xa6sha256\xc4\x20" + DIGEST + b"\xa4data\xc4\x02ab")
    assert first == expected
    assert is_chunk(first) and peek_chunk_id(first) == "m1"
    assert not is_chunk(msgpack.packb({"v": 2, "kind": "update", "update_id": "x"}))
    assert not is_chunk(b"\xc1 not msgpack") and not is_chunk(b"")
    # kind later than the Python senders write it: read off the first 4,096 bytes instead
    assert is_chunk(msgpack.packb({"id": "m1", "kind": "chunk"}))
    assert not is_chunk(msgpack.packb({"pad": "x" * 5000, "kind": "chunk"}))


def test_split_refuses_what_cannot_be_chunked() -> None:
    with pytest.raises(ValueError, match="empty"):
        split(b"", 3, "m1")
    with pytest.raises(ValueError, match="invalid chunk id"):
        split(PAYLOAD, 3, "a/b")
    with pytest.raises(ValueError, match="more than 65535"):
        split(b"x" * 65_536, 1, "m1")


def test_chunk_data_size_fills_the_packet_exactly_or_less() -> None:
    topic = "fedbus/model/chunk/65534"
    limit = 262_144
    data = chunk_data_size(limit, topic)
    assert data == limit - (publish_packet_size(topic, limit) - limit) - CHUNK_HEADER_BOUND
    # the largest header: an id of 64 characters, i and n near 65535, size near 2^40
    worst = Chunk("x" * 64, 65_534, 65_535, 2**40, DIGEST, b"\0" * data).pack()
    assert publish_packet_size(topic, len(worst)) <= limit
    with pytest.raises(ValueError, match="no room"):
        chunk_data_size(100, topic)


@pytest.mark.parametrize(("fields", "reason", "match"), [
    ({"n": 0}, "schema", "'n' = 0"),
    ({"n": 65_536}, "schema", "'n' = 65536"),
    ({"n": 10**12}, "schema", "outside"),
    ({"i": 4}, "schema", "'i' = 4"),
    ({"i": -1}, "schema", "'i' = -1"),
    ({"size": 3}, "schema", "'size' = 3"),
    ({"size": 2**41}, "schema", "'size'"),
    ({"sha256": b"short"}, "schema", "sha256"),
    ({"data": b"abc"}, "schema", "must hold 2 bytes, holds 3"),
    ({"data": "ab"}, "schema", "'data'"),
    ({"id": "a b"}, "schema", "'id'"),
    ({"i": True}, "schema", "'i'"),
    ({"kind": "update"}, "schema", "kind"),
    ({"v": 3}, "schema", "version"),
    ({"n": None}, "schema", "'n' missing"),
])
def test_read_chunk_refuses_hostile_headers(fields: dict, reason: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        read_chunk(raw(**fields), 1000)
    assert info.value.reason == reason


def test_read_chunk_limits_and_malformed() -> None:
    with pytest.raises(ProtocolError) as info:
        read_chunk(raw(), 50)
    assert info.value.reason == "too_large"
    with pytest.raises(ProtocolError) as info:
        read_chunk(raw()[:-1], 1000)
    assert info.value.reason == "malformed"
    assert bytes(read_chunk(raw(), 1000).data) == b"ab"


# -- reassembly --------------------------------------------------------------------------------


def test_any_order_reassembles_the_payload() -> None:
    for order in itertools.permutations(range(4)):
        r = Reassembler(BIG)
        chunks = chunks_of()
        outcomes = [r.add("dev", chunks[i], 0.0) for i in order]
        assert [o.status for o in outcomes] == ["stored"] * 3 + ["complete"]
        assert outcomes[-1].payload == PAYLOAD
        assert r.total_held == 0 and r.partials() == []


def test_duplicates_are_idempotent_and_charged_once() -> None:
    r = Reassembler(BIG)
    c = chunks_of()
    assert r.add("dev", c[1], 0.0).status == "stored"
    assert r.add("dev", c[1], 1.0).status == "duplicate"
    assert r.held("dev") == 3 + HELD_PER_CHUNK  # "cde" once
    for chunk in (c[0], c[3]):
        r.add("dev", chunk, 2.0)
    assert r.add("dev", c[2], 3.0).payload == PAYLOAD
    # a copy arriving after completion starts a new partial (a re-send is judged again)
    assert r.add("dev", c[0], 4.0).status == "stored"


def test_conflicting_duplicate_is_rejected_and_the_partial_kept() -> None:
    r = Reassembler(BIG)
    c = chunks_of()
    r.add("dev", c[0], 0.0)
    other = Chunk("m1", 0, 4, 10, DIGEST, b"XY")
    out = r.add("dev", other, 1.0)
    assert (out.status, out.reason) == ("rejected", "conflict")
    assert "other bytes" in out.detail
    for chunk in c[1:]:
        out = r.add("dev", chunk, 2.0)
    assert out.payload == PAYLOAD


def test_same_id_other_message_is_a_conflict() -> None:
    r = Reassembler(BIG)
    r.add("dev", chunks_of()[0], 0.0)
    other = chunks_of(b"0123456789")[1]  # same id m1, same size, other digest
    out = r.add("dev", other, 1.0)
    assert (out.status, out.reason) == ("rejected", "conflict")
    assert r.partials() == [("dev", "m1")]


def test_inconsistent_count_restarts_the_partial() -> None:
    """The same message sent again in another number of chunks (the broker's limit
    changed): the old partition is given up, the new one completes."""
    r = Reassembler(BIG)
    r.add("dev", chunks_of(size=3)[0], 0.0)
    halves = chunks_of(size=5)  # 2 chunks: "abcde", "fghij"
    out = r.add("dev", halves[0], 1.0)
    assert out.status == "stored"
    assert [(d.reason, d.received, d.count) for d in out.dropped] == [("resent", 1, 4)]
    assert r.held("dev") == 5 + HELD_PER_CHUNK
    assert r.add("dev", halves[1], 2.0).payload == PAYLOAD


def test_senders_do_not_mix() -> None:
    r = Reassembler(BIG)
    c = chunks_of()
    for chunk in c[:3]:
        r.add("a", chunk, 0.0)
    assert r.add("b", c[3], 0.0).status == "stored"  # b's own partial of id m1
    assert r.add("a", c[3], 0.0).payload == PAYLOAD
    assert r.partials() == [("b", "m1")]


def test_digest_mismatch_is_rejected_and_dropped() -> None:
    r = Reassembler(BIG)
    wrong = hashlib.sha256(b"something else").digest()
    parts = [Chunk("m1", i, 4, 10, wrong, PAYLOAD[s:e])
             for i, (s, e) in enumerate(chunk_bounds(i, 4, 10) for i in range(4))]
    outs = [r.add("dev", p, 0.0) for p in parts]
    assert (outs[-1].status, outs[-1].reason) == ("rejected", "digest")
    assert outs[-1].dropped[0].reason == "digest"
    assert r.total_held == 0


def test_missing_chunk_times_out_with_a_reason() -> None:
    r = Reassembler(BIG)
    c = chunks_of()
    r.add("dev", c[0], 0.0)
    r.add("dev", c[2], 30.0)  # activity: the clock restarts
    assert r.expire(89.0) == []
    (gone,) = r.expire(90.0)
    assert (gone.sender, gone.id, gone.reason, gone.received, gone.count) == (
        "dev", "m1", "timeout", 2, 4)
    assert gone.detail == "2 of 4 chunks missing after 60 s without a new one"
    assert gone.held == 2 + 2 + 2 * HELD_PER_CHUNK
    assert r.total_held == 0 and r.held("dev") == 0


def test_message_size_cap() -> None:
    r = Reassembler(ChunkLimits(9, 10_000, 10_000))
    out = r.add("dev", chunks_of()[0], 0.0)
    assert (out.status, out.reason) == ("rejected", "too_large")
    assert r.partials() == []


def test_sender_cap_rejects_and_frees_the_partial() -> None:
    # "ab" costs 2 + 128, "cde" 3 + 128: a cap of 260 holds the first, not both
    r = Reassembler(ChunkLimits(1000, 2 + 3 + 2 * HELD_PER_CHUNK - 1, 100_000))
    c = chunks_of()
    assert r.add("dev", c[0], 0.0).status == "stored"
    out = r.add("dev", c[1], 0.0)
    assert (out.status, out.reason) == ("rejected", "over_sender_cap")
    assert [d.reason for d in out.dropped] == ["over_sender_cap"]
    assert r.held("dev") == 0
    assert r.add("other", c[0], 0.0).status == "stored"  # other senders are not affected


def test_total_cap_across_senders() -> None:
    r = Reassembler(ChunkLimits(1000, 10_000, 2 * (2 + HELD_PER_CHUNK)))
    c = chunks_of()
    assert r.add("a", c[0], 0.0).status == "stored"
    assert r.add("b", c[0], 0.0).status == "stored"
    out = r.add("c", c[0], 0.0)
    assert (out.status, out.reason, out.dropped) == ("rejected", "over_total_cap", ())
    assert r.total_held == 2 * (2 + HELD_PER_CHUNK)


def test_drop_sender() -> None:
    r = Reassembler(BIG)
    r.add("model", chunks_of(mid="old")[0], 0.0)
    r.add("model", chunks_of(mid="new")[0], 0.0)
    gone = r.drop_sender("model", "superseded", "a newer model arrived")
    assert sorted(d.id for d in gone) == ["new", "old"]
    assert r.total_held == 0


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="timeout"):
        ChunkLimits(1, 1, 1, timeout=0)
    with pytest.raises(ValueError, match="max_sender_bytes"):
        ChunkLimits(1, 0, 1)


def test_publish_group_is_one_publish_of_several() -> None:
    from fedbus.transport import PublishGroup, PublishResult

    a, b = PublishResult("t", 10), PublishResult("t", 5)
    group = PublishGroup("t", [a, b])
    assert group.size == 15 and not group.done and group.reason is None
    a._resolve(True, "Success", 0)
    assert not group.done and not group.wait(0.01)
    b._resolve(False, "Not authorized", 0x87)  # one refused chunk refuses the message
    assert group.done and not group.ok
    assert (group.reason, group.reason_code) == ("Not authorized", 0x87)
    c, d = PublishResult("t", 1), PublishResult("t", 1)
    for r in (c, d):
        r._resolve(True, "Success", 0)
    assert PublishGroup("t", [c, d]).wait(0.01)
