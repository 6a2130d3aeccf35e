"""The decode engine alone (swarm/model/engine.py) against the eager ragged path, on one device.

Random weights of a Llama shape are made in memory on the device (no checkpoint,
no tokenizer): this isolates the blocks' step time from everything around it.
Reports, per batch size, the step time of the engine (CUDA graphs over the KV
pool) and tokens/s, the time of a verify step (one session's token and drafts,
2-16 rows) against a one-token step, the eager ragged path at batch 1 for comparison, and the
roofline: weight bytes / measured copy bandwidth.

Run: `python benchmarks/engine_decode.py [--shape 8b|tiny] [--device cuda] [--context 256] [--quant int8]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from swarm.model.block import Block, Segment, Span, rope_inv_freq  # noqa: E402
from swarm.model.config import ModelConfig, RopeScaling  # noqa: E402
from swarm.model.engine import DecodeEngine  # noqa: E402

SHAPES = {
    "8b": dict(num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=128256),
    "tiny": dict(num_layers=4, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2, vocab_size=512),
}


def random_span(shape: str, device: str, dtype: torch.dtype, quant: str = "none") -> Span:
    config = ModelConfig(
        "llama", rope_theta=500000.0, max_position=8192, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), **SHAPES[shape]
    )
    c, blocks = config, []
    for _ in range(c.num_layers):
        def w(*size):
            return torch.randn(*size, device=device, dtype=dtype) * 0.02

        weights = {
            "wq": w(c.q_size, c.hidden_size), "wk": w(c.kv_size, c.hidden_size), "wv": w(c.kv_size, c.hidden_size),
            "wo": w(c.hidden_size, c.q_size), "w_gate": w(c.intermediate_size, c.hidden_size),
            "w_up": w(c.intermediate_size, c.hidden_size), "w_down": w(c.hidden_size, c.intermediate_size),
            "attn_norm": torch.ones(c.hidden_size, device=device, dtype=dtype), "mlp_norm": torch.ones(c.hidden_size, device=device, dtype=dtype),
        }
        blocks.append(Block(config, weights, quant))  # int8: quantized here, one block at a time
    return Span(config, 0, c.num_layers, blocks, rope_inv_freq(config).to(device))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes/s a device-to-device copy of 2 GiB moves, counting read and write."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        sync(device)
        begin = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - begin))
    return best


def time_steps(step, count: int, device: str) -> float:
    """Median seconds of `step(i)` over `count` runs after 3 warm-ups."""
    for i in range(3):
        step(i)
    times = []
    for i in range(count):
        sync(device)
        begin = time.perf_counter()
        step(3 + i)
        sync(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def profile(engine: DecodeEngine, context: int, device: str) -> None:
    """The kernels of one eager (uncaptured) batch-1 decode, summed by name."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine._pos[:1].fill_(context)
        engine._decode(1, 64 * ((context + 64) // 64), (engine.span.start, engine.span.end))
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), file=sys.stderr)


