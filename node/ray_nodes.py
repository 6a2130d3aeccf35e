"""Swarm nodes as Ray actors: Ray places and restarts them, the swarm routes and fails over.

    import ray
    from node.ray_nodes import NodeSpec, swarm_on_ray

    ray.init()                                            # or address="auto" on a cluster
    swarm = swarm_on_ray(nodes=3)                         # three CPU nodes, each the whole model
    swarm = swarm_on_ray(nodes=[NodeSpec(num_gpus=1), NodeSpec(num_cpus=4, max_blocks=10)] * 2)
    swarm.bootstrap                                       # ["https://10.0.0.5:41234"]: give it to clients
    swarm.shutdown()

**One actor, one `swarm-node` process.** Each actor starts a real `swarm-node` as its
child and lives exactly as long as it. The node is not run inside the actor because a
node computes on the main thread that loaded its weights, with its event loop in a
second thread (node/compute.py: 9.2 against 12.3-13.6 ms a step on the CPU box), and
it owns its process's signals for a graceful drain; a Ray actor's main thread belongs
to Ray, which runs the actor's methods on it. As a child the node keeps its own
process, threads and signals, and is byte for byte what `swarm-node` runs elsewhere.
Both directions of death are tied: the child asks the kernel for SIGKILL when the
actor's thread that started it dies (PR_SET_PDEATHSIG, Linux; Ray runs `__init__` on
the actor's main thread, which lives as long as the actor), so `ray.kill` or a lost
worker takes its node along at once; and a thread of the actor exits the actor's
process when the node exits unasked, so Ray sees an actor failure and restarts it.

**Restarts rejoin.** Ray re-runs `__init__` with the same arguments: the same
identity file (on the same machine: the same peer id), the same span, the same
bootstrap peer. The new process's record, signed later, replaces the old one in
every table it reaches through gossip; until then clients find the old address
dead, route around it (the swarm's own failover), and pick the node up again at
their next refresh. A restart first waits for the dead node's identity lock
(node/cli.py `lock_identity`), which the kernel drops when that process is gone.

**Placement.** Each actor asks Ray for its `NodeSpec` resources: `num_gpus` > 0 makes
a `--device cuda` node (Ray sets CUDA_VISIBLE_DEVICES to the GPU it granted), CPU
nodes get `--threads` of their `num_cpus`. Actors are spread over Ray's machines
(`SPREAD`), so replicas do not share a machine where there are enough of them.
Spans come from node/ray_spans.py: whole replicas where nodes hold the whole model
(the default), else overlapping rounds. The bootstrap peer is an actor too, holding
no blocks, pinned to the driver's machine on a port the driver chose, so that a
restart of it comes back at the same URL.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from node.ray_spans import coverage, plan_spans

log = logging.getLogger(__name__)

READY = re.compile(r"^ready peer=(\S+) url=(\S+) blocks=(?:(\d+):(\d+)|none) model=(\S+)")

# Run by the child before node/cli.py: die with the parent (Linux's PR_SET_PDEATHSIG = 1), and
# if the parent is already gone (it died between fork and prctl), go at once.
_CHILD = (
    "import os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(3)\n"
    "from node.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


@dataclass(frozen=True)
class NodeSpec:
    """What one node actor asks of Ray, and what its node serves."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0  # > 0: a `--device cuda` node on the GPU Ray grants (fractions share one)
    max_blocks: int | None = None  # the most blocks it may hold (its memory); None: the whole model
    memory: int | None = None  # bytes of Ray's `memory` resource to reserve for it (None: none)
    args: tuple[str, ...] = ()  # more swarm-node flags for this node only (e.g. "--kv-memory", "8GiB")


