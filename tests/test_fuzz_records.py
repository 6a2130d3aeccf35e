"""Property tests of peer records and the peer table (swarm/peers.py).

A record from outside either becomes a `PeerRecord` that says exactly what its key signed,
or is refused with a `SwarmError`; a changed record never verifies. The table, fed any mix
of valid, stale, forged, expired and tombstone records on a fake clock, keeps exactly the
newest verified record of each peer, within its size limit, and never raises.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any
from unittest import mock

import msgpack
import pytest
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from swarm.errors import RecordRejected, SignatureInvalid, SwarmError
from swarm.identity import Identity, is_peer_id, peer_id_from_public_key, verify
from swarm.peers import PeerTable, TableConfig
from swarm.records import (
    DEFAULT_MAX_SKEW_S,
    DEFAULT_MAX_TTL_S,
    MAX_RECORD_BYTES,
    RECORD_TAG,
    WIRE_KEYS,
    PeerRecord,
    is_base_url,
    verify_record,
)
from tests.strategies import FUZZ, IDENTITIES, SCALARS, fuzz, mutate_bytes, packable, record_fields

identities = st.sampled_from(IDENTITIES)


def create(identity: Identity, fields: dict[str, Any]) -> PeerRecord:
    return PeerRecord.create(identity, **fields)


def outcome(parse: Any) -> PeerRecord | None:
    """`parse()` if it gives a record, None if it refuses with a SwarmError; anything else fails the test."""
    try:
        record = parse()
    except SwarmError:
        return None
    assert isinstance(record, PeerRecord)
    return record


def same_statement(a: PeerRecord, b: PeerRecord) -> bool:
    """Whether two records say the same thing under the same signature: equal wire bytes, not just
    equal values (an int for a float is the same value). Not the signing payload: that would trust
    the code under test to cover every field."""
    return a.to_bytes() == b.to_bytes()


# --- parsing arbitrary input ---------------------------------------------------------------


@fuzz(300)
@given(st.binary(max_size=600))
def test_from_bytes_of_arbitrary_bytes_raises_only_swarm_errors(data: bytes) -> None:
    outcome(lambda: PeerRecord.from_bytes(data))


@FUZZ
@given(st.binary(max_size=64).map(lambda head: head + bytes(MAX_RECORD_BYTES + 1 - len(head))))
def test_oversized_bytes_are_refused_before_decoding(data: bytes) -> None:
    decoded = AssertionError("decoded an oversized record")
    with mock.patch.object(msgpack, "unpackb", side_effect=decoded), pytest.raises(RecordRejected) as refused:
        PeerRecord.from_bytes(data)
    assert refused.value.reason == "oversized"


def wire_like_maps() -> st.SearchStrategy[dict[str, Any]]:
    """Maps with the record's keys (or nearly), every value any msgpack value."""
    return st.builds(
        lambda values, drop, extra: {**{k: v for k, v in values.items() if k not in drop}, **extra},
        st.fixed_dictionaries({key: packable(2) for key in sorted(WIRE_KEYS)}),
        st.sets(st.sampled_from(sorted(WIRE_KEYS)), max_size=2),
        st.dictionaries(st.text(max_size=6), SCALARS, max_size=2),
    )


@fuzz(150)
@given(st.one_of(packable(10), wire_like_maps()))
def test_from_wire_of_arbitrary_maps_raises_only_swarm_errors(raw: Any) -> None:
    outcome(lambda: PeerRecord.from_wire(raw))


# --- valid records ---------------------------------------------------------------------------


@fuzz(80)
@given(identities, record_fields())
def test_valid_records_round_trip_and_verify(identity: Identity, fields: dict[str, Any]) -> None:
    record = create(identity, fields)
    assert record.to_bytes() and len(record.to_bytes()) <= MAX_RECORD_BYTES
    for again in (
        PeerRecord.from_wire(record.to_wire()),
        PeerRecord.from_wire(msgpack.unpackb(msgpack.packb(record.to_wire()), raw=False)),
        PeerRecord.from_bytes(record.to_bytes()),
    ):
        assert again == record and same_statement(again, record)
        verify_record(again, record.issued_at)
        verify_record(again, (record.issued_at + record.expires_at) / 2)


# --- changed records are refused -------------------------------------------------------------

