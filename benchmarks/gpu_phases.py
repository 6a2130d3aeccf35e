"""The measurements of benchmarks/gpu_decode.py and gpu_pipeline.py, one phase per child process.

Each phase runs alone in its own process (`python benchmarks/gpu_phases.py --phase P ...`,
started by `run_phase` in a new process group), so its GPU memory is gone before the
next one starts, and a phase that overruns its time is killed with every node it
started. A phase writes its figures as one JSON object to `--result`.

Phases:
- `bandwidth`: device-to-device copy bandwidth (bytes read + written per second).
- `hf_eager`, `hf_compile`: transformers' `generate`, batch 1, eager / static cache
  (+ torch.compile, which `generate` applies by itself to a static cache on a GPU;
  on a CPU it stays eager). The first call of `hf_compile` is the compile + warmup.
- `ours_local`: `LocalModel` + `stream_tokens` in this one process.
- `pipeline`: real `swarm-node` processes (one span each, `--device` per node) and
  the real client `SwarmModel`, 1 session, then N concurrent sessions.

Decode rate everywhere: (tokens - 1) / (time of the last token - time of the first),
best of the measured runs; the prompt is the same chat prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a long story about a dragon who learns to cook."


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def checkpoint_bytes(model: str | Path) -> int:
    """Bytes of every tensor in an HF safetensors directory (the index's total)."""
    index = Path(model) / "model.safetensors.index.json"
    return int(json.loads(index.read_text())["metadata"]["total_size"])


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device) -> dict:
    import torch

    if torch.device(device).type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"max_allocated_bytes": torch.cuda.max_memory_allocated(device), "max_reserved_bytes": torch.cuda.max_memory_reserved(device), "device_used_bytes": total - free}


# --- phases ----------------------------------------------------------------------------------


def phase_bandwidth(args) -> dict:
    """Best device copy bandwidth: a tensor far bigger than any cache copied into another."""
    import torch

    size = (1 << 30) if args.device.startswith("cuda") else (1 << 27)
    src = torch.empty(size, dtype=torch.uint8, device=args.device).random_(0, 255)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(10):
        _sync(args.device)
        begin = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        _sync(args.device)
        best = max(best, 2 * 5 * size / (time.perf_counter() - begin))  # each copy reads and writes `size` bytes
    return {"copy_bytes_per_s": best}


class _Clock:
    """A transformers streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_run(hf, ids, tokens: int, **kwargs) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of one batch-1 greedy generate of exactly `tokens` tokens."""
    clock = _Clock()
    begin = time.perf_counter()
    hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock, **kwargs)
    first, last = clock.times[0], clock.times[-1]
    return first - begin, (len(clock.times) - 1) / max(last - first, 1e-9)


