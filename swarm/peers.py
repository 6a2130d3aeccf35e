"""The peer table: the newest verified record of every peer, merged from every source.

A table that merges a tombstone (a record with `leaving` set, swarm/records.py) drops
the peer from `records()` and `coverage()` at once, and keeps the tombstone until it
expires so that an older live record, replayed by anyone, is refused as stale instead of
bringing the peer back. Tombstones travel by gossip like any record (`newer_than`
includes them), so the leave reaches tables that did not hear it. `merge` never raises on
records from outside: it counts each refusal by reason in `PeerTable.refused`.

A node's table also makes strangers prove themselves (`TableConfig.require_proof`): a
record for a new peer id, or with a new first address, is held *pending* (not in
`records`, `coverage`, `newer_than` or `len`) until the node has dialled that address and
the peer there signed a fresh nonce with the record's key (swarm/discovery/proof.py);
`settle` then admits or drops it. Refreshes of a proven (peer id, address) go straight in.
Pending records are bounded in number and budgeted per source (`origin`: the sender's IP,
or the peer that answered), so one source cannot flood the table; a full pending set
evicts from the source holding the most, and proven records are never pushed out by
pending ones. A proven peer that fails `max_strikes` exchanges in a row loses its place.

Everything here is pure: time (`now`, unix seconds) is always an argument.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Sequence

from swarm.errors import RecordRejected, SwarmError
from swarm.records import DEFAULT_MAX_SKEW_S, DEFAULT_MAX_TTL_S, PeerRecord, verify_record

log = logging.getLogger(__name__)


def refusal_reason(error: SwarmError) -> str:
    """The counter key for a refused record: a `RecordRejected`'s reason, else the wire code."""
    return error.reason if isinstance(error, RecordRejected) else error.code


@dataclass(frozen=True)
class TableConfig:
    """What a peer table accepts. A node's table requires proofs; a client's checking table does not."""

    max_skew_s: float = DEFAULT_MAX_SKEW_S
    max_ttl_s: float = DEFAULT_MAX_TTL_S
    max_peers: int = 10_000  # bounds memory: proven and pending together; beyond it new peers are "table_full"
    require_proof: bool = False  # hold records of new peers (or new addresses) pending until `settle`
    max_pending: int = 256  # records awaiting a proof, all sources together
    source_budget: int = 64  # new pending records one source may add per window; beyond: "source_budget"
    source_window_s: float = 10.0
    proof_backoff_s: float = 30.0  # a (peer, address) whose proof failed is refused this long
    max_strikes: int = 3  # failed exchanges in a row before a proven peer is dropped

    def __post_init__(self) -> None:
        if not (self.max_peers >= 1 and self.max_pending >= 1 and self.source_budget >= 1 and self.max_strikes >= 1):
            raise ValueError("max_peers, max_pending, source_budget and max_strikes must be at least 1")
        if not (self.source_window_s > 0 and self.proof_backoff_s >= 0):
            raise ValueError("source_window_s must be positive and proof_backoff_s not negative")

    def limits(self) -> dict[str, float | int | bool]:
        """The numbers, for /info."""
        return {
            "max_peers": self.max_peers,
            "require_proof": self.require_proof,
            "max_pending": self.max_pending,
            "source_budget": self.source_budget,
            "source_window_s": self.source_window_s,
            "proof_backoff_s": self.proof_backoff_s,
            "max_strikes": self.max_strikes,
        }


@dataclass
class _Pending:
    record: PeerRecord
    origin: str  # the budget key of the source that brought it


_MAX_FAILED = 4096  # (peer, address) pairs remembered as failed: bounds memory under a flood
_MAX_BUDGETS = 4096  # sources with a running budget window

Verifier = Callable[[PeerRecord, float], None]  # raises a SwarmError to refuse a record at `now`