# Replacement values per field: plausible ones (the kind a forger would try) and garbage.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "peer_id": st.sampled_from([i.peer_id for i in IDENTITIES]),
    "public_key": st.sampled_from([i.public_key_bytes for i in IDENTITIES]) | st.binary(min_size=32, max_size=32),
    "addresses": st.lists(st.sampled_from(["http://10.0.0.1:1", "https://evil:443", "http://127.0.0.1:8080/"]), min_size=1),
    "model": st.none() | st.fixed_dictionaries({k: st.sampled_from(["a", "llama", "x" * 32]) for k in ("architecture", "digest", "shape")}),
    "num_layers": st.integers(0, 5000),
    "span": st.none() | st.lists(st.integers(-2, 40), min_size=2, max_size=2),
    "throughput": st.floats(0, 2e9) | st.integers(0, 10**12),
    "load": st.floats(-1, 2) | st.integers(0, 2),
    "free_kv_bytes": st.none() | st.integers(-1, 2**61),
    "protocol": st.integers(0, 2**17),
    "issued_at": st.floats(-1, 5e9) | st.integers(0, 2**60),
    "expires_at": st.floats(-1, 5e9) | st.integers(0, 2**60),
    "leaving": st.booleans() | st.sampled_from([0, 1]),
    "signature": st.binary(min_size=64, max_size=64) | st.binary(max_size=70),
}


@st.composite
def changed_wires(draw: st.DrawFn) -> tuple[PeerRecord, dict[str, Any]]:
    """A valid record and its wire form with exactly one field replaced, deleted or added."""
    record = create(draw(identities), draw(record_fields()))
    wire = record.to_wire()
    key = draw(st.sampled_from(sorted(WIRE_KEYS)))
    change = draw(st.sampled_from(["plausible", "plausible", "garbage", "delete", "add"]))
    if change == "plausible":
        wire[key] = draw(PLAUSIBLE[key])
    elif change == "garbage":
        wire[key] = draw(packable(4))
    elif change == "delete":
        del wire[key]
    else:
        wire[draw(st.text(max_size=8).filter(lambda k: k not in WIRE_KEYS))] = draw(SCALARS)
    note(f"{change} {key}")
    return record, wire


@fuzz(150)
@given(changed_wires())
def test_a_record_with_any_field_changed_is_refused(case: tuple[PeerRecord, dict[str, Any]]) -> None:
    original, wire = case
    changed = outcome(lambda: PeerRecord.from_wire(wire))
    if changed is None or same_statement(changed, original):
        return  # refused while parsing, or the change did not change the signed bytes (an int for a float)
    with pytest.raises((SignatureInvalid, RecordRejected)):
        verify_record(changed, original.issued_at)


@st.composite
def changed_bytes(draw: st.DrawFn) -> tuple[PeerRecord, bytes]:
    record = create(draw(identities), draw(record_fields()))
    return record, mutate_bytes(record.to_bytes(), draw)


@fuzz(150)
@given(changed_bytes())
def test_a_record_with_any_byte_changed_is_refused(case: tuple[PeerRecord, bytes]) -> None:
    original, data = case
    changed = outcome(lambda: PeerRecord.from_bytes(data))
    if changed is None:
        return
    if same_statement(changed, original):
        return  # a different encoding of the very same record (e.g. a wider int header)
    with pytest.raises((SignatureInvalid, RecordRejected)):
        verify_record(changed, original.issued_at)


@fuzz(60)
@given(identities, identities, record_fields())
def test_a_record_re_signed_by_another_key_is_refused(signer: Identity, claimed: Identity, fields: dict[str, Any]) -> None:
    """A forger signs with its own key but claims another peer's id (or key): never accepted."""
    assume(signer.peer_id != claimed.peer_id)
    record = create(signer, fields)
    for forged in (replace(record, peer_id=claimed.peer_id), replace(record, public_key=claimed.public_key_bytes)):
        with pytest.raises((SignatureInvalid, RecordRejected)):
            verify_record(forged, record.issued_at)


# --- self-signed records: a key may sign anything, only valid fields count ---------------------