def _phase_hf(args, static: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    begin = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - begin
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to(args.device)
    kwargs = {"cache_implementation": "static"} if static else {}
    out = {"load_s": load_s, "prompt_tokens": int(ids.shape[1]), "compiled": static and torch.device(args.device).type == "cuda"}
    with torch.inference_mode():
        begin = time.perf_counter()
        # the same length as the measured runs: a static cache of another size would compile again
        _hf_run(hf, ids, args.tokens if static else args.warmup_tokens, **kwargs)
        out["warmup_s"] = time.perf_counter() - begin  # static: torch.compile's compile time and the capture
        runs = [_hf_run(hf, ids, args.tokens, **kwargs) for _ in range(args.trials)]
    if static:  # whether generate really compiled its forward (transformers keeps it here)
        out["compiled"] = hasattr(hf, "_compiled_call")
    out["ttft_s"] = min(r[0] for r in runs)
    out["decode_tok_s"] = max(r[1] for r in runs)
    out["runs_tok_s"] = [r[1] for r in runs]
    out.update(_memory(args.device))
    return out


def phase_hf_eager(args) -> dict:
    return _phase_hf(args, static=False)


def phase_hf_compile(args) -> dict:
    return _phase_hf(args, static=True)


def load_local(model: str, dtype, device: str):
    """`LocalModel` with every block and the head on `device`. Older LocalModel.load has no `device`:
    then the same parts are loaded onto the device here."""
    from client.local import LocalModel

    if "device" in inspect.signature(LocalModel.load).parameters:
        return LocalModel.load(model, dtype, device=device)
    from swarm.model import load_head, load_span, open_checkpoint

    say("LocalModel.load has no device parameter here: loading span and head onto the device directly")
    with open_checkpoint(model) as checkpoint:
        span = load_span(checkpoint, 0, checkpoint.config.num_layers, dtype, device)
        head = load_head(checkpoint, dtype, device)
    return LocalModel(head, span)


async def _local_run(local, blocks, ids: list[int], tokens: int):
    from client.generate import GenerationStats, stream_tokens
    from client.sampling import SamplingParams

    stats = GenerationStats()
    params = SamplingParams(max_new_tokens=tokens, stop_at_eos=False, speculate=False)
    async for _ in stream_tokens(local.head, blocks, ids, params, stats):
        pass
    assert stats.new_tokens == tokens, (stats.new_tokens, tokens)
    return stats


def phase_ours_local(args) -> dict:
    import torch

    from client.generate import LocalBlocks

    dtype = getattr(torch, args.dtype)
    begin = time.perf_counter()
    local = load_local(args.model, dtype, args.device)
    _sync(args.device)
    load_s = time.perf_counter() - begin
    ids = local.head.encode_prompt(PROMPT, chat=True)
    begin = time.perf_counter()
    # One LocalBlocks for every run (each generation prefills from position 0 again): on CUDA its
    # engine captures a graph per length bucket the first time a run reaches it, which the first
    # (warm-up) run of full length does; the measured runs are then the steady state.
    blocks = LocalBlocks(local.span, len(ids) + args.tokens)
    setup_s = time.perf_counter() - begin

    async def runs():
        cold = await _local_run(local, blocks, ids, args.tokens)
        return cold, [await _local_run(local, blocks, ids, args.tokens) for _ in range(args.trials)]

    begin = time.perf_counter()
    cold, measured = asyncio.run(runs())
    out = {
        "load_s": load_s,
        "setup_s": setup_s,
        "prompt_tokens": len(ids),
        "cold_tok_s": cold.decode_tokens_per_s,
        "ttft_s": min(s.time_to_first_token_s for s in measured),
        "decode_tok_s": max(s.decode_tokens_per_s for s in measured),
        "runs_tok_s": [s.decode_tokens_per_s for s in measured],
        "measure_s": time.perf_counter() - begin,
    }
    out.update(_memory(args.device))
    return out


# --- the pipeline ----------------------------------------------------------------------------


def split_blocks(layers: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous spans covering [0, layers), sizes differing by one at most."""
    bounds = [round(i * layers / parts) for i in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def pin(device: str, how: str) -> tuple[list[str], str]:
    """(command prefix, --device) for a node on `device`. `how` = "visible": a node for cuda:N sees
    only GPU N (CUDA_VISIBLE_DEVICES=N) as its cuda, so every stream, event and graph it makes is
    on that GPU whatever the code's current device; "device": `--device cuda:N` as given."""
    if how == "visible" and device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # our cuda:N is the Nth of these where set
        gpu = visible.split(",")[index].strip() if visible else str(index)
        return ["env", f"CUDA_VISIBLE_DEVICES={gpu}"], "cuda"
    return [], device


def node_flags(model: str, span: tuple[int, int], device: str, dtype: str, sessions: int, max_length: int, config) -> list[str]:
    """A GPU node sized for `sessions` sessions of `max_length` tokens (with room for warmups)."""
    slots = sessions + 4
    kv = 2 * (span[1] - span[0]) * config.kv_size * max_length * 2 * slots  # k and v, bf16
    return [
        "--model", model, "--blocks", f"{span[0]}:{span[1]}", "--device", device, "--dtype", dtype,
        "--max-length", str(max_length), "--max-sessions", str(slots), "--kv-memory", str(int(kv * 1.25) + (64 << 20)),
        "--max-sessions-per-source", str(slots), "--prefill-chunk", "512", "--gossip-period", "0.5",
    ]  # fmt: skip


def swarm_model(model: str, bootstrap: str, device: str, dtype):
    """The real client with its head on `device`. A SwarmModel without `device` gets its head moved
    there here (what the issue measured as "the client's head moved to the GPU")."""
    from client.session import SessionConfig
    from client.swarm import ClientConfig, SwarmModel

    # Generous deadlines: a node may capture a CUDA graph for a batch size the first time it sees it.
    config = ClientConfig(verify_fraction=0.0, min_deadline_s=60.0, session=SessionConfig(open_timeout_s=300.0, step_timeout_s=300.0))
    if "device" in inspect.signature(SwarmModel.__init__).parameters:
        return SwarmModel(model, bootstrap=[bootstrap], config=config, insecure_http=True, device=device, dtype=dtype)
    say("SwarmModel has no device parameter here: moving its head to the device by hand")
    client = SwarmModel(model, bootstrap=[bootstrap], config=config, insecure_http=True, dtype=dtype)
    client.head = _device_head(client.head, device)
    return client


def _device_head(head, device: str):
    import torch

    from swarm.model.head import Head

    class DeviceHead(Head):
        def logits(self, hidden: torch.Tensor) -> torch.Tensor:
            return super().logits(hidden.to(self.lm_head_t.device))

    weights = {"norm": head.norm_weight.to(device), "lm_head": head.lm_head_t.t().to(device)}
    weights["embed"] = head.embed_weight.to(device) if head.embed_weight is not None else weights["lm_head"]
    return DeviceHead(head.config, weights, head.tokenizer)


async def _sessions(client, ids: list[int], tokens: int, count: int) -> tuple[list, float]:
    """`count` concurrent generations of exactly `tokens` tokens; (their stats, wall seconds)."""
    from client.generate import GenerationStats
    from client.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, stop_at_eos=False, speculate=False)

    async def one():
        stats = GenerationStats()
        async for _ in client.stream_generation(ids, params, stats, verify=False):
            pass
        assert stats.new_tokens == tokens, (stats.new_tokens, tokens)
        return stats

    begin = time.perf_counter()
    done = await asyncio.gather(*(one() for _ in range(count)))
    return list(done), time.perf_counter() - begin


def _gpu_apps() -> list[dict]:
    """nvidia-smi's per-process memory (empty where it is not there or shows no processes)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_uuid", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    apps = []
    for line in done.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            apps.append({"pid": int(parts[0]), "used_bytes": int(parts[1]) << 20, "gpu": parts[2] if len(parts) > 2 else ""})
    return apps


def _device_used(client_device: str) -> list[int]:
    """Memory in use on every GPU (all processes), or [] without CUDA."""
    import torch

    if not client_device.startswith("cuda"):
        return []
    return [total - free for free, total in (torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count()))]


async def _node_info(url: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{url}/info") as response:
        return await response.json()


def phase_pipeline(args) -> dict:
    import torch

    from swarm.model import open_checkpoint
    from tests.nodes import reserve_url, start_nodes, stop_nodes, until_routed

    with open_checkpoint(args.model) as checkpoint:
        config = checkpoint.config
    devices = args.node_devices.split(",")
    spans = split_blocks(config.num_layers, len(devices))
    max_length = args.max_length
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    port, url = reserve_url()
    identity = ["--identity", str(tmp / "bootstrap" / "node.key")]
    (tmp / "bootstrap").mkdir()
    used_before = _device_used(args.client_device)
    begin = time.perf_counter()
    # Every node (and the bootstrap peer) starts at once, each with its own environment (its GPU).
    launches = []
    for span, device in zip(spans, devices):
        prefix, flag = pin(device, args.pin)
        launches.append((prefix, [*node_flags(args.model, span, flag, args.dtype, args.sessions, max_length, config), "--bootstrap", url]))
    launches.append(([], ["--no-model", *port, *identity, "--gossip-period", "0.5"]))
    for index in range(len(launches)):
        (tmp / f"n{index}").mkdir()
    with ThreadPoolExecutor(len(launches)) as pool:
        futures = [pool.submit(start_nodes, [spec], tmp / f"n{i}", args.node_timeout, prefix or None) for i, (prefix, spec) in enumerate(launches)]
        *nodes, bootstrap = [node for future in futures for node in future.result()]  # a failure: the parent kills the group
    out: dict = {"spans": spans, "node_devices": devices, "nodes_ready_s": time.perf_counter() - begin, "max_length": max_length}
    # Where nvidia-smi lists no processes (containers), the nodes' memory is what the devices lost to them.
    out["nodes_loaded_device_bytes"] = [after - before for before, after in zip(used_before, _device_used(args.client_device))]
    say(f"  {len(nodes)} nodes ready in {out['nodes_ready_s']:.1f} s: " + ", ".join(f"{s[0]}:{s[1]} on {d}" for s, d in zip(spans, devices)))
    try:
        dtype = getattr(torch, args.dtype)
        begin = time.perf_counter()
        client = swarm_model(args.model, bootstrap.url, args.client_device, dtype)
        out["client_load_s"] = time.perf_counter() - begin
        ids = client.head.encode_prompt(PROMPT, chat=True)
        out["prompt_tokens"] = len(ids)

        async def measure():
            route = await until_routed(client)
            out["route"] = [f"{h.start}:{h.end}" for h in route.hops]
            # warm-ups as long as the measured runs: the nodes capture a graph per (batch, length) bucket the first time
            await _sessions(client, ids, args.tokens, 1)
            singles = [(await _sessions(client, ids, args.tokens, 1))[0][0] for _ in range(args.trials)]
            out["one_session_tok_s"] = max(s.decode_tokens_per_s for s in singles)
            out["one_session_runs_tok_s"] = [s.decode_tokens_per_s for s in singles]
            out["one_session_ttft_s"] = min(s.time_to_first_token_s for s in singles)
            say(f"  1 session: {out['one_session_tok_s']:.1f} tokens/s")
            if args.sessions > 1:
                await _sessions(client, ids, args.tokens, args.sessions)
                many, wall = await _sessions(client, ids, args.tokens, args.sessions)
                out["sessions"] = args.sessions
                out["many_sum_tok_s"] = sum(s.decode_tokens_per_s for s in many)
                out["many_wall_tok_s"] = sum(s.new_tokens for s in many) / wall  # prefill and opening included
                out["many_min_session_tok_s"] = min(s.decode_tokens_per_s for s in many)
                say(f"  {args.sessions} sessions: {out['many_sum_tok_s']:.1f} tokens/s summed ({out['many_wall_tok_s']:.1f} over the wall time)")
            out["node_info"] = [await _node_info(n.url) for n in nodes]

        asyncio.run(measure())
        apps = {a["pid"]: a for a in _gpu_apps()}
        out["node_gpu_bytes"] = [apps[n.proc.pid]["used_bytes"] if n.proc.pid in apps else None for n in nodes]
        out["client_gpu_bytes"] = apps.get(os.getpid(), {}).get("used_bytes")
        out["gpu_apps"] = list(apps.values())
        out["device_used_bytes"] = _device_used(args.client_device)
        out["client_memory"] = _memory(args.client_device)
    finally:
        stop_nodes([*nodes, bootstrap])
        shutil.rmtree(tmp, ignore_errors=True)  # the nodes' identity keys
    return out


PHASES = {
    "bandwidth": phase_bandwidth,
    "hf_eager": phase_hf_eager,
    "hf_compile": phase_hf_compile,
    "ours_local": phase_ours_local,
    "pipeline": phase_pipeline,
}


# --- the parent's side -----------------------------------------------------------------------


def run_phase(phase: str, timeout: float, **options) -> dict | None:
    """Run one phase in a child process group; its result, or None when it failed or overran
    `timeout` (then the child and every node it started are killed)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as file:
        result = Path(file.name)
    argv = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--result", str(result)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    say(f"[{phase}] up to {timeout:.0f} s")
    begin = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    try:
        code = child.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        say(f"[{phase}] overran {timeout:.0f} s: killed")
        _kill_group(child)
        return None
    finally:
        _kill_group(child)  # nodes a failed phase left behind
    try:
        if code != 0:
            say(f"[{phase}] failed with exit code {code}")
            return None
        out = json.loads(result.read_text())
        out["phase_s"] = time.perf_counter() - begin
        return out
    finally:
        result.unlink(missing_ok=True)


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="one phase of the GPU benchmarks (run by gpu_decode.py / gpu_pipeline.py)")
    parser.add_argument("--phase", choices=sorted(PHASES), required=True)
    parser.add_argument("--result", type=Path, required=True, help="where to write the phase's JSON")
    parser.add_argument("--model", help="checkpoint directory")
    parser.add_argument("--device", default="cuda", help="device of a one-process phase")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per measured run")
    parser.add_argument("--warmup-tokens", type=int, default=16, help="transformers eager: tokens of its warm-up run (the others warm up with a full run)")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--node-devices", default="cuda", help="pipeline: one node per entry, comma-separated (cuda,cuda or cuda:0,cuda:1)")
    parser.add_argument("--client-device", default="cuda", help="pipeline: where the client's head runs")
    parser.add_argument("--sessions", type=int, default=16, help="pipeline: concurrent sessions of the aggregate run (1: none)")
    parser.add_argument("--max-length", type=int, default=1024, help="pipeline: the nodes' --max-length")
    parser.add_argument("--node-timeout", type=float, default=300.0, help="pipeline: seconds for the nodes to load")
    parser.add_argument("--pin", choices=("visible", "device"), default="visible", help="pipeline: a node for cuda:N runs with CUDA_VISIBLE_DEVICES=N and --device cuda (visible), or with --device cuda:N (device)")
    args = parser.parse_args()
    out = PHASES[args.phase](args)
    args.result.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
