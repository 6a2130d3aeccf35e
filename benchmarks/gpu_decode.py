"""Decode speed on one GPU: transformers' anchors, our single process, our 2-node pipeline.

In one run, on one device, with a random-weight checkpoint (benchmarks/random_llama.py;
its tokenizer is a stand-in, so the text is meaningless and only speed counts):

1. transformers eager `generate`, batch 1;
2. transformers static cache + torch.compile, batch 1 (compile time reported apart);
3. our single-process decode: `LocalModel` on the device + `stream_tokens`;
4. our 2-node pipeline on the same device: two real `swarm-node --device D` processes
   (blocks 0:L/2 and L/2:L) driven by the real client `SwarmModel` with its head on D,
   one session; then
5. 16 concurrent sessions through it (tokens/s summed over sessions, and its ratio
   to one session);
6. GPU memory per node; the roofline: checkpoint bytes / measured copy bandwidth
   (every weight read once per token: the batch-1 limit).

Each phase runs in its own process with a time limit (benchmarks/gpu_phases.py) and
the whole run within `--budget` seconds (our phases first, the anchors after, the
compile last): on an H100 the 8b shape takes about 5-7 minutes. A phase that fails
or overruns is reported as missing and the rest still run.

Run (on the GPU box): `python benchmarks/random_llama.py --shape 8b --out /dev/shm/llama8b --device cuda`
then `python benchmarks/gpu_decode.py --model /dev/shm/llama8b`.
Check on a CPU: `--shape tiny --device cpu` (builds a tiny checkpoint in a temporary directory).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from benchmarks.gpu_phases import checkpoint_bytes, run_phase, say  # noqa: E402

# phase -> its own time limit (seconds); the run's --budget caps the sum
LIMITS = {"bandwidth": 60, "ours_local": 240, "pipeline": 300, "hf_eager": 150, "hf_compile": 300}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def limit(self, phase: str) -> float:
        return min(LIMITS[phase], self.deadline - time.monotonic())


def memory_note(node_info: dict) -> dict:
    """What a node's /info says of its memory, whatever the keys (they are the engine's to name)."""
    return {k: v for k, v in node_info.items() if any(w in k for w in ("memory", "cuda", "gpu", "pool", "graph")) and not isinstance(v, (dict, list))}


def report_pipeline(pipe: dict | None, base: dict, local_tok_s: float | None, device: str, label: str) -> None:
    """Emit the pipeline phase's figures: one session, its ratio to the single process, N sessions, memory."""
    if pipe is None:
        say(f"{label}: no result")
        return
    p = {**base, "spans": [f"{a}:{b}" for a, b in pipe["spans"]], "node_devices": pipe["node_devices"], "client": "SwarmModel, head on " + base.get("client_device", device)}
    one = pipe["one_session_tok_s"]
    emit(f"{label}_1_session_tokens_per_s", one, "tokens/s", {**p, "runs": pipe["one_session_runs_tok_s"]}, device)
    emit(f"{label}_1_session_ttft_s", pipe["one_session_ttft_s"], "s", p, device)
    if local_tok_s:
        emit(f"{label}_vs_single_process", one / local_tok_s, "ratio", p, device, human=f"{label}: 1 session {one:.1f} tok/s = {one / local_tok_s:.2f}x our single process (aim >= 0.85)")
    if "many_sum_tok_s" in pipe:
        n = pipe["sessions"]
        emit(f"{label}_{n}_sessions_tokens_per_s", pipe["many_sum_tok_s"], "tokens/s", {**p, "sessions": n}, device)
        emit(f"{label}_{n}_sessions_wall_tokens_per_s", pipe["many_wall_tok_s"], "tokens/s", {**p, "sessions": n, "note": "all tokens / wall time, opening and prefill included"}, device)
        emit(f"{label}_{n}_sessions_vs_1", pipe["many_sum_tok_s"] / one, "ratio", {**p, "sessions": n}, device, human=f"{label}: {n} sessions {pipe['many_sum_tok_s']:.1f} tok/s summed = {pipe['many_sum_tok_s'] / one:.2f}x one session (slowest session {pipe['many_min_session_tok_s']:.1f} tok/s)")
    # Per node: nvidia-smi's figure for its process; else, with one node per GPU, what its GPU lost
    # to it by its ready line (containers often hide processes from nvidia-smi).
    loaded = pipe.get("nodes_loaded_device_bytes") or []
    devices = pipe["node_devices"]
    own_gpu = len(set(devices)) == len(devices) and all(d.startswith("cuda:") for d in devices)
    for index, (span, used) in enumerate(zip(pipe["spans"], pipe["node_gpu_bytes"])):
        info = memory_note(pipe["node_info"][index])
        where = {**p, "span": f"{span[0]}:{span[1]}", **info}
        if used is not None:
            emit(f"{label}_node{index}_gpu_memory", used / 2**30, "GiB", {**where, "source": "nvidia-smi"}, device)
        elif own_gpu and int(devices[index].split(":")[1]) < len(loaded):
            at_ready = loaded[int(devices[index].split(":")[1])]
            emit(f"{label}_node{index}_gpu_memory", at_ready / 2**30, "GiB", {**where, "source": "its GPU's memory in use, before the node started and at its ready line"}, device)
        else:
            say(f"{label}: node {index} ({span[0]}:{span[1]}): nvidia-smi shows no per-process figure; /info: {info or 'nothing on memory'}")
    if pipe.get("nodes_loaded_device_bytes"):
        gib = [round(b / 2**30, 2) for b in pipe["nodes_loaded_device_bytes"]]
        emit(f"{label}_nodes_gpu_memory_at_ready", sum(pipe["nodes_loaded_device_bytes"]) / 2**30, "GiB", {**p, "per_device_gib": gib, "note": "device memory the nodes took by their ready line (weights, KV pool, contexts), all nodes together"}, device)
    if pipe.get("device_used_bytes"):
        emit(f"{label}_device_memory_used", sum(pipe["device_used_bytes"]) / 2**30, "GiB", {**p, "per_device_gib": [round(b / 2**30, 2) for b in pipe["device_used_bytes"]], "note": "all nodes and the client together"}, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (benchmarks/random_llama.py); default: build --shape in a temporary directory")
    parser.add_argument("--shape", default="tiny", help="with no --model: the shape to build (tiny for a CPU check)")
    parser.add_argument("--device", default="cuda", help="the one device everything runs on (default cuda; cpu for a check)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per measured run (default 128)")
    parser.add_argument("--warmup-tokens", type=int, default=16)
    parser.add_argument("--trials", type=int, default=2, help="measured runs per path; the best counts (default 2)")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent sessions of the aggregate run (default 16)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    parser.add_argument("--skip", default="", help="comma-separated phases to leave out: " + ",".join(LIMITS))
    args = parser.parse_args()
    budget = Budget(args.budget)
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="gpu-decode-") as scratch:
        model = args.model
        if model is None:
            from benchmarks.random_llama import build

            model = Path(scratch) / args.shape
            say(f"building a random {args.shape} checkpoint in {model}")
            build(model, args.shape, args.device, 1)
        run(args, model, budget, skip)