@dataclass(frozen=True)
class RaySwarmConfig:
    """How `swarm_on_ray` starts the swarm; every field has a working default."""

    model: str = "smollm2-135m-instruct"  # an alias, or a path that exists on every machine
    host: str | None = None  # where nodes listen and what they advertise; None: each Ray node's IP
    insecure_http: bool = False  # plain http instead of TLS pinned to identities (loopback tests only)
    # A private swarm's key file, as bytes: written (0600) beside each identity. It travels in the
    # actors' arguments, so whoever can run jobs on the cluster can read it (as any file of its machines).
    swarm_key: bytes | None = None
    identity_dir: str | None = None  # on each machine; None: ~/.local/share/layerswarm/ray
    name: str = "swarm"  # identities are <name>-node<i>.key and <name>-bootstrap.key
    node_args: tuple[str, ...] = ()  # more swarm-node flags for every node (e.g. "--gossip-period", "1")
    max_restarts: int = -1  # Ray's, per actor: -1 restarts for ever
    ready_timeout_s: float = 600.0  # a node's start (load, on CUDA compile) before its actor fails
    num_layers: int | None = None  # the model's blocks; None: read from the model on the driver


@dataclass(frozen=True)
class NodeInfo:
    peer_id: str
    url: str
    blocks: tuple[int, int] | None  # None: the bootstrap peer
    pid: int  # the swarm-node process
    restarted: bool  # this actor is a restart of one that died


class NodeActor:
    """A Ray actor owning one `swarm-node` process (wrap with `ray.remote`; `swarm_on_ray` does)."""

    def __init__(self, args: Sequence[str], identity: str, host: str | None, swarm_key: bytes | None = None, ready_timeout_s: float = 600.0) -> None:
        import ray

        self._stopping = False
        self._restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()
        self._match: re.Match | None = None
        key_path = Path(identity)
        key_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [*args, "--identity", str(key_path), "--host", host or ray.util.get_node_ip_address()]
        if swarm_key is not None:
            argv += ["--swarm-key", str(_write_private(key_path.with_name(key_path.stem + ".swarm.key"), swarm_key))]
        _wait_for_identity(key_path, timeout_s=30.0)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(os.getpid()), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._watch, name="swarm-node-output", daemon=True).start()
        if not self._ready.wait(ready_timeout_s) or self._match is None:
            self._proc.kill()
            raise RuntimeError(f"swarm-node did not become ready (exit {self._proc.poll()}):\n{''.join(self._output)}")

    def _watch(self) -> None:
        """Keep the node's output (for `output()` and failures); end the actor when the node ends unasked."""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._output.append(line)
            if self._match is None and (match := READY.match(line)):
                self._match = match
                self._ready.set()
        code = self._proc.wait()
        self._ready.set()
        if not self._stopping and self._match is not None:
            log.error("swarm-node %d exited with %s; ending the actor so that Ray restarts it:\n%s", self._proc.pid, code, "".join(self._output))
            os._exit(1)  # an actor failure, which Ray restarts (max_restarts); raising here would end only this thread

    def info(self) -> NodeInfo:
        assert self._match is not None  # __init__ returned, so the ready line came
        peer, url, start, end = self._match.group(1, 2, 3, 4)
        return NodeInfo(peer, url, (int(start), int(end)) if start else None, self._proc.pid, self._restarted)

    def output(self) -> list[str]:
        """The node's last 200 lines of output."""
        return list(self._output)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (the node drains its sessions, see node/cli.py), then SIGKILL after `timeout_s`."""
        self._stopping = True
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            return self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _wait_for_identity(path: Path, timeout_s: float) -> None:
    """Until no process holds the identity's lock: a restart's dead predecessor may still be exiting."""
    from node.cli import lock_identity
    from swarm.errors import SwarmError

    if not path.exists():  # a first start: the node creates its key, nobody can hold it
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lock_identity(path).close()
            return
        except SwarmError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def node_args(config: RaySwarmConfig, spec: NodeSpec, span: tuple[int, int], bootstrap: str) -> list[str]:
    """swarm-node's arguments for one node (the actor adds --identity and --host)."""
    device = ["--device", "cuda"] if spec.num_gpus > 0 else []
    threads = ["--threads", str(max(1, math.floor(spec.num_cpus)))]
    insecure = ["--insecure-http"] if config.insecure_http else []
    blocks = ["--blocks", f"{span[0]}:{span[1]}"]
    return ["--model", config.model, *blocks, "--bootstrap", bootstrap, *device, *threads, *insecure, *config.node_args, *spec.args]