# Addresses labelled by hand from the rule "http(s)://host:port, nothing more".
GOOD_ADDRESSES = ["http://a:1", "https://[::1]:8443", "http://10.0.0.1:65535/", "http://node-1.example:80"]
BAD_ADDRESSES = [
    "", "x", "a:1", "http://a", "http://a:0", "http://a:-1", "http://a:65536", "http://:80", "ftp://a:1",
    "http://u@a:1", "http://u:p@a:1", "http://a:1/x", "http://a:1//", "http://a:1?q=1", "http://a:1#f",
    "http://a:1?", "http://a:1#", "http://a b:1", "http://a:1 ", "http://a:1\n", "http://\u00e9:1",
    "http://[::1:80", "http://" + "a" * 250 + ":1",
]  # fmt: skip
FLOAT_FIELDS = ("throughput", "load", "issued_at", "expires_at")


def canonical(wire: dict[str, Any]) -> dict[str, Any]:
    """`wire` as an honest signer encodes it: floats where floats are due (ints that are exact)."""
    return {
        key: float(value) if key in FLOAT_FIELDS and type(value) is int and abs(value) <= 2**53 else value
        for key, value in wire.items()
    }


def payload(wire: dict[str, Any]) -> bytes:
    """What the signature covers, from the record format's definition: tag, then every field but the signature, sorted."""
    unsigned = {key: value for key, value in canonical(wire).items() if key != "signature"}
    return RECORD_TAG + msgpack.packb(dict(sorted(unsigned.items())), use_bin_type=True)


def plain_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def finite_float(value: Any, low: float, high: float) -> bool:
    return type(value) is float and math.isfinite(value) and low <= value <= high


def fields_valid(wire: dict[str, Any], good_addresses: set[str]) -> bool:
    """Whether every field of a (canonical) wire record is within the record format's limits.

    Addresses are judged by label: `good_addresses` are the valid ones (GOOD_ADDRESSES and
    those `PeerRecord.create` took), every other one is invalid."""
    model, span, addresses = wire["model"], wire["span"], wire["addresses"]
    valid_model = model is None or (
        isinstance(model, dict)
        and set(model) == {"architecture", "digest", "shape"}
        and all(isinstance(v, str) and 1 <= len(v) <= 128 for v in model.values())
    )
    layers_ok = (wire["num_layers"] == 0 and type(wire["num_layers"]) is int and span is None) if model is None else plain_int(wire["num_layers"], 1, 4096)
    span_ok = span is None or (
        layers_ok
        and isinstance(span, list) and len(span) == 2 and all(type(b) is int for b in span) and 0 <= span[0] < span[1] <= wire["num_layers"]
    )
    return (
        is_peer_id(wire["peer_id"])
        and isinstance(wire["public_key"], bytes) and len(wire["public_key"]) == 32
        and isinstance(wire["signature"], bytes) and len(wire["signature"]) == 64
        and isinstance(addresses, list) and 1 <= len(addresses) <= 8 and all(isinstance(a, str) and a in good_addresses for a in addresses)
        and valid_model and layers_ok and span_ok
        and finite_float(wire["throughput"], 0.0, 1e9)
        and finite_float(wire["load"], 0.0, 1.0)
        and (wire["free_kv_bytes"] is None or plain_int(wire["free_kv_bytes"], 0, 2**60))
        and plain_int(wire["protocol"], 1, 0xFFFF)
        and finite_float(wire["issued_at"], 0.0, math.inf) and finite_float(wire["expires_at"], 0.0, math.inf)
        and wire["issued_at"] < wire["expires_at"]
        and type(wire["leaving"]) is bool
        and len(msgpack.packb(wire, use_bin_type=True)) <= MAX_RECORD_BYTES
    )  # fmt: skip


def usable_at(wire: dict[str, Any], now: float) -> bool:
    """Whether a record with valid fields may be used at `now`: its key's, signed, fresh, not too long-lived."""
    return (
        peer_id_from_public_key(wire["public_key"]) == wire["peer_id"]
        and wire["expires_at"] - wire["issued_at"] <= DEFAULT_MAX_TTL_S
        and wire["issued_at"] <= now + DEFAULT_MAX_SKEW_S
        and wire["expires_at"] > now
        and verify(wire["public_key"], wire["signature"], payload(wire))
    )


