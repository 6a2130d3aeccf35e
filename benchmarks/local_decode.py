"""Single-process decode: our model core against transformers' `generate`, same weights, same run.

Decode on a CPU is bound by streaming every weight once per token, so besides the
ratio to transformers the figure that matters is the fraction of the bandwidth
limit: (weight bytes read per token) / (matrix-vector read bandwidth measured
here, in this run) gives the fastest possible step; we report our step against it.

Each side runs in its own child process (clean peak-memory figures, no shared
allocator state); the parent measures bandwidth and prints the ratios.

Run: `python benchmarks/local_decode.py [--model M] [--new-tokens 64] [--dtype float32]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import emit  # run as a script: benchmarks/ is on sys.path

PROMPT = "Write a long story about a dragon who learns to cook."


def measure_bandwidth(dtype_name: str, device: str = "cpu") -> float:
    """Best read bandwidth (bytes/s) of a matrix-vector product over matrices far larger than cache."""
    import torch

    dtype = getattr(torch, dtype_name)
    best = 0.0
    for rows, cols in ((576, 49152), (4096, 8192)):
        mats = [torch.randn(rows, cols, device=device).to(dtype) for _ in range(max(2, int(4e8 // (rows * cols * 4))))]
        x = torch.randn(1, rows, device=device).to(dtype)
        for m in mats:
            x @ m
        for _ in range(3):
            begin = time.perf_counter()
            for m in mats * 3:
                x @ m
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - begin
            best = max(best, sum(m.nbytes for m in mats) * 3 / elapsed)
    return best


def run_ours(model: str, dtype_name: str, new_tokens: int, trials: int) -> dict:
    import torch

    from client.generate import GenerationStats, LocalBlocks, stream_tokens_sync
    from client.local import LocalModel
    from client.sampling import SamplingParams

    begin = time.perf_counter()
    local = LocalModel.load(model, getattr(torch, dtype_name))
    load_s = time.perf_counter() - begin
    ids = local.head.encode_prompt(PROMPT, chat=True)
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False, speculate=False)
    runs = []
    for _ in range(trials):
        stats = GenerationStats()
        list(stream_tokens_sync(local.head, LocalBlocks(local.span, len(ids) + new_tokens), ids, params, stats))
        runs.append(stats)
    weight_bytes = local.span.weight_bytes + local.head.lm_head_t.nbytes
    best = max(runs, key=lambda s: s.decode_tokens_per_s)
    return {
        "load_s": load_s,
        "ttft_s": min(s.time_to_first_token_s for s in runs),
        "decode_tok_s": best.decode_tokens_per_s,
        "tokens": best.token_ids,
        "weight_bytes_per_token": weight_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "prompt_tokens": best.prompt_tokens,
    }


def run_transformers(model: str, dtype_name: str, new_tokens: int, trials: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from swarm.model import resolve_model

    hf_logging.disable_progress_bar()
    path = resolve_model(model)
    begin = time.perf_counter()
    kwargs = {"gguf_file": path.name} if path.is_file() else {}
    directory = str(path.parent if path.is_file() else path)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype_name), **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    load_s = time.perf_counter() - begin
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    best_decode, best_ttft, tokens = 0.0, float("inf"), []
    with torch.inference_mode():
        for _ in range(trials):
            begin = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - begin
            begin = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            total = time.perf_counter() - begin
            best_ttft = min(best_ttft, ttft)
            # decode rate over the steps after the first token, as for our side
            best_decode = max(best_decode, (new_tokens - 1) / max(total - ttft, 1e-9))
            tokens = out[0, ids.shape[1] :].tolist()
    return {
        "load_s": load_s,
        "ttft_s": best_ttft,
        "decode_tok_s": best_decode,
        "tokens": tokens,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def child(args: argparse.Namespace) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--side", args.side_to_run, "--model", args.model, "--dtype", args.dtype, "--new-tokens", str(args.new_tokens), "--trials", str(args.trials)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{args.side_to_run} side failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--side", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        runner = run_ours if args.side == "ours" else run_transformers
        print(json.dumps(runner(args.model, args.dtype, args.new_tokens, args.trials)))
        return

    print("measuring bandwidth, then our decode, then transformers' ...", file=sys.stderr)
    bandwidth = measure_bandwidth(args.dtype)
    args.side_to_run = "ours"
    ours = child(args)
    args.side_to_run = "transformers"
    theirs = child(args)
    params = {"model": args.model, "dtype": args.dtype, "new_tokens": args.new_tokens, "prompt_tokens": ours["prompt_tokens"]}
    limit_tok_s = bandwidth / ours["weight_bytes_per_token"]
    emit("matvec_bandwidth", bandwidth / 1e9, "GB/s", params)
    emit("decode_tokens_per_s", ours["decode_tok_s"], "tokens/s", params)
    emit("decode_tokens_per_s_transformers", theirs["decode_tok_s"], "tokens/s", params)
    emit("decode_speedup_vs_transformers", ours["decode_tok_s"] / theirs["decode_tok_s"], "ratio", params, human=f"decode: {ours['decode_tok_s']:.1f} tok/s vs transformers {theirs['decode_tok_s']:.1f} tok/s = {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x")
    emit("decode_fraction_of_bandwidth_limit", ours["decode_tok_s"] / limit_tok_s, "ratio", params, human=f"bandwidth limit {limit_tok_s:.1f} tok/s ({ours['weight_bytes_per_token'] / 1e6:.0f} MB/token at {bandwidth / 1e9:.1f} GB/s): we reach {ours['decode_tok_s'] / limit_tok_s:.0%}")
    emit("time_to_first_token_s", ours["ttft_s"], "s", params)
    emit("time_to_first_token_ratio_vs_transformers", ours["ttft_s"] / theirs["ttft_s"], "ratio", params)
    emit("load_s", ours["load_s"], "s", params)
    emit("load_s_transformers", theirs["load_s"], "s", params)
    emit("peak_rss", ours["peak_rss_bytes"] / 2**20, "MiB", params)
    emit("peak_rss_transformers", theirs["peak_rss_bytes"] / 2**20, "MiB", params)
    same = ours["tokens"] == theirs["tokens"]
    emit("greedy_tokens_identical", float(same), "bool", params, human=f"greedy tokens identical to transformers: {same}")


if __name__ == "__main__":
    main()