class PeerTable:
    """The newest verified record of every peer this node knows, from any source.

    `merge` is the only way in and never raises on bad records: it returns whether the
    record was taken and counts refusals by reason in `refused`. `verifier` replaces
    `verify_record` (with the config's limits); simulations pass a memoising one.

    A peer whose newest record is a tombstone (`leaving`) is gone: `len`, `in`, `get`,
    `records` and `coverage` leave it out. Only gossip sees the tombstone (`versions`,
    `newer_than`), until `expire` drops it; it still counts towards `max_peers`.

    With `config.require_proof`, records of unproven peers wait in `pending()` until
    `settle`; `on_pending` (set by the prover) is called whenever one is added, and
    `dialable` (set by the node's address policy) refuses addresses it would never dial, and
    `barred` (set by the node's court, node/court.py) refuses every record of a convicted peer.
    Records merged with source "self" are the node's own and need no proof.
    """

    def __init__(self, config: TableConfig | None = None, *, verifier: Verifier | None = None) -> None:
        self.config = config or TableConfig()
        self._verify: Verifier = verifier or partial(
            verify_record, max_skew=self.config.max_skew_s, max_ttl=self.config.max_ttl_s
        )
        self._records: dict[str, PeerRecord] = {}  # peer id -> newest record, tombstones included
        self._versions: dict[str, float] = {}  # peer id -> its record's issued_at, kept beside for cheap gossip diffs
        self._tombstones = 0  # how many of _records are leaving: len() stays O(1)
        self.refused: Counter[str] = Counter()  # reason -> count
        self._pending: dict[str, _Pending] = {}  # peer id -> newest unproven record, oldest first
        self._pending_by_origin: Counter[str] = Counter()
        self._budgets: dict[str, tuple[float, int]] = {}  # origin -> (window start, pending records added)
        self._proven: dict[str, tuple[str, float]] = {}  # peer id -> (address proven, since when)
        self._failed: OrderedDict[tuple[str, str], float] = OrderedDict()  # (peer id, address) -> refused until
        self._strikes: Counter[str] = Counter()  # peer id -> failed exchanges in a row
        self.on_pending: Callable[[], None] | None = None
        self.dialable: Callable[[str], bool] | None = None
        self.barred: Callable[[str, float], bool] | None = None  # convicted peers (node/court.py): never admitted

    def __len__(self) -> int:
        """Peers held that have not left (expired ones count until `expire`)."""
        return len(self._records) - self._tombstones

    def __contains__(self, peer_id: object) -> bool:
        return isinstance(peer_id, str) and self.get(peer_id) is not None

    def merge(self, record: PeerRecord, now: float, source: str = "gossip", origin: str | None = None) -> bool:
        """Take `record` if it is valid and newer than the one held for its peer (tombstones included).

        With `require_proof`, a record that needs a proof is held pending (and True returned);
        `origin` (else `source`) is whose budget it is charged to.
        """
        if self.barred is not None and self.barred(record.peer_id, now):
            return self._refuse("convicted", source, record.peer_id)
        current = self._records.get(record.peer_id)
        if current is not None and record.issued_at <= current.issued_at:
            # Checked before the signature: records we already hold come back with every exchange.
            if record.issued_at == current.issued_at and record.signature == current.signature:
                return False  # the same record again: normal in gossip, not a refusal
            return self._refuse("stale", source, record.peer_id)
        if self.config.require_proof and source != "self" and not self._is_proven(record, current):
            return self._hold(record, now, source, origin or source)
        try:
            self._verify(record, now)
        except SwarmError as error:
            return self._refuse(refusal_reason(error), source, record.peer_id, error)
        if current is None and len(self._records) >= self.config.max_peers:
            self.expire(now)
            if len(self._records) >= self.config.max_peers:
                return self._refuse("table_full", source, record.peer_id)
        self._admit(record, current, source)
        return True

    def _admit(self, record: PeerRecord, current: PeerRecord | None, source: str) -> None:
        self._put(record)
        if record.leaving:
            if current is not None and not current.leaving:
                log.info("peer %s left (via %s)", record.peer_id, source)
            else:
                log.debug("tombstone of peer %s via %s", record.peer_id, source)
        elif current is None or current.leaving:
            log.info("new peer %s via %s: %s span %s", record.peer_id, source, record.addresses[0], record.span)
        else:
            log.debug("peer %s refreshed via %s", record.peer_id, source)

    def _is_proven(self, record: PeerRecord, current: PeerRecord | None) -> bool:
        """Whether `record` may skip the proof: a refresh of a proven (peer, address), or a goodbye of a held peer."""
        if record.leaving:
            return current is not None  # signed by the key we hold: it can only take the peer out
        proven = self._proven.get(record.peer_id)
        return proven is not None and proven[0] == record.addresses[0]

    def _hold(self, record: PeerRecord, now: float, source: str, origin: str) -> bool:
        """Put `record` in the pending set, cheapest checks first; a refusal is counted."""
        peer_id, address = record.peer_id, record.addresses[0]
        pending = self._pending.get(peer_id)
        if pending is not None and record.issued_at <= pending.record.issued_at:
            if record.issued_at == pending.record.issued_at and record.signature == pending.record.signature:
                return False
            return self._refuse("stale", source, peer_id)
        if record.leaving:  # the goodbye of a peer we never admitted: nothing to hide, nothing worth holding
            if pending is not None:
                try:
                    self._verify(record, now)
                except SwarmError as error:
                    return self._refuse(refusal_reason(error), source, peer_id, error)
                self._unpend(peer_id)
            return False
        if self._failed.get((peer_id, address), -math.inf) > now:
            return self._refuse("proof_failed", source, peer_id)
        if self.dialable is not None and not self.dialable(address):
            return self._refuse("address_policy", source, peer_id)
        if pending is None and not self._charge(origin, now):
            return self._refuse("source_budget", source, peer_id)
        try:
            self._verify(record, now)
        except SwarmError as error:
            return self._refuse(refusal_reason(error), source, peer_id, error)
        if pending is None and not self._make_room(origin, now):
            return self._refuse("table_full" if self._full() else "pending_full", source, peer_id)
        if pending is not None:
            self._unpend(peer_id)
        self._pending[peer_id] = _Pending(record, origin)
        self._pending_by_origin[origin] += 1
        log.debug("peer %s pending a proof of %s (via %s)", peer_id, address, source)
        if self.on_pending is not None:
            self.on_pending()
        return True

    def _charge(self, origin: str, now: float) -> bool:
        """Count one new pending record against `origin`'s budget for the current window."""
        start, used = self._budgets.get(origin, (now, 0))
        if now - start >= self.config.source_window_s:
            start, used = now, 0
        if used >= self.config.source_budget:
            return False
        if origin not in self._budgets and len(self._budgets) >= _MAX_BUDGETS:
            window = self.config.source_window_s
            for key in [key for key, (began, _) in self._budgets.items() if now - began >= window]:
                del self._budgets[key]
            if len(self._budgets) >= _MAX_BUDGETS:
                return False  # this many sources inside one window: a flood from many addresses
        self._budgets[origin] = (start, used + 1)
        return True

    def _full(self) -> bool:
        return len(self._records) + len(self._pending) >= self.config.max_peers

    def _make_room(self, origin: str, now: float) -> bool:
        """Whether one more pending record fits, evicting the oldest of the source that holds the most pending."""
        if self._full():
            self.expire(now)
        if len(self._pending) < self.config.max_pending and not self._full():
            return True
        if not self._pending:
            return False  # the table is full of proven peers: those are never pushed out
        top, held = self._pending_by_origin.most_common(1)[0]
        if self._pending_by_origin[origin] + 1 >= held:
            return False  # this source already holds its share
        victim = next(peer_id for peer_id, entry in self._pending.items() if entry.origin == top)
        self._unpend(victim)
        self.refused["evicted_pending"] += 1
        return True

    def _unpend(self, peer_id: str) -> _Pending | None:
        entry = self._pending.pop(peer_id, None)
        if entry is not None:
            self._pending_by_origin[entry.origin] -= 1
            if self._pending_by_origin[entry.origin] <= 0:
                del self._pending_by_origin[entry.origin]
        return entry

    def pending(self) -> list[PeerRecord]:
        """Records awaiting a proof, oldest first."""
        return [entry.record for entry in self._pending.values()]

    def settle(self, peer_id: str, address: str, proven: bool, now: float) -> bool:
        """The outcome of dialling `address` for `peer_id`'s pending record; whether it was admitted.

        A failed proof drops the pending record and refuses that (peer, address) for
        `proof_backoff_s`. A proof for an address the pending record no longer names (it
        moved meanwhile) admits nothing: the newer record waits for its own proof.
        """
        entry = self._pending.get(peer_id)
        if entry is None or entry.record.addresses[0] != address:
            return False
        self._unpend(peer_id)
        record = entry.record
        if not proven:
            self.refused["proof_failed"] += 1
            self._failed[(peer_id, address)] = now + self.config.proof_backoff_s
            self._failed.move_to_end((peer_id, address))
            while len(self._failed) > _MAX_FAILED:
                self._failed.popitem(last=False)
            log.debug("peer %s failed its proof at %s", peer_id, address)
            return False
        current = self._records.get(peer_id)
        if current is not None and record.issued_at <= current.issued_at:
            return False
        if not record.is_live(now):
            return self._refuse("expired", "proof", peer_id)
        if current is None and len(self._records) >= self.config.max_peers:
            self.expire(now)
            if len(self._records) >= self.config.max_peers:
                return self._refuse("table_full", "proof", peer_id)
        since = self._proven.get(peer_id, (address, now))[1]
        self._proven[peer_id] = (address, since)
        self._strikes.pop(peer_id, None)
        self._admit(record, current, f"proof of {address}")
        return True

    def standing(self, peer_id: str) -> float | None:
        """Since when (unix seconds) `peer_id` has been proven; None for an unproven peer."""
        proven = self._proven.get(peer_id)
        return None if proven is None else proven[1]

    def exchange_failed(self, peer_id: str) -> bool:
        """Count a failed exchange with a proven peer; whether that cost it its place in the table."""
        if peer_id not in self._proven:
            return False
        self._strikes[peer_id] += 1
        if self._strikes[peer_id] < self.config.max_strikes:
            return False
        log.info("peer %s dropped after %d failed exchanges in a row", peer_id, self._strikes[peer_id])
        self.refused["lost_standing"] += 1
        self.remove(peer_id)
        return True

    def exchange_ok(self, peer_id: str) -> None:
        self._strikes.pop(peer_id, None)

    def stats(self) -> dict[str, Any]:
        """Counts for /info, logs and metrics: held, proven, pending, and refusals by reason."""
        return {"peers": len(self), "proven": len(self._proven), "pending": len(self._pending), "refused": dict(self.refused)}

    def merge_wire(self, raw: object, now: float, source: str = "gossip", origin: str | None = None) -> bool:
        """`merge` of a wire dict from outside; a malformed one is counted, never raised."""
        try:
            record = PeerRecord.from_wire(raw)
        except SwarmError as error:
            return self._refuse(refusal_reason(error), source, None, error)
        return self.merge(record, now, source, origin)

    def expire(self, now: float) -> list[str]:
        """Drop records (and tombstones) past their expiry; returns the peer ids dropped."""
        for peer_id in [peer_id for peer_id, entry in self._pending.items() if not entry.record.is_live(now)]:
            self._unpend(peer_id)
        gone = [peer_id for peer_id, record in self._records.items() if not record.is_live(now)]
        for peer_id in gone:
            record = self._drop(peer_id)
            if record.leaving:
                log.debug("tombstone of peer %s expired", peer_id)
            else:
                log.info("peer %s expired", peer_id)
        return gone

    def remove(self, peer_id: str) -> bool:
        """Forget `peer_id` (tombstone and pending record included); whether a peer that had not left was held."""
        self._unpend(peer_id)
        if peer_id not in self._records:
            return False
        return not self._drop(peer_id).leaving

    def get(self, peer_id: str) -> PeerRecord | None:
        """The record held for `peer_id`, live or not yet expired by `expire`; None once it left."""
        record = self._records.get(peer_id)
        return None if record is None or record.leaving else record

    def records(self, now: float) -> list[PeerRecord]:
        """Live records of peers that have not left, ordered by peer id."""
        return sorted((r for r in self._records.values() if r.is_live(now) and not r.leaving), key=lambda r: r.peer_id)

    def versions(self) -> dict[str, float]:
        """peer id -> issued_at of every record held, tombstones included: what a gossip partner needs to send only news."""
        return dict(self._versions)

    def newer_than(self, versions: Mapping[str, float], now: float) -> list[PeerRecord]:
        """Live records (tombstones included) that the holder of `versions` lacks or holds an older version of.

        Ordered by peer id. Once tables agree this is the common case and costs one set
        difference (in C), not a Python loop over the table: that keeps a 1000-peer gossip
        simulation in seconds. A summary from the network must be checked first (str keys,
        float values, bounded size).
        """
        news = []
        for peer_id, issued_at in self._versions.items() - versions.items():
            record = self._records[peer_id]
            if versions.get(peer_id, -math.inf) < issued_at and record.is_live(now):
                news.append(record)
        return sorted(news, key=lambda record: record.peer_id)

    def coverage(self, model_digest: str, num_layers: int, now: float) -> list[int]:
        """How many live peers serve each of the model's blocks: a list of `num_layers` counts."""
        counts = [0] * num_layers
        for record in self._records.values():
            if record.span is None or record.model_digest != model_digest or record.num_layers != num_layers:
                continue
            if record.is_live(now) and not record.leaving:
                for block in range(*record.span):
                    counts[block] += 1
        return counts

    def _put(self, record: PeerRecord) -> None:
        current = self._records.get(record.peer_id)
        self._tombstones += int(record.leaving) - int(current is not None and current.leaving)
        self._records[record.peer_id] = record
        self._versions[record.peer_id] = record.issued_at

    def _drop(self, peer_id: str) -> PeerRecord:
        record = self._records.pop(peer_id)
        del self._versions[peer_id]
        self._proven.pop(peer_id, None)  # standing goes with the record: a peer that returns proves itself again
        self._strikes.pop(peer_id, None)
        self._tombstones -= int(record.leaving)
        return record

    def _refuse(self, reason: str, source: str, peer_id: str | None, error: SwarmError | None = None) -> bool:
        self.refused[reason] += 1
        log.debug("refused a record of %s via %s: %s (%s)", peer_id or "an unknown peer", source, reason, error or "")
        return False


def missing_ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    """The block ranges [start, end) that nobody serves, from `coverage` counts.

    E.g. [1, 0, 0, 2, 0] -> [(1, 3), (4, 5)]: what a "no route" error names.
    """
    ranges: list[tuple[int, int]] = []
    start: int | None = None
    for block, count in enumerate(counts):
        if count == 0 and start is None:
            start = block
        elif count > 0 and start is not None:
            ranges.append((start, block))
            start = None
    if start is not None:
        ranges.append((start, len(counts)))
    return ranges