# Values a signer could put in each field: near the limits, past them, and of the wrong type.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    **PLAUSIBLE,
    "addresses": st.lists(st.sampled_from(GOOD_ADDRESSES + BAD_ADDRESSES), max_size=9)
    | st.builds(  # one bad address among good ones, so each is judged on its own
        lambda good, bad, at: [*good[:at], bad, *good[at:]],
        st.lists(st.sampled_from(GOOD_ADDRESSES), max_size=7),
        st.sampled_from(BAD_ADDRESSES),
        st.integers(0, 7),
    ),
    "model": st.none() | st.dictionaries(st.sampled_from(["architecture", "digest", "shape", "x"]), st.text(max_size=130) | SCALARS, max_size=4),
    "num_layers": st.integers(-1, 4097) | st.booleans(),
    "span": st.none()
    | st.lists(st.integers(-1, 31) | st.booleans() | st.floats(0, 30), min_size=0, max_size=3)
    | st.builds(lambda start, length: [start, start + length], st.integers(-1, 30), st.integers(-1, 2)),  # empty, reversed
    "throughput": st.sampled_from([-0.0, -1e-9, 1e9, 1e9 + 1, 2**53, 2**53 + 1, math.inf, math.nan]) | st.floats(-10, 2e9),
    "load": st.sampled_from([0, 1, 1.0, 1.0000001, -0.0, -1e-300, math.nan]) | st.floats(-1, 2),
    "free_kv_bytes": st.none() | st.sampled_from([0, -1, 2**60, 2**60 + 1, 2**64 - 1, True, 1.0]),
    "protocol": st.sampled_from([0, 1, 0xFFFF, 0x10000, True, 1.0, -1]),
    "issued_at": st.floats(-5.0, 5e9) | st.sampled_from([0, -1, 2**53 + 1, math.inf, math.nan, True]),
    "expires_at": st.floats(-5.0, 5e9) | st.sampled_from([0, -1, 2**53 + 1, math.inf, math.nan, True]),
    "leaving": st.booleans() | st.sampled_from([0, 1, None, "yes"]),
}  # fmt: skip


@st.composite
def self_signed(draw: st.DrawFn, key: str) -> tuple[dict[str, Any], float, set[str]]:
    """A valid record's wire form with `key` (and maybe one more field) set to any value, signed again by its own key."""
    identity = draw(identities)
    fields = draw(record_fields())
    if key in ("span", "num_layers") and "model" not in fields:  # without a model both must be empty anyway
        fields.update(model={"architecture": "a", "digest": "d", "shape": "s"}, num_layers=draw(st.integers(1, 40)))
    record = create(identity, fields)
    wire = record.to_wire()
    for changed in {key, draw(st.sampled_from(sorted(FIELD_VALUES)))} if draw(st.booleans()) else {key}:
        if changed != "signature":
            wire[changed] = draw(FIELD_VALUES[changed] | packable(3))
    wire["signature"] = identity.sign(payload(wire))
    now = draw(st.sampled_from([record.issued_at, record.expires_at]) | st.floats(record.issued_at - 100, record.expires_at + 100))
    return wire, now, {*GOOD_ADDRESSES, *record.addresses}


@pytest.mark.parametrize("key", sorted(FIELD_VALUES))
@fuzz(25)
@given(data=st.data())
def test_a_self_signed_record_counts_only_if_every_field_is_valid(key: str, data: st.DataObject) -> None:
    """The Sybil's record: signed by its own key, so only the field checks stand between it and the table."""
    case = data.draw(self_signed(key))
    wire, now, good_addresses = case
    record = outcome(lambda: PeerRecord.from_wire(wire))
    expected_valid = fields_valid(canonical(wire), good_addresses)
    assert (record is not None) == expected_valid
    if record is None:
        return
    assert record.to_wire() == canonical(wire)  # the record says what was signed, nothing else
    try:
        verify_record(record, now)
        usable = True
    except (SignatureInvalid, RecordRejected):
        usable = False
    assert usable == usable_at(canonical(wire), now)


def labelled_addresses() -> st.SearchStrategy[tuple[str, bool]]:
    """(address, valid): the hand-labelled ones, and hosts of every length around the limit."""
    return st.one_of(
        st.sampled_from([(a, True) for a in GOOD_ADDRESSES] + [(a, False) for a in BAD_ADDRESSES]),
        st.integers(1, 300).map(lambda n: (f"http://{'h' * n}:80", len(f"http://{'h' * n}:80") <= 256)),
    )


@FUZZ
@given(labelled_addresses())
def test_a_record_takes_exactly_the_valid_addresses(case: tuple[str, bool]) -> None:
    address, valid = case
    record = outcome(lambda: create(IDENTITIES[0], {"addresses": [address], "now": 1.0, "ttl": 60.0}))
    assert (record is not None) == valid