def run(args, model: Path, budget: Budget, skip: set[str]) -> None:
    from swarm.model import open_checkpoint

    with open_checkpoint(model) as checkpoint:
        config = checkpoint.config
    weight_bytes = checkpoint_bytes(model)
    device = args.device
    common = {"model": str(model), "shape": f"L{config.num_layers}-d{config.hidden_size}-v{config.vocab_size}", "dtype": args.dtype, "tokens": args.tokens, "tokenizer": "stand-in word-level"}
    one = {"model": str(model), "device": device, "dtype": args.dtype, "tokens": args.tokens, "warmup_tokens": args.warmup_tokens, "trials": args.trials}
    results: dict[str, dict | None] = {}

    def phase(name: str, **options) -> dict | None:
        if name in skip:
            return None
        limit = budget.limit(name)
        if limit < 15:
            say(f"[{name}] skipped: the budget is spent")
            return None
        results[name] = run_phase(name, limit, **options)
        return results[name]

    bw = phase("bandwidth", device=device)
    roofline = None
    if bw:
        roofline = bw["copy_bytes_per_s"] / weight_bytes
        emit("copy_bandwidth", bw["copy_bytes_per_s"] / 1e9, "GB/s", common, device)
        emit("roofline_batch1_tokens_per_s", roofline, "tokens/s", {**common, "weight_bytes": weight_bytes}, device, human=f"roofline: {weight_bytes / 1e9:.2f} GB of weights at {bw['copy_bytes_per_s'] / 1e12:.2f} TB/s = {roofline:.1f} tokens/s")
    local = phase("ours_local", **one)
    if local:
        emit("ours_single_process_tokens_per_s", local["decode_tok_s"], "tokens/s", {**common, "runs": local["runs_tok_s"]}, device, human=f"ours, single process: {local['decode_tok_s']:.1f} tokens/s (aim >= 150 on an H100)")
        emit("ours_single_process_ttft_s", local["ttft_s"], "s", common, device)
        emit("ours_single_process_load_s", local["load_s"], "s", common, device)
        emit("ours_single_process_cold_tokens_per_s", local["cold_tok_s"], "tokens/s", {**common, "note": "the first run: graph captures included"}, device)
        if roofline:
            emit("ours_single_process_vs_roofline", local["decode_tok_s"] / roofline, "ratio", common, device)
        if "max_allocated_bytes" in local:
            emit("ours_single_process_gpu_memory", local["max_reserved_bytes"] / 2**30, "GiB", common, device)
    pipe = phase("pipeline", model=model, node_devices=f"{device},{device}", client_device=device, dtype=args.dtype, tokens=args.tokens, warmup_tokens=args.warmup_tokens, trials=args.trials, sessions=args.sessions, max_length=1024)
    report_pipeline(pipe, {**common, "client_device": device}, local and local["decode_tok_s"], device, "pipeline_2_nodes_1_gpu")
    eager = phase("hf_eager", **one)
    if eager:
        emit("transformers_eager_tokens_per_s", eager["decode_tok_s"], "tokens/s", {**common, "runs": eager["runs_tok_s"]}, device)
    compiled = phase("hf_compile", **one)
    if compiled:
        name = "transformers_static_compile_tokens_per_s" if compiled["compiled"] else "transformers_static_tokens_per_s"
        emit(name, compiled["decode_tok_s"], "tokens/s", {**common, "runs": compiled["runs_tok_s"], "compiled": compiled["compiled"]}, device)
        emit("transformers_compile_warmup_s", compiled["warmup_s"], "s", {**common, "note": "first generate: compile + graph capture"}, device)
    summary(results, roofline, args, device)


