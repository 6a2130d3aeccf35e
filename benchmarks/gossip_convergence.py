"""Gossip convergence: how many push-pull rounds until N peer tables agree.

Simulated in one process, no sockets: N peers with real signed records, each table a
real `PeerTable`, each exchange the real `swarm.discovery.exchange.exchange`. Two figures
per fanout (random known peers each peer contacts per round):

- bootstrap convergence: every peer starts knowing only itself and the bootstrap peer
  (peer 0); rounds until every table holds all N records;
- update spread: in the converged swarm one peer re-signs its record (a refresh); rounds
  until every table holds the new version. This is the classic rumour-spreading figure
  and sets how long a record's TTL must be against the gossip period.

A round: every peer, in a fresh random order, exchanges with `fanout` peers drawn from
its own table. Exchanges within a round see the effects of earlier ones, as with
unsynchronised timers. Time is frozen, so no record expires.

Usage: python benchmarks/gossip_convergence.py [--peers 1000] [--fanouts 1 2 3] [--trials 3]
stdout: one JSON object per result; stderr: one human line per result.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarm.discovery.exchange import exchange
from swarm.identity import Identity
from swarm.peers import PeerTable
from swarm.records import PeerRecord, verify_record

NOW = 1_700_000_000.0  # unix seconds, frozen for the whole simulation
TTL_S = 600.0
MODEL = {"architecture": "llama", "shape": "L30-d576-ff1536-h9-kv3-v49152", "digest": "0" * 32}
NUM_LAYERS = 30


@dataclass(frozen=True)
class Params:
    peers: int
    fanouts: tuple[int, ...]
    trials: int
    seed: int
    max_rounds: int


class MemoVerifier:
    """`verify_record` once per distinct record, shared by all simulated tables.

    A real node verifies each record it takes once. Here N tables would verify the same
    N records N times (10^6 Ed25519 checks at ~150 us: minutes), which measures Ed25519
    and not gossip. Every record is still verified for real, once; a record is its own
    cache key (hash of id and signature, equality over every field), and time is frozen,
    so a cached verdict stays right.
    """

    def __init__(self) -> None:
        self._good: set[PeerRecord] = set()
        self.verified = 0

    def __call__(self, record: PeerRecord, now: float) -> None:
        if record not in self._good:
            verify_record(record, now)
            self.verified += 1
            self._good.add(record)


class Swarm:
    """N identities, their records and tables, and the push-pull round."""

    def __init__(self, peers: int, verifier: MemoVerifier, seed: int) -> None:
        keys = random.Random(seed)  # seeded keys: peer ids, hence table orders and results, repeat run to run
        self.identities = [Identity(Ed25519PrivateKey.from_private_bytes(keys.randbytes(32))) for _ in range(peers)]
        self.records = [self._record(i, NOW) for i in range(peers)]
        self.index = {identity.peer_id: i for i, identity in enumerate(self.identities)}
        self.tables = [PeerTable(verifier=verifier) for _ in range(peers)]
        for i, table in enumerate(self.tables):
            table.merge(self.records[i], NOW, source="self")
            table.merge(self.records[0], NOW, source="bootstrap")  # what `--bootstrap URL` + GET /info gives

    def _record(self, i: int, now: float) -> PeerRecord:
        start = (i * 3) % NUM_LAYERS
        return PeerRecord.create(
            self.identities[i],
            addresses=[f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:31337"],
            now=now,
            ttl=TTL_S,
            model=MODEL,
            num_layers=NUM_LAYERS,
            span=(start, min(start + 10, NUM_LAYERS)),
            throughput=20.0,
            load=0.0,
        )

    def round(self, fanout: int, rng: random.Random, now: float) -> int:
        """One gossip round; returns how many exchanges peer 0 (the bootstrap) took part in."""
        peers = len(self.tables)
        bootstrap_id = self.identities[0].peer_id
        with_bootstrap = 0
        for i in rng.sample(range(peers), peers):
            own = self.identities[i].peer_id
            known = [peer_id for peer_id in self.tables[i].versions() if peer_id != own]
            for peer_id in rng.sample(known, min(fanout, len(known))):
                exchange(self.tables[i], self.tables[self.index[peer_id]], now)
                with_bootstrap += i == 0 or peer_id == bootstrap_id
        return with_bootstrap

    def refresh(self, i: int, now: float) -> PeerRecord:
        """Peer i re-signs its record (as a node does every period) and takes it into its own table."""
        record = self._record(i, now)
        self.records[i] = record
        assert self.tables[i].merge(record, now, source="self")
        return record


def bootstrap_convergence(params: Params, fanout: int, seed: int) -> tuple[int, int, Swarm]:
    """(rounds until every table holds all N records, bootstrap exchanges in round 1, the swarm)."""
    rng = random.Random(seed)
    swarm = Swarm(params.peers, MemoVerifier(), seed)
    first_round_load = 0
    for round_ in range(1, params.max_rounds + 1):
        load = swarm.round(fanout, rng, NOW)
        first_round_load = first_round_load or load
        if all(len(table) == params.peers for table in swarm.tables):
            assert all(not table.refused for table in swarm.tables), "a valid record was refused"
            return round_, first_round_load, swarm
    raise RuntimeError(f"no convergence in {params.max_rounds} rounds (fanout {fanout})")


def update_spread(params: Params, swarm: Swarm, fanout: int, seed: int, now: float) -> int:
    """Rounds until a refreshed record of one random peer is in every table."""
    rng = random.Random(seed)
    record = swarm.refresh(rng.randrange(params.peers), now)
    for round_ in range(1, params.max_rounds + 1):
        swarm.round(fanout, rng, now)
        if all(table.get(record.peer_id) == record for table in swarm.tables):
            return round_
    raise RuntimeError(f"update not spread in {params.max_rounds} rounds (fanout {fanout})")


def git_sha() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def report(name: str, params: dict[str, int], samples: list[int], unit: str, sha: str | None) -> None:
    """One JSON line on stdout (value: the median of `samples`), one human line on stderr."""
    value = statistics.median(samples)
    result = {"name": name, "params": params, "value": value, "unit": unit, "samples": samples, "git_sha": sha, "device": "cpu"}
    print(json.dumps(result))
    print(f"{name} {params}: {value} {unit} (samples {samples})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--fanouts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--trials", type=int, default=3, help="update spreads measured per fanout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rounds", type=int, default=100)
    args = parser.parse_args()
    params = Params(args.peers, tuple(args.fanouts), args.trials, args.seed, args.max_rounds)
    sha = git_sha()
    started = time.perf_counter()
    for fanout in params.fanouts:
        common = {"peers": params.peers, "fanout": fanout, "seed": params.seed}
        rounds, bootstrap_load, swarm = bootstrap_convergence(params, fanout, params.seed)
        report("gossip_bootstrap_convergence", common, [rounds], "rounds", sha)
        report("gossip_bootstrap_exchanges_round1", common, [bootstrap_load], "exchanges", sha)
        spreads = [update_spread(params, swarm, fanout, params.seed + 1 + t, NOW + 1.0 + t) for t in range(params.trials)]
        report("gossip_update_spread", {**common, "trials": params.trials}, spreads, "rounds", sha)
    print(f"total {time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