@FUZZ
@given(st.sampled_from([a for a in GOOD_ADDRESSES if not a.endswith("/")]), st.text("?#/@: \n\t%x", min_size=1, max_size=3))
def test_an_address_with_anything_after_the_port_but_a_slash_is_refused(address: str, suffix: str) -> None:
    assert is_base_url(address + suffix) == (suffix == "/")


@pytest.mark.parametrize("address", ["http://10.0.0.1:8000?", "http://10.0.0.1:8000#"])
def test_regression_an_address_with_an_empty_query_or_fragment_is_refused(address: str) -> None:
    """Found by the fuzzer: urlsplit gives an empty query for a bare '?', which passed `not query`.

    Clients append "/session" to an address: "http://host:port?/session" dials "/" instead."""
    assert not is_base_url(address)
    with pytest.raises(RecordRejected):
        create(IDENTITIES[0], {"addresses": [address], "now": 1.0, "ttl": 60.0})


# --- the peer table ----------------------------------------------------------------------------

MAX_PEERS = 2  # fewer than the identities, so "table_full" is reached
T0 = 1_700_000_000.0
config = TableConfig(max_peers=MAX_PEERS)


class PeerTableMachine(RuleBasedStateMachine):
    """A fake clock and a table; every rule offers the table a record, a wire dict or time.

    The model (`newest`, `leaving`) is what the table must hold: for each peer, the
    `issued_at` and tombstone flag of the newest record it took, until it expires or is
    removed. Every rule checks the table's answer against `usable_at`, the record rules
    written out independently of `verify_record`.
    """

    @initialize()
    def start(self) -> None:
        self.now = T0
        self.table = PeerTable(config)
        self.newest: dict[str, float] = {}  # peer id -> issued_at of the record held
        self.held: dict[str, PeerRecord] = {}  # peer id -> the record held (tombstones too)
        self.sent: list[PeerRecord] = []  # every record offered: replay material

    # -- what the table is offered

    def offer(self, record: PeerRecord, *, as_wire: bool = False) -> None:
        before = dict(self.table.versions())
        current = self.held.get(record.peer_id)
        valid = usable_at(record.to_wire(), self.now)  # the format's rules, not verify_record: that is under test too
        newer = current is None or record.issued_at > current.issued_at
        room = current is not None or len(self.newest) < MAX_PEERS or any(not r.is_live(self.now) for r in self.held.values())
        refused = dict(self.table.refused)
        taken = self.table.merge_wire(record.to_wire(), self.now) if as_wire else self.table.merge(record, self.now)
        self.sent.append(record)
        reasons = [reason for reason, count in self.table.refused.items() if count > refused.get(reason, 0)]
        event(f"merge: {'taken' if taken else 'refused ' + ','.join(reasons) if reasons else 'duplicate'}")
        if taken:
            assert valid, "took a record that does not verify"
            assert newer, "took a record no newer than the one held"
            self.absorb_expiry(before)
            self.held[record.peer_id] = record
            self.newest[record.peer_id] = record.issued_at
        else:
            assert not (valid and newer and room), "refused a valid, newer record with room for it"
            self.absorb_expiry(before)

    def absorb_expiry(self, before: dict[str, float]) -> None:
        """A full table expires old records to make room: follow it in the model."""
        for peer_id in set(before) - set(self.table.versions()):
            assert not self.held[peer_id].is_live(self.now), "dropped a live record"
            del self.held[peer_id], self.newest[peer_id]

    @rule(identity=identities, age=st.floats(-2 * DEFAULT_MAX_SKEW_S, 700), ttl=st.floats(1, 1.2 * DEFAULT_MAX_TTL_S),
          leaving=st.booleans(), as_wire=st.booleans())  # fmt: skip
    def valid(self, identity: Identity, age: float, ttl: float, leaving: bool, as_wire: bool) -> None:
        """A signed record, possibly in the future (skew), expired, too long-lived or a tombstone."""
        record = PeerRecord.create(
            identity, addresses=["http://10.0.0.1:31337"], now=self.now - age, ttl=ttl, leaving=leaving
        )
        self.offer(record, as_wire=as_wire)

    @rule(identity=identities, edge=st.sampled_from(["expires_now", "expired_just", "live_just", "skew_edge", "skew_over", "ttl_edge", "ttl_over"]),
          tiny=st.sampled_from([1e-3, 0.1, 1.0, 4.0]), leaving=st.booleans())  # fmt: skip
    def on_the_edge(self, identity: Identity, edge: str, tiny: float, leaving: bool) -> None:
        """Records at the exact limits of expiry, clock skew and lifetime, and just past them."""
        issued, ttl = {
            "expires_now": (self.now - 60.0, 60.0),
            "expired_just": (self.now - 60.0, 60.0 - tiny),
            "live_just": (self.now - 60.0, 60.0 + tiny),
            "skew_edge": (self.now + config.max_skew_s, 60.0),
            "skew_over": (self.now + config.max_skew_s + tiny, 60.0),
            "ttl_edge": (self.now - 1.0, config.max_ttl_s),
            "ttl_over": (self.now - 1.0, config.max_ttl_s + tiny),
        }[edge]
        record = PeerRecord.create(identity, addresses=["http://10.0.0.1:31337"], now=issued, ttl=ttl, leaving=leaving)
        self.offer(record)

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), as_wire=st.booleans())
    def replay(self, data: st.DataObject, as_wire: bool) -> None:
        """A record offered before, again: stale or a duplicate, unless it was never taken."""
        self.offer(data.draw(st.sampled_from(self.sent)), as_wire=as_wire)

    @rule(identity=identities, victim=identities, age=st.floats(0, 100), field=st.sampled_from(["peer_id", "public_key", "issued_at", "expires_at", "addresses", "leaving", "signature"]))  # fmt: skip
    def forged(self, identity: Identity, victim: Identity, age: float, field: str) -> None:
        """A record whose signed fields changed after signing (as a relay would), or claiming another's id."""
        record = PeerRecord.create(identity, addresses=["http://10.0.0.1:31337"], now=self.now - age, ttl=300.0)
        changes: dict[str, Any] = {
            "peer_id": victim.peer_id,
            "public_key": victim.public_key_bytes,
            "issued_at": record.issued_at + 1.0,
            "expires_at": record.expires_at + 60.0,
            "addresses": ("http://evil:1",),
            "leaving": not record.leaving,
            "signature": bytes(64),
        }
        forged = replace(record, **{field: changes[field]})
        assume(not same_statement(forged, record))
        self.offer(forged, as_wire=False)

    @rule(raw=st.one_of(packable(6), st.fixed_dictionaries({key: packable(3) for key in sorted(WIRE_KEYS)})))
    def garbage(self, raw: Any) -> None:
        before = self.table.versions()
        assert self.table.merge_wire(raw, self.now) is False
        assert self.table.versions() == before

    @rule(seconds=st.floats(0, 400))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def expire(self) -> None:
        gone = self.table.expire(self.now)
        for peer_id in gone:
            assert not self.held[peer_id].is_live(self.now)
            del self.held[peer_id], self.newest[peer_id]

    @rule(identity=identities)
    def remove(self, identity: Identity) -> None:
        held = self.held.pop(identity.peer_id, None)
        self.newest.pop(identity.peer_id, None)
        assert self.table.remove(identity.peer_id) == (held is not None and not held.leaving)

    # -- what must always hold

    @invariant()
    def holds_the_newest_record_of_each_peer(self) -> None:
        assert self.table.versions() == self.newest

    @invariant()
    def never_over_max_peers(self) -> None:
        assert len(self.table.versions()) <= MAX_PEERS

    @invariant()
    def len_counts_peers_that_have_not_left(self) -> None:
        present = {p for p, r in self.held.items() if not r.leaving}
        assert len(self.table) == len(present)
        for peer_id, record in self.held.items():
            assert (peer_id in self.table) == (not record.leaving)
            assert self.table.get(peer_id) == (None if record.leaving else record)
        assert [r.peer_id for r in self.table.records(self.now)] == sorted(
            p for p in present if self.held[p].is_live(self.now)
        )

    @invariant()
    def gossip_offers_live_records_and_tombstones(self) -> None:
        offered = self.table.newer_than({}, self.now)
        assert {r.peer_id for r in offered} == {p for p, r in self.held.items() if r.is_live(self.now)}
        assert all(self.held[r.peer_id] == r for r in offered)


PeerTableMachine.TestCase.settings = settings(fuzz(40), stateful_step_count=30)
test_peer_table_merge = PeerTableMachine.TestCase
