"""Swarm nodes as Ray actors and a Ray Data job through them, on a local Ray cluster started here.

One module-scoped cluster and swarm: a bootstrap actor and three node actors (each a real
`swarm-node` process with the whole default model, TLS, loopback), and two Ray Data client
actors generating 32 prompts, greedy, 8 tokens each. The reference is the same generation in
this process, one prompt at a time, on the whole model (float32 on the wire, so the swarm's
texts are exactly the local ones).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest
import torch

from client.generate import GenerationStats, LocalBlocks, stream_tokens_sync
from client.planner import ClientConfig
from client.sampling import SamplingParams
from node.ray_spans import coverage, plan_spans

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")]  # Ray Data's own options, renamed

PROMPTS = [f"Count from {i} to {i + 3}." if i % 2 else f"Name a color that starts with the letter {chr(65 + i)}." for i in range(32)]
SAMPLING = SamplingParams(max_new_tokens=8)
CONFIG = ClientConfig(wire_dtype="float32", verify_fraction=0.0)


# --- the span plan (pure) ---------------------------------------------------------------


def test_whole_model_nodes_are_whole_replicas():
    assert plan_spans(30, [None, None, None]) == [(0, 30)] * 3


def test_spans_survive_any_one_node_where_capacity_allows():
    for capacities in ([15, 15, 15, 15], [10, 30, 10, 10], [20] * 4, [12] * 6, [15, 30, 15]):
        spans = plan_spans(30, capacities)
        assert [e - s for s, e in spans] == capacities
        assert min(coverage(30, spans)) >= 2, (capacities, spans)
        for lost in range(len(spans)):  # killing any one node leaves every block served
            assert min(coverage(30, spans[:lost] + spans[lost + 1 :])) >= 1


def test_spans_cover_once_when_that_is_all_there_is():
    spans = plan_spans(30, [10, 10, 10, 5])
    assert min(coverage(30, spans)) == 1
    assert min(coverage(30, plan_spans(30, [20] * 3))) == 1  # two ends need two spans each: 3 x 20 cannot
    with pytest.raises(ValueError):
        plan_spans(30, [10, 10, 9])
    with pytest.raises(ValueError):
        plan_spans(30, [0, 30])


def test_node_arguments_follow_resources():
    from node.ray_nodes import NodeSpec, RaySwarmConfig, node_args

    config = RaySwarmConfig(insecure_http=True, node_args=("--gossip-period", "1"))
    gpu = node_args(config, NodeSpec(num_cpus=4, num_gpus=1, args=("--kv-memory", "8GiB")), (0, 15), "http://h:1")
    assert gpu[gpu.index("--device") + 1] == "cuda" and gpu[gpu.index("--threads") + 1] == "4"
    assert gpu[gpu.index("--blocks") + 1] == "0:15" and gpu[gpu.index("--bootstrap") + 1] == "http://h:1"
    assert "--insecure-http" in gpu and gpu[-4:] == ["--gossip-period", "1", "--kv-memory", "8GiB"]  # the spec's own flags last: they win
    cpu = node_args(RaySwarmConfig(), NodeSpec(num_cpus=0.5), (15, 30), "https://h:1")
    assert "--device" not in cpu and cpu[cpu.index("--threads") + 1] == "1" and "--insecure-http" not in cpu


# --- on a local Ray cluster -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    # Logical CPUs (more than the box's cores): three node actors, two client actors and Ray
    # Data's read tasks each ask for one. 2.60 starts its services on the machine's address
    # whatever _node_ip_address says; the swarm itself listens and dials on 127.0.0.1 only.
    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_swarm(cluster, tmp_path_factory):
    from node.ray_nodes import RaySwarmConfig, swarm_on_ray

    config = RaySwarmConfig(host="127.0.0.1", identity_dir=str(tmp_path_factory.mktemp("ray")), node_args=("--gossip-period", "0.5"))
    swarm = swarm_on_ray(3, config)
    yield swarm
    swarm.shutdown()


@pytest.fixture(scope="module")
def reference(head, full_span):
    """Each prompt's greedy text, one at a time, on the whole model in this process.

    On one thread, as the nodes compute: beside them (and other processes) on 2 cores, torch's
    two threads only wait on each other (the 32 prompts took 91 s on two, 7 s on one, on a busy box)."""
    texts = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for prompt in PROMPTS:
            ids = head.encode_prompt(prompt, chat=True)
            tokens = stream_tokens_sync(head, LocalBlocks(full_span, len(ids) + SAMPLING.max_new_tokens), ids, SAMPLING, GenerationStats())
            texts.append("".join(t.text for t in tokens))
    finally:
        torch.set_num_threads(threads)
    return texts


def _dataset(swarm):
    from client.ray_data import generate_dataset

    prompts = ray.data.from_items([{"i": i, "prompt": p} for i, p in enumerate(PROMPTS)], override_num_blocks=4)
    return generate_dataset(prompts, swarm.bootstrap, concurrency=2, batch_size=8, sampling=SAMPLING, config=CONFIG)


def test_swarm_actors_serve_replicas(reference, ray_swarm):  # the reference first: before the nodes take the cores
    nodes = ray_swarm.nodes()
    assert [n.blocks for n in nodes] == [(0, 30)] * 3 and ray_swarm.replicas == 3
    assert len({n.peer_id for n in nodes}) == 3 and all(n.url.startswith("https://127.0.0.1:") for n in nodes)


def test_dataset_of_prompts_equals_one_by_one(ray_swarm, reference):
    rows = sorted(_dataset(ray_swarm).take_all(), key=lambda r: r["i"])
    assert [r["prompt"] for r in rows] == PROMPTS  # every prompt once
    assert [r["text"] for r in rows] == reference
    assert all(r["new_tokens"] >= 1 and r["route"] for r in rows)
    assert len({r["route"] for r in rows}) >= 2, {r["route"] for r in rows}  # spread over the replicas


def test_node_actor_killed_mid_batch_loses_no_prompt(ray_swarm, reference):
    from tests.nodes import refresh, swarm_client

    before = ray_swarm.nodes()
    victim = 0
    rows = []
    for row in _dataset(ray_swarm).iter_rows():
        if not rows:  # the first answer is out, the other batches are in flight: kill a node under them
            ray.kill(ray_swarm.actors[victim], no_restart=False)
        rows.append(row)
    rows.sort(key=lambda r: r["i"])
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["text"] for r in rows] == reference
    print(f"after the kill: {sum(r['failovers'] for r in rows)} failovers, {sum(r['attempts'] > 1 for r in rows)} prompts re-run")

    # Ray restarted the actor: a new node process with the same identity, and the swarm sees its new address.
    after = ray_swarm.nodes(timeout_s=120)
    assert after[victim].restarted and after[victim].pid != before[victim].pid
    assert after[victim].peer_id == before[victim].peer_id
    assert _gone(before[victim].pid)  # the killed actor's node went with it (PR_SET_PDEATHSIG), or the restart could not have locked its identity
    client = swarm_client(ray_swarm.bootstrap, tls=True)
    deadline = time.monotonic() + 60
    while True:
        asyncio.run(refresh(client))
        record = client.view.table.get(after[victim].peer_id)
        if record is not None and after[victim].url in record.addresses:
            break
        assert time.monotonic() < deadline, "the restarted node never rejoined"
        time.sleep(0.5)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_node_process_death_restarts_its_actor_at_the_same_url(ray_swarm):
    """The other direction: the swarm-node dies (not the actor), its actor ends, Ray restarts it.
    The bootstrap peer's, whose restart is quick (no weights) and must come back on its port."""
    from tests.nodes import refresh, swarm_client, until_routed

    before = ray.get(ray_swarm.bootstrap_actor.info.remote())
    os.kill(before.pid, signal.SIGKILL)  # a local cluster: the node is a process of this machine
    deadline = time.monotonic() + 60
    while True:
        try:
            after = ray.get(ray_swarm.bootstrap_actor.info.remote(), timeout=30)
            if after.pid != before.pid:
                break
        except ray.exceptions.RayError:
            pass  # the actor is between its death and its restart
        assert time.monotonic() < deadline, "the bootstrap actor never came back"
        time.sleep(0.2)
    assert after.restarted and (after.url, after.peer_id) == (before.url, before.peer_id) == (ray_swarm.bootstrap[0], before.peer_id)
    client = swarm_client(ray_swarm.bootstrap, tls=True)
    asyncio.run(until_routed(client, timeout=60))
    deadline = time.monotonic() + 60  # the restarted peer's table starts empty: every node's gossip fills it again
    while len({r.peer_id for r in client.planner.records() if r.span}) < 3:
        assert time.monotonic() < deadline, "the nodes never came back to the restarted bootstrap peer"
        time.sleep(0.5)
        asyncio.run(refresh(client))