def token_loop(engine: DecodeEngine, cache, args, params: dict, variant: str) -> None:
    """Greedy decode of one session with a random head on the device, as a local run does it:
    embed the token, the blocks, final norm and LM head, argmax, read the id back."""
    c, device = engine.span.config, args.device
    embed = torch.randn(c.vocab_size, c.hidden_size, device=device, dtype=engine.span.dtype) * 0.02
    lm_head, norm = embed.clone(), torch.ones(c.hidden_size, device=device, dtype=engine.span.dtype)
    token, position = 0, args.context

    def step(i):
        nonlocal token, position
        hidden = engine.forward(embed[token : token + 1], [Segment(cache, args.context + (i % args.steps), 1)])
        h = torch.nn.functional.rms_norm(hidden, (c.hidden_size,), norm, c.rms_eps)
        token = int(torch.nn.functional.linear(h, lm_head).argmax())

    seconds = time_steps(step, args.steps, device)
    emit("engine_decode.token_step", seconds * 1e3, "ms", dict(params, variant=variant), device,
         f"engine {variant} + head on the device, one session: {seconds * 1e3:.2f} ms/token, {1 / seconds:.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=256, help="tokens already in each session's cache")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default="sdpa", help="comma-separated: sdpa, matmul, sdpa+compile, matmul+compile")
    parser.add_argument("--profile", action="store_true", help="print the GPU kernels of one eager batch-1 step, by time")
    parser.add_argument("--quant", choices=("none", "int8"), default="none", help="int8: weight-only int8 projections (swarm/model/quant.py)")
    args = parser.parse_args()
    device, dtype = args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with torch.inference_mode():
        span = random_span(args.shape, device, dtype, args.quant)
    params = {"shape": args.shape, "dtype": str(dtype).removeprefix("torch."), "context": args.context, "precision": span.precision}
    roofline_s = span.weight_bytes / copy_bandwidth(device) if device.startswith("cuda") else 0.0
    hidden = span.config.hidden_size

    cache = span.new_cache(args.context + args.steps + 8)
    x = torch.randn(1, hidden, device=device, dtype=dtype)
    span(torch.randn(args.context, hidden, device=device, dtype=dtype), [Segment(cache, 0, args.context)])
    eager = time_steps(lambda i: span(x, [Segment(cache, args.context + i, 1)]), args.steps, device)
    emit("engine_decode.eager_step", eager * 1e3, "ms", dict(params, batch=1), device, f"eager ragged path, batch 1: {eager * 1e3:.2f} ms/step ({1 / eager:.1f} tok/s)")
    del cache

    batches = [int(b) for b in args.batches.split(",")]
    best = None
    for variant in args.variants.split(","):
        attention, compiled = variant.split("+")[0], True if variant.endswith("+compile") else False if variant.endswith("+eager") else None
        begin = time.perf_counter()
        engine = DecodeEngine(span, max(batches), args.context + args.steps + 8, attention=attention, compile=compiled)
        caches = [engine.open(args.context + args.steps + 8) for _ in range(max(batches))]
        prompt = torch.randn(args.context, hidden, device=device, dtype=dtype)
        for cache in caches:
            engine.forward(prompt, [Segment(cache, 0, args.context)])
        one = None
        for batch in batches:
            xs = torch.randn(batch, hidden)

            def step(i, batch=batch, xs=xs, engine=engine, caches=caches):
                engine.decode_host(xs, caches[:batch], [args.context + i] * batch)

            seconds = time_steps(step, args.steps, device)
            one = one or seconds
            emit(
                "engine_decode.graph_step", seconds * 1e3, "ms", dict(params, batch=batch, variant=variant), device,
                f"engine {variant}, batch {batch}: {seconds * 1e3:.2f} ms/step, {batch / seconds:.0f} tok/s ({seconds / one:.2f}x batch 1's step)",
            )
        for rows in (2, 4, 8, 16):  # speculative steps: a token and its drafts, one session, rewinding each time
            xs = torch.randn(rows, hidden, device=device, dtype=dtype)
            seconds = time_steps(lambda i, xs=xs, rows=rows, engine=engine, cache=caches[0]: engine.forward(xs, [Segment(cache, args.context, rows)]), args.steps, device)
            emit(
                "engine_decode.verify_step", seconds * 1e3, "ms", dict(params, rows=rows, variant=variant), device,
                f"engine {variant}, verify step of {rows} rows: {seconds * 1e3:.2f} ms ({seconds / one:.2f}x a one-token step)",
            )
        print(f"  ({variant}: set-up and warm-up {time.perf_counter() - begin:.1f} s)", file=sys.stderr)
        if args.profile:
            profile(engine, args.context, device)
        if device.startswith("cuda"):
            token_loop(engine, caches[0], args, params, variant)
        best = min(best or one, one)
        del engine, caches
        torch._dynamo.reset()  # each variant compiles afresh, not against the last one's cache
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    one = best
    if roofline_s:
        emit("engine_decode.roofline_step", roofline_s * 1e3, "ms", params, device, f"roofline (weights / copy bandwidth): {roofline_s * 1e3:.2f} ms/step")
        emit("engine_decode.fraction_of_roofline", roofline_s / one, "ratio", params, device)
    emit("engine_decode.speedup_vs_eager", eager / one, "ratio", dict(params, batch=1), device)


if __name__ == "__main__":
    main()
