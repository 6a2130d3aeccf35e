"""Peer records (encoding, checks, signatures), the peer table and gossip exchange: all pure."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import msgpack
import pytest

from swarm.discovery.exchange import exchange
from swarm.errors import BadRequest, RecordRejected, SignatureInvalid
from swarm.identity import Identity
from swarm.peers import PeerTable, TableConfig, missing_ranges
from swarm.records import MAX_RECORD_BYTES, RECORD_TAG, PeerRecord, verify_record

NOW = 1_700_000_000.0  # unix seconds
MODEL = {"architecture": "llama", "shape": "L30-d576-ff1536-h9-kv3-v49152", "digest": "0123456789abcdef" * 2}
OTHER_MODEL = {**MODEL, "digest": "f" * 32}


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate()


def make(identity: Identity, *, now: float = NOW, ttl: float = 60.0, **fields: Any) -> PeerRecord:
    defaults: dict[str, Any] = {
        "addresses": ["http://10.0.0.1:31337"],
        "model": MODEL,
        "num_layers": 30,
        "span": (0, 10),
        "throughput": 25.0,
        "load": 0.25,
    }
    return PeerRecord.create(identity, now=now, ttl=ttl, **{**defaults, **fields})


# --- records: encoding ------------------------------------------------------------------


def test_record_round_trips_through_wire_dicts_and_msgpack(alice: Identity) -> None:
    record = make(alice, free_kv_bytes=1 << 30, addresses=["http://10.0.0.1:31337", "https://[::1]:8443"])
    wire = record.to_wire()
    assert isinstance(wire["public_key"], bytes) and isinstance(wire["signature"], bytes)
    assert PeerRecord.from_wire(wire) == record
    decoded = msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)
    again = PeerRecord.from_wire(decoded)
    assert again == record and hash(again) == hash(record)
    assert PeerRecord.from_bytes(record.to_bytes()) == record
    verify_record(again, NOW)


def test_bootstrap_only_record_has_no_model(alice: Identity) -> None:
    record = make(alice, model=None, num_layers=0, span=None, throughput=0.0, load=0.0)
    assert record.model_digest is None
    assert PeerRecord.from_bytes(record.to_bytes()) == record
    verify_record(record, NOW)


def test_signing_payload_is_tagged_and_independent_of_key_order(alice: Identity) -> None:
    record = make(alice)
    payload = record.signing_payload()
    assert payload.startswith(RECORD_TAG)
    assert record.signature not in payload
    wire = record.to_wire()
    keys = list(wire)
    random.Random(1).shuffle(keys)
    shuffled = {key: wire[key] for key in keys}
    shuffled["model"] = dict(reversed(list(wire["model"].items())))
    parsed = PeerRecord.from_wire(shuffled)
    assert parsed.signing_payload() == payload
    verify_record(parsed, NOW)


def test_integral_floats_may_arrive_as_ints(alice: Identity) -> None:
    record = make(alice, throughput=3.0, load=0.0, now=1_700_000_000.0)
    wire = {**record.to_wire(), "throughput": 3, "load": 0, "issued_at": 1_700_000_000}
    verify_record(PeerRecord.from_wire(wire), NOW)


def test_model_is_read_only(alice: Identity) -> None:
    model = dict(MODEL)
    record = make(alice, model=model)
    model["digest"] = "changed"
    assert record.model_digest == MODEL["digest"]
    with pytest.raises(TypeError):
        record.model["digest"] = "changed"  # type: ignore[index]


def test_repr_leaves_out_key_and_signature_bytes(alice: Identity) -> None:
    text = repr(make(alice))
    assert alice.peer_id in text and "signature" not in text and "public_key" not in text


# --- records: refusals ---------------------------------------------------------------------


def test_tampered_record_has_a_bad_signature(alice: Identity) -> None:
    record = make(alice)
    flipped = bytes([record.signature[0] ^ 1]) + record.signature[1:]
    with pytest.raises(SignatureInvalid):
        verify_record(replace(record, signature=flipped), NOW)
    for change in ({"span": (0, 30)}, {"load": 0.0}, {"addresses": ("http://6.6.6.6:1",)}, {"expires_at": NOW + 600}):
        with pytest.raises(SignatureInvalid):
            verify_record(replace(record, **change), NOW)


def test_unsigned_record_is_refused(alice: Identity) -> None:
    wire = make(alice).to_wire()
    del wire["signature"]
    with pytest.raises(SignatureInvalid, match="unsigned"):
        PeerRecord.from_wire(wire)
    for signature in (b"", bytes(63), None, "s" * 64):
        with pytest.raises(SignatureInvalid):
            PeerRecord.from_wire({**make(alice).to_wire(), "signature": signature})


def test_record_claiming_another_peers_id_is_refused(alice: Identity, bob: Identity) -> None:
    # Alice signs, with her own key, a record that claims Bob's id: the signature is good.
    claimed = replace(make(alice), peer_id=bob.peer_id)
    forged = replace(claimed, signature=alice.sign(claimed.signing_payload()))
    with pytest.raises(RecordRejected) as caught:
        verify_record(forged, NOW)
    assert caught.value.reason == "peer_id_mismatch"
    # Bob's key and id with Alice's signature: a bad signature.
    stolen = replace(make(alice), peer_id=bob.peer_id, public_key=bob.public_key_bytes)
    with pytest.raises(SignatureInvalid):
        verify_record(stolen, NOW)


def reason_of(record: PeerRecord, now: float, **limits: float) -> str:
    with pytest.raises(RecordRejected) as caught:
        verify_record(record, now, **limits)
    assert isinstance(caught.value, BadRequest) and caught.value.code == "record_rejected"
    return caught.value.reason


def test_expired_future_and_long_lived_records_are_refused(alice: Identity) -> None:
    record = make(alice, ttl=60.0)
    verify_record(record, NOW + 59.9)
    assert reason_of(record, NOW + 60.0) == "expired"
    assert reason_of(record, NOW + 3600.0) == "expired"
    verify_record(make(alice, now=NOW + 20.0), NOW)  # within the clock skew allowed
    assert reason_of(make(alice, now=NOW + 3600.0), NOW) == "future"
    assert reason_of(make(alice, now=NOW + 20.0), NOW, max_skew=10.0) == "future"
    assert reason_of(make(alice, ttl=3600.0), NOW) == "ttl_too_long"
    verify_record(make(alice, ttl=3600.0), NOW, max_ttl=3600.0)


def test_oversized_records_are_refused(alice: Identity) -> None:
    with pytest.raises(RecordRejected) as caught:
        make(alice, addresses=[f"http://10.0.0.{i}:1" for i in range(9)])
    assert caught.value.reason == "oversized"
    with pytest.raises(RecordRejected) as caught:
        make(alice, addresses=["http://" + "a" * 300 + ":1"])
    assert caught.value.reason == "oversized"
    with pytest.raises(RecordRejected) as caught:
        make(alice, model={**MODEL, "shape": "x" * 129})
    assert caught.value.reason == "oversized"
    padded = msgpack.packb({**make(alice).to_wire(), "padding": b"x" * MAX_RECORD_BYTES}, use_bin_type=True)
    with pytest.raises(RecordRejected) as caught:
        PeerRecord.from_bytes(padded)
    assert caught.value.reason == "oversized"


def test_largest_valid_record_fits_the_size_limit(alice: Identity) -> None:
    record = make(
        alice,
        addresses=["http://" + "h" * 230 + f".example:{port:05d}" for port in range(1, 9)],
        model={key: "m" * 128 for key in MODEL},
        free_kv_bytes=1 << 60,
    )
    assert len(record.to_bytes()) <= MAX_RECORD_BYTES
    verify_record(PeerRecord.from_bytes(record.to_bytes()), NOW)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"peer_id": 7}, "malformed"),
        ({"peer_id": "A" * 32}, "malformed"),
        ({"public_key": "k" * 32}, "malformed"),
        ({"public_key": bytes(31)}, "malformed"),
        ({"addresses": "http://10.0.0.1:1"}, "malformed"),
        ({"addresses": []}, "malformed"),
        ({"addresses": [7]}, "malformed"),
        ({"addresses": ["ftp://10.0.0.1:21"]}, "malformed"),
        ({"addresses": ["http://10.0.0.1"]}, "malformed"),  # no port
        ({"addresses": ["http://10.0.0.1:0"]}, "malformed"),
        ({"addresses": ["http://10.0.0.1:99999"]}, "malformed"),
        ({"addresses": ["http://10.0.0.1:80/path"]}, "malformed"),
        ({"addresses": ["http://user:pw@10.0.0.1:80"]}, "malformed"),
        ({"addresses": ["http://10.0.0.1:80?q=1"]}, "malformed"),
        ({"addresses": ["http://[::1:80"]}, "malformed"),
        ({"addresses": ["http://héllo:80"]}, "malformed"),
        ({"addresses": ["http://a b:80"]}, "malformed"),
        ({"model": "llama"}, "malformed"),
        ({"model": {"architecture": "llama", "shape": "s"}}, "malformed"),
        ({"model": {**MODEL, "extra": "x"}}, "malformed"),
        ({"model": {**MODEL, "digest": 7}}, "malformed"),
        ({"model": {**MODEL, "digest": ""}}, "malformed"),
        ({"model": None}, "malformed"),  # a span without a model
        ({"num_layers": True}, "malformed"),
        ({"num_layers": "30"}, "malformed"),
        ({"num_layers": 0}, "malformed"),
        ({"num_layers": 10**6}, "malformed"),
        ({"span": [5, 3]}, "bad_span"),
        ({"span": [5, 5]}, "bad_span"),
        ({"span": [-1, 3]}, "bad_span"),
        ({"span": [20, 31]}, "bad_span"),
        ({"span": [0]}, "bad_span"),
        ({"span": [0, 1.5]}, "bad_span"),
        ({"span": "0-10"}, "malformed"),
        ({"throughput": float("nan")}, "malformed"),
        ({"throughput": float("inf")}, "malformed"),
        ({"throughput": -1.0}, "malformed"),
        ({"throughput": "fast"}, "malformed"),
        ({"load": 1.5}, "malformed"),
        ({"load": None}, "malformed"),
        ({"free_kv_bytes": -1}, "malformed"),
        ({"free_kv_bytes": 1.5}, "malformed"),
        ({"protocol": 0}, "malformed"),
        ({"protocol": "1"}, "malformed"),
        ({"issued_at": "now"}, "malformed"),
        ({"issued_at": 10**400}, "malformed"),
        ({"issued_at": -5.0}, "malformed"),
        ({"expires_at": NOW - 1.0}, "malformed"),  # before issued_at
        ({"extra": 1}, "malformed"),
    ],
)
def test_from_wire_refuses_bad_fields_with_a_reason(alice: Identity, change: dict[str, Any], reason: str) -> None:
    wire = {**make(alice).to_wire(), **change}
    with pytest.raises(RecordRejected) as caught:
        PeerRecord.from_wire(wire)
    assert caught.value.reason == reason


@pytest.mark.parametrize("raw", [None, [], "record", b"record", 7, {}])
def test_from_wire_refuses_what_is_not_a_record(raw: object) -> None:
    with pytest.raises((RecordRejected, SignatureInvalid)):
        PeerRecord.from_wire(raw)


def test_from_wire_names_missing_keys(alice: Identity) -> None:
    wire = make(alice).to_wire()
    del wire["load"]
    with pytest.raises(RecordRejected, match="load"):
        PeerRecord.from_wire(wire)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\x01\x02", b"\x80\x80"])
def test_from_bytes_refuses_garbage(data: bytes) -> None:
    with pytest.raises(RecordRejected) as caught:
        PeerRecord.from_bytes(data)
    assert caught.value.reason == "malformed"


# --- the table --------------------------------------------------------------------------------


def test_table_keeps_the_newest_record_and_counts_replays(alice: Identity) -> None:
    table = PeerTable()
    old, new = make(alice, now=NOW), make(alice, now=NOW + 5.0, span=(0, 12))
    assert table.merge(old, NOW + 6.0, source="mdns")
    assert table.merge(new, NOW + 6.0)
    assert table.get(alice.peer_id) == new and len(table) == 1 and alice.peer_id in table
    assert not table.merge(old, NOW + 6.0)  # a replayed older record
    assert table.refused["stale"] == 1
    assert not table.merge(new, NOW + 6.0)  # the same record again: normal in gossip
    assert table.refused["stale"] == 1
    rival = make(alice, now=NOW + 5.0, span=(0, 20))  # same issued_at, other content
    assert not table.merge(rival, NOW + 6.0)
    assert table.refused["stale"] == 2
    assert table.get(alice.peer_id) == new


def test_table_refuses_bad_records_without_raising(alice: Identity, bob: Identity) -> None:
    table = PeerTable()
    record = make(alice)
    assert not table.merge(replace(record, signature=bytes(64)), NOW)
    assert not table.merge(make(bob, ttl=10.0), NOW + 11.0)
    assert not table.merge(make(bob, now=NOW + 3600.0), NOW)
    assert not table.merge(make(bob, ttl=3600.0), NOW)
    claimed = replace(make(alice), peer_id=bob.peer_id)
    assert not table.merge(replace(claimed, signature=alice.sign(claimed.signing_payload())), NOW)
    for raw in (None, {}, "x", {**record.to_wire(), "span": [9, 1]}, {**record.to_wire(), "load": 2.0}):
        assert not table.merge_wire(raw, NOW, source="announce")
    assert len(table) == 0
    assert table.refused == {
        "signature_invalid": 2,  # the zeroed signature and the unsigned {}
        "expired": 1,
        "future": 1,
        "ttl_too_long": 1,
        "peer_id_mismatch": 1,
        "malformed": 3,
        "bad_span": 1,
    }
    assert table.merge_wire(record.to_wire(), NOW, source="announce")
    assert table.get(alice.peer_id) == record


def test_table_limits_come_from_its_config(alice: Identity, bob: Identity) -> None:
    table = PeerTable(TableConfig(max_ttl_s=3600.0, max_peers=1))
    assert table.merge(make(alice, ttl=3600.0), NOW)
    assert not table.merge(make(bob), NOW)
    assert table.refused["table_full"] == 1
    assert table.merge(make(bob, now=NOW + 3601.0), NOW + 3601.0)  # the full table first drops what expired
    assert list(table.versions()) == [bob.peer_id]


def test_expiry_and_removal() -> None:
    table = PeerTable()
    short, long_ = Identity.generate(), Identity.generate()
    table.merge(make(short, ttl=10.0), NOW)
    table.merge(make(long_, ttl=100.0), NOW)
    assert {r.peer_id for r in table.records(NOW + 5.0)} == {short.peer_id, long_.peer_id}
    assert [r.peer_id for r in table.records(NOW + 10.0)] == [long_.peer_id]  # live only, before expire()
    assert len(table) == 2
    assert table.expire(NOW + 10.0) == [short.peer_id]
    assert len(table) == 1 and table.get(short.peer_id) is None
    assert table.remove(long_.peer_id) and not table.remove(long_.peer_id)
    assert len(table) == 0


def test_coverage_counts_live_peers_of_one_model() -> None:
    table = PeerTable()
    spans = {(0, 10): MODEL, (5, 20): MODEL, (8, 12): OTHER_MODEL}
    for span, model in spans.items():
        assert table.merge(make(Identity.generate(), span=span, model=model), NOW)
    assert table.merge(make(Identity.generate(), span=(25, 30), ttl=5.0), NOW)  # expires first
    assert table.merge(make(Identity.generate(), model=None, num_layers=0, span=None), NOW)  # bootstrap-only
    assert table.merge(make(Identity.generate(), model=MODEL, span=None), NOW)  # no blocks yet
    assert table.merge(make(Identity.generate(), num_layers=40, span=(20, 30)), NOW)  # disagrees on num_layers

    counts = table.coverage(MODEL["digest"], 30, NOW + 1.0)
    assert counts == [1] * 5 + [2] * 5 + [1] * 10 + [0] * 5 + [1] * 5
    assert missing_ranges(counts) == [(20, 25)]
    later = table.coverage(MODEL["digest"], 30, NOW + 10.0)
    assert missing_ranges(later) == [(20, 30)]
    assert table.coverage(OTHER_MODEL["digest"], 30, NOW) == [0] * 8 + [1] * 4 + [0] * 18
    assert table.coverage("unknown", 30, NOW) == [0] * 30


@pytest.mark.parametrize(
    ("counts", "ranges"),
    [
        ([], []),
        ([0, 0, 0], [(0, 3)]),
        ([1, 2, 1], []),
        ([1, 0, 0, 2, 0], [(1, 3), (4, 5)]),
        ([0, 1, 0], [(0, 1), (2, 3)]),
    ],
)
def test_missing_ranges(counts: list[int], ranges: list[tuple[int, int]]) -> None:
    assert missing_ranges(counts) == ranges


# --- gossip exchange ----------------------------------------------------------------------------


def test_exchange_is_push_pull_and_moves_only_news(alice: Identity, bob: Identity) -> None:
    a, b = PeerTable(), PeerTable()
    a.merge(make(alice), NOW)
    b.merge(make(bob), NOW)
    assert exchange(a, b, NOW) == (1, 1)
    assert {r.peer_id for r in a.records(NOW)} == {r.peer_id for r in b.records(NOW)} == {alice.peer_id, bob.peer_id}
    assert exchange(a, b, NOW) == (0, 0)

    refreshed = make(alice, now=NOW + 1.0, load=0.9)
    assert a.merge(refreshed, NOW + 1.0)
    assert exchange(b, a, NOW + 1.0) == (1, 0)
    assert b.get(alice.peer_id) == refreshed
    assert sum(a.refused.values()) == sum(b.refused.values()) == 0


def test_exchange_carries_no_expired_record(alice: Identity, bob: Identity) -> None:
    a, b = PeerTable(), PeerTable()
    a.merge(make(alice, ttl=10.0), NOW)
    a.merge(make(bob, ttl=100.0), NOW)
    assert exchange(a, b, NOW + 20.0) == (0, 1)
    assert b.get(alice.peer_id) is None


def test_gossip_from_one_bootstrap_peer_converges_in_few_rounds() -> None:
    """50 peers that know only the bootstrap peer (0) learn every record by push-pull."""
    rng = random.Random(7)
    peers = 50
    records = [make(Identity.generate(), addresses=[f"http://10.0.{i // 250}.{i % 250 + 1}:31337"]) for i in range(peers)]
    tables = [PeerTable() for _ in range(peers)]
    for table, record in zip(tables, records):
        assert table.merge(record, NOW, source="self")
        table.merge(records[0], NOW, source="bootstrap")  # peer 0 already holds its own
    index = {record.peer_id: i for i, record in enumerate(records)}
    for round_ in range(1, 11):
        for i in rng.sample(range(peers), peers):
            known = [peer_id for peer_id in tables[i].versions() if peer_id != records[i].peer_id]
            for peer_id in rng.sample(known, min(2, len(known))):
                exchange(tables[i], tables[index[peer_id]], NOW)
        if all(len(table) == peers for table in tables):
            break
    assert all(len(table) == peers for table in tables), f"not converged after {round_} rounds"
    assert round_ <= 4
    assert all(not table.refused for table in tables)


# --- proofs: pending and proven records, budgets, eviction (pure) -------------------------------

PROVING = TableConfig(require_proof=True, max_pending=4, source_budget=3, source_window_s=10.0, proof_backoff_s=30.0)


def fresh(address: str = "http://10.0.0.1:31337", now: float = NOW, **fields: Any) -> PeerRecord:
    return make(Identity.generate(), now=now, addresses=[address], **fields)


def test_a_new_peer_is_pending_until_proven_and_then_refreshes_freely(alice: Identity) -> None:
    table = PeerTable(PROVING)
    woken: list[int] = []
    table.on_pending = lambda: woken.append(1)
    first = make(alice, now=NOW)
    assert table.merge(first, NOW, origin="ip:1") and woken == [1]
    # pending: invisible to gossip, clients and routing
    assert alice.peer_id not in table and len(table) == 0 and table.records(NOW) == []
    assert table.newer_than({}, NOW) == [] and table.versions() == {} and table.coverage(MODEL["digest"], 30, NOW)[0] == 0
    assert table.pending() == [first] and not table.merge(first, NOW, origin="ip:1")  # the same record again: no news
    assert table.settle(alice.peer_id, first.addresses[0], True, NOW + 1)
    assert table.records(NOW + 1) == [first] and table.standing(alice.peer_id) == NOW + 1 and table.pending() == []
    # a refresh at the proven address needs no proof and costs no budget
    refresh = make(alice, now=NOW + 2)
    assert table.merge(refresh, NOW + 2, origin="ip:1") and table.get(alice.peer_id) == refresh
    # a new address is pending while the proven record stays listed
    moved = make(alice, now=NOW + 3, addresses=["http://10.0.0.2:1"])
    assert table.merge(moved, NOW + 3, origin="ip:1")
    assert table.get(alice.peer_id) == refresh and table.pending() == [moved]
    assert not table.settle(alice.peer_id, "http://10.0.0.1:31337", True, NOW + 4)  # a proof of another address admits nothing
    assert table.settle(alice.peer_id, "http://10.0.0.2:1", True, NOW + 4) and table.get(alice.peer_id) == moved
    assert table.standing(alice.peer_id) == NOW + 1  # standing survives a move


def test_own_record_and_tables_without_proofs_need_none(alice: Identity) -> None:
    table = PeerTable(PROVING)
    assert table.merge(make(alice), NOW, source="self") and alice.peer_id in table
    plain = PeerTable()
    assert plain.merge(fresh(), NOW) and len(plain) == 1 and plain.pending() == []


def test_a_failed_proof_drops_the_record_and_backs_off(alice: Identity) -> None:
    table = PeerTable(PROVING)
    record = make(alice)
    table.merge(record, NOW, origin="ip:1")
    assert not table.settle(alice.peer_id, record.addresses[0], False, NOW + 1)
    assert table.pending() == [] and alice.peer_id not in table and table.refused["proof_failed"] == 1
    assert not table.merge(make(alice, now=NOW + 2), NOW + 2, origin="ip:2") and table.refused["proof_failed"] == 2
    assert table.merge(make(alice, now=NOW + 40), NOW + 40, origin="ip:2")  # after the backoff it may try again
    assert table.merge(make(alice, now=NOW + 3, addresses=["http://10.0.0.9:1"]), NOW + 3, origin="ip:2") is False  # stale
    assert table.merge(make(alice, now=NOW + 41, addresses=["http://10.0.0.9:1"]), NOW + 41, origin="ip:2")  # another address


def test_each_source_has_a_budget_of_pending_records_per_window() -> None:
    table = PeerTable(replace(PROVING, max_pending=100))
    assert all(table.merge(fresh(), NOW, origin="ip:attacker") for _ in range(3))
    assert not table.merge(fresh(), NOW, origin="ip:attacker") and table.refused["source_budget"] == 1
    assert table.merge(fresh(), NOW, origin="ip:honest")  # other sources are not affected
    assert table.merge(fresh(now=NOW + 10), NOW + 10, origin="ip:attacker")  # a new window
    forged = replace(fresh(), signature=bytes(64))
    for _ in range(5):
        table.merge(forged, NOW + 10, origin="ip:forger")
    assert table.refused["signature_invalid"] == 3 and table.refused["source_budget"] == 3  # forgeries spend it too


def test_a_full_pending_set_evicts_from_the_source_holding_most() -> None:
    table = PeerTable(replace(PROVING, source_budget=100))
    flood = [fresh() for _ in range(4)]
    assert all(table.merge(record, NOW, origin="ip:attacker") for record in flood)
    assert not table.merge(fresh(), NOW, origin="ip:attacker") and table.refused["pending_full"] == 1
    newcomer = fresh()
    assert table.merge(newcomer, NOW, origin="ip:newcomer")
    assert newcomer in table.pending() and flood[0] not in table.pending() and table.refused["evicted_pending"] == 1


def test_proven_peers_are_never_pushed_out_by_pending_ones() -> None:
    table = PeerTable(replace(PROVING, max_peers=4, source_budget=100))
    proven = [fresh() for _ in range(2)]
    for record in proven:
        table.merge(record, NOW, origin="ip:a")
        table.settle(record.peer_id, record.addresses[0], True, NOW)
    waiting = [fresh(), fresh()]
    assert all(table.merge(record, NOW, origin="ip:b") for record in waiting)
    assert not table.merge(fresh(), NOW, origin="ip:b") and table.refused["table_full"] == 1
    assert table.merge(fresh(), NOW, origin="ip:c")  # evicts b's oldest pending record, never a proven one
    assert all(record.peer_id in table for record in proven) and waiting[0] not in table.pending()
    assert not table.merge(fresh(), NOW, origin="ip:d")  # b and c hold one each: no source holds more than its share
    for record in table.pending():
        table.settle(record.peer_id, record.addresses[0], True, NOW)
    assert len(table) == 4 and not table.merge(fresh(), NOW, origin="ip:d")  # full of proven peers: nothing to evict


def test_tombstones_of_unknown_peers_are_not_held_and_address_filter_applies(alice: Identity) -> None:
    table = PeerTable(PROVING)
    table.dialable = lambda url: "10.0.0.1" not in url
    assert not table.merge(make(alice, leaving=True), NOW, origin="ip:1") and table.versions() == {}
    assert not table.merge(make(alice), NOW, origin="ip:1") and table.refused["address_policy"] == 1
    record = make(alice, addresses=["http://10.0.0.2:1"])
    assert table.merge(record, NOW, origin="ip:1")
    assert not table.merge(make(alice, now=NOW + 1, addresses=["http://10.0.0.2:1"], leaving=True), NOW + 1, origin="ip:1")
    assert table.pending() == []  # its goodbye withdrew the pending record


def test_a_proven_peer_that_keeps_failing_exchanges_leaves(alice: Identity) -> None:
    table = PeerTable(PROVING)
    record = make(alice)
    table.merge(record, NOW, origin="ip:1")
    table.settle(alice.peer_id, record.addresses[0], True, NOW)
    assert not table.exchange_failed(alice.peer_id) and not table.exchange_failed(alice.peer_id)
    table.exchange_ok(alice.peer_id)  # a success resets the count
    assert not table.exchange_failed(alice.peer_id) and not table.exchange_failed(alice.peer_id)
    assert table.exchange_failed(alice.peer_id) and alice.peer_id not in table and table.standing(alice.peer_id) is None
    assert table.merge(make(alice, now=NOW + 1), NOW + 1, origin="ip:1") and table.pending()  # back only with a new proof


def test_table_config_checks_and_shows_its_limits() -> None:
    with pytest.raises(ValueError):
        TableConfig(source_budget=0)
    assert TableConfig().limits()["max_pending"] == 256 and TableConfig(require_proof=True).limits()["require_proof"]