@dataclass
class RaySwarm:
    """A swarm started by `swarm_on_ray`: its bootstrap URLs, its actors and how to stop it."""

    bootstrap: list[str]
    bootstrap_actor: object
    actors: list  # one per node, in the order of the specs
    specs: list[NodeSpec]
    spans: list[tuple[int, int]]
    replicas: int  # the fewest nodes holding any block: 2 or more survives the loss of any one node
    _stopped: bool = field(default=False, repr=False)

    def nodes(self, timeout_s: float | None = None) -> list[NodeInfo]:
        """Each node actor's node (after a restart: the new process)."""
        import ray

        return ray.get([actor.info.remote() for actor in self.actors], timeout=timeout_s)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every node (a graceful drain each), then the bootstrap peer, then end the actors."""
        import ray

        if self._stopped:
            return
        self._stopped = True
        for group in (self.actors, [self.bootstrap_actor]):
            stops = [actor.stop.remote(timeout_s) for actor in group]
            try:
                ray.get(stops, timeout=timeout_s + 10)
            except (ray.exceptions.RayError, TimeoutError) as exc:  # an actor already gone: killing it below is all that is left
                log.warning("stopping nodes: %s", exc)
            for actor in group:
                ray.kill(actor, no_restart=True)

    def __enter__(self) -> RaySwarm:
        return self

    def __exit__(self, *_) -> None:
        self.shutdown()


def swarm_on_ray(nodes: int | Sequence[NodeSpec] = 3, config: RaySwarmConfig | None = None, wait: bool = True) -> RaySwarm:
    """Start a bootstrap peer and one node actor per spec (`nodes` = N: N default `NodeSpec`s) on the
    connected Ray cluster (call `ray.init` first). With `wait`, return once every node is ready."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    config = config or RaySwarmConfig()
    specs = [NodeSpec()] * nodes if isinstance(nodes, int) else list(nodes)
    if not specs:
        raise ValueError("a swarm needs at least one node")
    num_layers = config.num_layers or _num_layers(config.model)
    spans = plan_spans(num_layers, [spec.max_blocks for spec in specs])
    replicas = min(coverage(num_layers, spans))
    folder = Path(config.identity_dir) if config.identity_dir else Path.home() / ".local" / "share" / "layerswarm" / "ray"
    scheme = "http" if config.insecure_http else "https"

    # The bootstrap peer: on the driver's machine (where the port was found free), on that port
    # for every restart, so its URL holds for the swarm's life.
    port = _free_port()
    host = config.host or ray.util.get_node_ip_address()
    bootstrap = f"{scheme}://{host}:{port}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(NodeActor)
    insecure = ["--insecure-http"] if config.insecure_http else []
    bootstrap_args = ["--no-model", "--port", str(port), *insecure, *config.node_args]
    bootstrap_actor = remote.options(num_cpus=0, max_restarts=config.max_restarts, max_task_retries=-1, scheduling_strategy=here).remote(
        bootstrap_args, str(folder / f"{config.name}-bootstrap.key"), host, config.swarm_key, config.ready_timeout_s
    )
    actors = []
    for index, (spec, span) in enumerate(zip(specs, spans)):
        options = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "max_restarts": config.max_restarts, "max_task_retries": -1, "scheduling_strategy": "SPREAD"}
        if spec.memory is not None:
            options["memory"] = spec.memory
        argv = node_args(config, spec, span, bootstrap)
        actors.append(remote.options(**options).remote(argv, str(folder / f"{config.name}-node{index}.key"), config.host, config.swarm_key, config.ready_timeout_s))
    swarm = RaySwarm([bootstrap], bootstrap_actor, actors, specs, spans, replicas)
    if wait:
        try:
            ray.get([bootstrap_actor.info.remote(), *(actor.info.remote() for actor in actors)])
        except BaseException:
            for actor in [bootstrap_actor, *actors]:
                ray.kill(actor, no_restart=True)
            raise
    log.info("swarm on Ray: %d nodes, spans %s, %d replicas; bootstrap %s", len(actors), spans, replicas, bootstrap)
    return swarm


def _num_layers(model: str) -> int:
    from swarm.model import open_checkpoint

    with open_checkpoint(model) as checkpoint:
        return checkpoint.config.num_layers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