def summary(results: dict, roofline: float | None, args, device: str) -> None:
    def cell(phase: str, key: str) -> str:
        r = results.get(phase)
        return f"{r[key]:.1f}" if r and key in r else "-"

    lines = [
        f"summary ({device}, {args.dtype}, {args.tokens} tokens a run; the tokenizer is a stand-in):",
        f"  roofline (weights / copy bandwidth)      {roofline:.1f} tok/s" if roofline else "  roofline                                  -",
        f"  transformers eager, batch 1              {cell('hf_eager', 'decode_tok_s')} tok/s",
        f"  transformers static {'+ compile' if (results.get('hf_compile') or {}).get('compiled') else '(no compile)'}, batch 1   {cell('hf_compile', 'decode_tok_s')} tok/s (warmup {cell('hf_compile', 'warmup_s')} s)",
        f"  ours, single process                     {cell('ours_local', 'decode_tok_s')} tok/s",
        f"  ours, 2 nodes on the device, 1 session   {cell('pipeline', 'one_session_tok_s')} tok/s",
        f"  ours, 2 nodes, {args.sessions} sessions summed        {cell('pipeline', 'many_sum_tok_s')} tok/s",
    ]
    missing = [name for name, r in results.items() if r is None]
    if missing:
        lines.append(f"  failed or overran: {', '.join(missing)}")
    say("\n".join(lines))


if __name__ == "__main__":
    main()
