"""Our pipeline across the GPUs of one host: one `swarm-node` per GPU, the real client on GPU 0.

- `--shape 8b --gpus 2`: blocks 0:16 on cuda:0 and 16:32 on cuda:1, against our
  single-process decode on one GPU measured in the same run (aim: at least 0.85x).
- `--shape 70b --gpus 4`: 20 blocks per GPU, against the roofline, checkpoint bytes /
  one GPU's measured copy bandwidth: every weight is read once per token, one GPU
  after another, so the pipeline's batch-1 limit is that of one GPU holding it all
  (~21 tokens/s on H100s; aim: at least 15). A 70B model fits no one GPU: no
  single-process figure.

Batch 1 (one session) and `--sessions` concurrent sessions (default 8). Every phase
runs in its own process with a time limit (benchmarks/gpu_phases.py).

Run (on the GPU box, checkpoint built first with benchmarks/random_llama.py):
  python benchmarks/gpu_pipeline.py --shape 8b --gpus 2 --model /dev/shm/llama8b
  python benchmarks/gpu_pipeline.py --shape 70b --gpus 4 --model /dev/shm/llama70b
Check on a CPU: `--shape tiny --gpus 2 --device cpu` (a tiny checkpoint in a temporary directory).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from benchmarks.gpu_decode import report_pipeline  # noqa: E402
from benchmarks.gpu_phases import checkpoint_bytes, run_phase, say  # noqa: E402

# a checkpoint bigger than this gets no single-process run (an H100 holds 80 GB)
SINGLE_GPU_BYTES = 60e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=("tiny", "8b", "70b"), help="the checkpoint's shape (names the figures; tiny: built here)")
    parser.add_argument("--model", type=Path, help="checkpoint directory (benchmarks/random_llama.py); required but for tiny")
    parser.add_argument("--gpus", type=int, required=True, help="nodes, one per GPU (cuda:0 .. cuda:N-1)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script: every node on the CPU")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per measured run (default 128)")
    parser.add_argument("--warmup-tokens", type=int, default=16)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions of the aggregate run (default 8)")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run (default 570)")
    parser.add_argument("--node-timeout", type=float, default=None, help="seconds for the nodes to load (default 300; 900 for 70b)")
    parser.add_argument(
        "--pin",
        choices=("visible", "device"),
        default="visible",
        help="visible (default): the node of GPU N runs with CUDA_VISIBLE_DEVICES=N and --device cuda; device: with --device cuda:N, "
        "which needs every stream, event and graph of the node made on its device",
    )
    args = parser.parse_args()
    if args.model is None and args.shape != "tiny":
        parser.error("--model is required for the 8b and 70b shapes: build it first with benchmarks/random_llama.py")
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as scratch:
        model = args.model
        if model is None:
            from benchmarks.random_llama import build

            model = Path(scratch) / "tiny"
            build(model, "tiny", "cpu", 1)
        run(args, model)


def run(args, model: Path) -> None:
    deadline = time.monotonic() + args.budget
    left = lambda cap: min(cap, deadline - time.monotonic())  # noqa: E731
    cuda = args.device.startswith("cuda")
    first = "cuda:0" if cuda else args.device
    devices = [f"cuda:{i}" for i in range(args.gpus)] if cuda else [args.device] * args.gpus
    weight_bytes = checkpoint_bytes(model)
    common = {"model": str(model), "shape": args.shape, "gpus": args.gpus, "dtype": args.dtype, "tokens": args.tokens, "tokenizer": "stand-in word-level", "pin": args.pin}

    bw = run_phase("bandwidth", left(60), device=first)
    roofline = None
    if bw:
        roofline = bw["copy_bytes_per_s"] / weight_bytes
        emit("copy_bandwidth", bw["copy_bytes_per_s"] / 1e9, "GB/s", {**common, "device": first}, first)
        emit("roofline_batch1_tokens_per_s", roofline, "tokens/s", {**common, "weight_bytes": weight_bytes}, first, human=f"roofline: {weight_bytes / 1e9:.1f} GB at {bw['copy_bytes_per_s'] / 1e12:.2f} TB/s = {roofline:.1f} tokens/s")
    local = None
    if weight_bytes <= SINGLE_GPU_BYTES:
        one = {"model": model, "device": first, "dtype": args.dtype, "tokens": args.tokens, "warmup_tokens": args.warmup_tokens, "trials": args.trials}
        local = run_phase("ours_local", left(240), **one)
        if local:
            emit("ours_single_process_1_gpu_tokens_per_s", local["decode_tok_s"], "tokens/s", {**common, "gpus": 1, "runs": local["runs_tok_s"]}, first)
    else:
        say(f"{weight_bytes / 1e9:.0f} GB fits no one GPU: no single-process figure; the pipeline is compared with the roofline")
    node_timeout = args.node_timeout or (900.0 if weight_bytes > SINGLE_GPU_BYTES else 300.0)
    pipe = run_phase(
        "pipeline", left(node_timeout + 300), model=model, node_devices=",".join(devices), client_device=first, dtype=args.dtype,
        tokens=args.tokens, warmup_tokens=args.warmup_tokens, trials=args.trials, sessions=args.sessions, max_length=1024, node_timeout=node_timeout,
        pin=args.pin,
    )  # fmt: skip
    label = f"pipeline_{args.gpus}_nodes_{args.gpus}_gpus"
    report_pipeline(pipe, {**common, "client_device": first}, local and local["decode_tok_s"], first, label)
    if pipe and roofline:
        one = pipe["one_session_tok_s"]
        emit(f"{label}_vs_roofline", one / roofline, "ratio", common, first, human=f"{label}: 1 session {one:.1f} tok/s = {one / roofline:.2f}x the roofline {roofline:.1f} tok/s")
    lines = [f"summary ({args.shape}, {args.gpus} x {first.split(':')[0]}, {args.dtype}, {args.tokens} tokens a run; the tokenizer is a stand-in):"]
    lines.append(f"  roofline (weights / one GPU's copy bandwidth)  {roofline:.1f} tok/s" if roofline else "  roofline  -")
    lines.append(f"  ours, single process on one GPU                {local['decode_tok_s']:.1f} tok/s" if local else "  ours, single process on one GPU                -")
    if pipe:
        lines.append(f"  ours, {args.gpus} nodes on {args.gpus} GPUs, 1 session          {pipe['one_session_tok_s']:.1f} tok/s")
        if "many_sum_tok_s" in pipe:
            lines.append(f"  ours, {args.gpus} nodes, {pipe['sessions']} sessions summed            {pipe['many_sum_tok_s']:.1f} tok/s")
    else:
        lines.append("  pipeline: failed or overran")
    say("\n".join(lines))


if __name__ == "__main__":
    main()
