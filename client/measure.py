"""What this client has seen of each peer: measured speed, and which peers it will not use.

A peer's record says how fast it is (`throughput`), but a record is signed by
the peer itself: anyone can claim a million blocks per second. So the claim is
only a prior, and this store keeps what the client measured with its own clock.
Pure (no I/O, time passed in), so the rules are tested without a network.

**Speed.** After every one-token step the client knows the step's wall time W
(its own clock) and each hop's reported model time c_i (the `compute_ms` of its
ack, a claim too). A hop's reported time is clamped to [0, W], the reports are
scaled down if together they exceed W, and what nobody reported, R = W - sum(c),
is shared equally among the n hops (network, queueing, pushes). Hop i's sample is

    seconds per block = (c_i + R / n) / blocks_i

and the store keeps an exponentially weighted average of these samples. The
samples of one step always add up to the wall time the client saw, so a lying
`compute_ms` can only move blame between the hops of one route; it cannot make
a route look faster than it ran. Measurements older than `stale_s` are dropped
(a peer that was slow once may have been busy), and the peer falls back to its
clamped claim.

**Claims.** A claim ranks a peer only while the client has measured none of
the candidates, and even then it is clamped: no peer may look more than
`claim_factor` times faster per block than the median claim (a few liars
cannot move a median). Once any candidate is measured, claims are ignored: an
unmeasured peer counts as `claim_factor` times faster than the fastest measured
one, whatever it says. That is optimism with a bound: every peer that would be
on a good route gets one trial, a liar gains nothing over an honest newcomer,
and an honest peer whose claim came out pessimistic (its self-benchmark ran
while the machine was busy: an order of magnitude is common) is still tried.
The trial route is measured like any other, and from then on the peer is ranked
by what it did. So an inflated claim buys at most one trial.

**Bans.** A hop that misbehaves (closes its connection, errors, misses a step
deadline, sends frames the client cannot read) is banned for this client for
`ban_s`, doubling with each strike up to `max_ban_s`, not only excluded from
the generation it broke. Capacity refusals (`busy`) and a node saying it is
shutting down are not misbehaviour and are not banned. A peer caught computing
wrong outputs (client/verification.py: a re-run on two other replicas
disagreed with what it sealed) is convicted: banned for `convicted_ban_s`, a
day by default, since that was no accident of the network. Bans are a preference:
a planner whose bans leave no route plans once more without them (a swarm
whose only replica of some blocks crashed and came back must still serve).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrustConfig:
    ewma_alpha: float = 0.3  # weight of a new speed sample
    claim_factor: float = 1.25  # an unmeasured peer looks at most this much faster per block than the reference
    default_per_block_s: float = 0.01  # reference when nothing is measured and nobody claims a speed
    stale_s: float = 600.0  # forget a speed measurement this old
    unmeasured_rtt_s: float = 0.005  # planning cost of a round trip not measured yet
    ban_s: float = 60.0  # first ban of a misbehaving peer
    max_ban_s: float = 1800.0  # bans double per strike up to this
    convicted_ban_s: float = 86400.0  # a peer proven to send wrong outputs

    def __post_init__(self) -> None:
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha!r}")
        if not self.claim_factor >= 1:
            raise ValueError(f"claim_factor must be >= 1, got {self.claim_factor!r}")
        for name in ("default_per_block_s", "stale_s", "unmeasured_rtt_s", "ban_s", "max_ban_s", "convicted_ban_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")


@dataclass
class PeerStats:
    rtt_s: float | None = None  # EWMA of measured round trips
    per_block_s: float | None = None  # EWMA of measured seconds per block of a one-token step
    steps: int = 0  # step samples taken
    measured_at: float = 0.0  # when per_block_s last changed (monotonic seconds)
    strikes: int = 0  # bans so far
    banned_until: float = 0.0
    last_offence: str = ""


@dataclass(frozen=True)
class StepHop:
    """One hop of a measured step: who, how many blocks, and the model time it reported."""

    peer_id: str
    blocks: int
    compute_s: float


def apportion(hops: Sequence[StepHop], wall_s: float) -> list[float]:
    """Seconds per block for each hop of one step of `wall_s` seconds (see the module docstring)."""
    if not hops or not (math.isfinite(wall_s) and wall_s >= 0):
        return []
    reported = [min(max(h.compute_s, 0.0), wall_s) if math.isfinite(h.compute_s) else 0.0 for h in hops]
    total = sum(reported)
    if total > wall_s > 0:
        reported = [c * wall_s / total for c in reported]
        total = wall_s
    share = max(0.0, wall_s - total) / len(hops)
    return [(c + share) / max(1, h.blocks) for c, h in zip(reported, hops)]


@dataclass
class Measurements:
    """The per-peer store: feed it RTTs, steps and offences; ask it for costs and bans."""

    config: TrustConfig = field(default_factory=TrustConfig)
    peers: dict[str, PeerStats] = field(default_factory=dict)

    def _stats(self, peer_id: str) -> PeerStats:
        return self.peers.setdefault(peer_id, PeerStats())

    def _ewma(self, old: float | None, sample: float) -> float:
        return sample if old is None else (1 - self.config.ewma_alpha) * old + self.config.ewma_alpha * sample

    def record_rtt(self, peer_id: str, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0:
            stats = self._stats(peer_id)
            stats.rtt_s = self._ewma(stats.rtt_s, seconds)

    def record_step(self, hops: Sequence[StepHop], wall_s: float, now: float) -> None:
        """One one-token step through `hops` took `wall_s` on the client's clock."""
        for hop, per_block in zip(hops, apportion(hops, wall_s)):
            stats = self._stats(hop.peer_id)
            if stats.per_block_s is not None and now - stats.measured_at > self.config.stale_s:
                stats.per_block_s = None  # an old average says nothing about now
            stats.per_block_s = self._ewma(stats.per_block_s, per_block)
            stats.steps += 1
            stats.measured_at = now

    def measured_per_block(self, peer_id: str, now: float) -> float | None:
        stats = self.peers.get(peer_id)
        if stats is None or stats.per_block_s is None or now - stats.measured_at > self.config.stale_s:
            return None
        return stats.per_block_s

    def rtt(self, peer_id: str) -> float | None:
        stats = self.peers.get(peer_id)
        return stats.rtt_s if stats is not None else None

    def per_block_costs(self, claims: Iterable[tuple[str, float]], now: float) -> dict[str, float]:
        """Seconds per block to plan with, for each (peer id, claimed blocks/s) of one model.

        Measured peers count as measured; the rest as the module docstring's "Claims" says.
        """
        claims = list(claims)
        measured = {p: m for p, _ in claims if (m := self.measured_per_block(p, now)) is not None}
        if measured:
            optimistic = min(measured.values()) / self.config.claim_factor
            return {p: measured.get(p, optimistic) for p, _ in claims}
        priors = {p: 1.0 / t if math.isfinite(t) and t > 0 else math.inf for p, t in claims}
        finite = [v for v in priors.values() if math.isfinite(v)]
        median = statistics.median(finite) if finite else self.config.default_per_block_s
        floor = median / self.config.claim_factor
        ceiling = max(median, self.config.default_per_block_s) * 100  # no claim at all: slow, but finite
        return {p: min(max(priors[p], floor), ceiling) for p, _ in claims}

    def ban(self, peer_id: str, reason: str, now: float) -> float:
        """Ban a misbehaving peer; returns for how long (seconds)."""
        stats = self._stats(peer_id)
        duration = min(self.config.max_ban_s, self.config.ban_s * 2**stats.strikes)
        stats.strikes += 1
        stats.banned_until = max(stats.banned_until, now + duration)
        stats.last_offence = reason
        return duration

    def convict(self, peer_id: str, reason: str, now: float) -> float:
        """Ban a peer proven to compute wrong outputs, for `convicted_ban_s`; returns for how long."""
        stats = self._stats(peer_id)
        stats.strikes += 1
        stats.banned_until = max(stats.banned_until, now + self.config.convicted_ban_s)
        stats.last_offence = reason
        return self.config.convicted_ban_s

    def banned(self, now: float) -> frozenset[str]:
        return frozenset(p for p, s in self.peers.items() if s.banned_until > now)
