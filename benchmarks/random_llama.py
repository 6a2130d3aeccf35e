"""Build a random-weight Llama-3-shaped bf16 checkpoint (HF safetensors) for speed runs.

The weights are drawn on the device (`torch.randn`, std 0.02; norms are ones),
one safetensors shard per block plus one for the embeddings, final norm and LM
head, with `model.safetensors.index.json` and `config.json`, so
`swarm.model.open_checkpoint` (SafetensorsCheckpoint), our nodes and
transformers all read it. Big shapes are written by several worker processes at
once (one per GPU where there are several; `--workers`), with progress on stderr.

The tokenizer is a STAND-IN (tests/random_checkpoint.py: a word-level vocabulary
of the shape's size with made-up words and a chat template): fine for tokens/s,
meaningless as text. Every output says so.

Shapes: `tiny` (a few MB, for checking the scripts on a CPU), `8b` (Llama-3-8B:
16.06 GB), `70b` (Llama-3-70B: 141.1 GB).

Run: `python benchmarks/random_llama.py --shape 8b --out /dev/shm/llama8b --device cuda`.
A directory already holding a complete build of the same shape is kept (`--force` rebuilds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402

STD = 0.02
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_position: int = 8192
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_tensors(self, i: int) -> dict[str, tuple[int, ...]]:
        d, kv, ff = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        p = f"model.layers.{i}."
        return {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (ff, d),
            p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
        }

    def head_tensors(self) -> dict[str, tuple[int, ...]]:
        return {"model.embed_tokens.weight": (self.vocab, self.hidden), "model.norm.weight": (self.hidden,), "lm_head.weight": (self.vocab, self.hidden)}

    def total_bytes(self) -> int:
        shapes = [s for i in range(self.layers) for s in self.block_tensors(i).values()] + list(self.head_tensors().values())
        return 2 * sum(_numel(s) for s in shapes)


SHAPES = {
    # small enough for a CPU check of every script (vocab 1024 holds the stand-in tokenizer's words)
    "tiny": Shape(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=704, vocab=1024),
    "8b": Shape(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "70b": Shape(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=128256),
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def hf_config(shape: Shape, name: str) -> dict:
    """config.json as Llama 3.1 writes it (llama3 rope scaling), in the classic keys both
    transformers 4 and 5 and swarm.model.config read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.max_position,
        "rms_norm_eps": 1e-5,
        "rope_theta": shape.rope_theta,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,  # tests/random_checkpoint.SPECIAL_TOKENS order
        "eos_token_id": 4,
        "torch_dtype": "bfloat16",
        "layerswarm_random_weights": {"shape": name, "std": STD, "tokenizer": "stand-in word-level (made-up words)"},
    }


def shard_names(shape: Shape) -> list[str]:
    """One shard per block, then the head's."""
    count = shape.layers + 1
    return [f"model-{n:05d}-of-{count:05d}.safetensors" for n in range(1, count + 1)]


# --- the worker side: one shard per task ---------------------------------------------------

_DEVICE: str = "cpu"


def _init_worker(device: str, counter, gpus: int) -> None:
    """Give this worker its device: round robin over the GPUs when `device` is plain cuda."""
    global _DEVICE  # per worker process, set once by the pool's initializer
    if device == "cuda" and gpus > 1:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        device = f"cuda:{index % gpus}"
    _DEVICE = device


def write_shard(out: str, filename: str, tensors: dict[str, tuple[int, ...]], seed: int) -> tuple[str, dict[str, int]]:
    """Draw `tensors` on this worker's device and write them to out/filename (via a temporary name)."""
    import torch
    from safetensors.torch import save_file

    device = torch.device(_DEVICE)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    drawn = {}
    for name, shape in tensors.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            tensor = torch.randn(shape, generator=generator, dtype=torch.bfloat16, device=device).mul_(STD)
        drawn[name] = tensor.cpu()
    target = Path(out) / filename
    partial = target.with_suffix(".partial")
    save_file(drawn, str(partial), metadata={"format": "pt"})
    os.replace(partial, target)
    return filename, {name: t.nbytes for name, t in drawn.items()}


# --- the parent ------------------------------------------------------------------------------


def is_complete(out: Path, shape: Shape, name: str) -> bool:
    """Whether `out` holds a finished build of this shape (the index is written last)."""
    try:
        config = json.loads((out / "config.json").read_text())
        index = json.loads((out / INDEX).read_text())
    except (OSError, ValueError):
        return False
    return config.get("layerswarm_random_weights", {}).get("shape") == name and all((out / f).is_file() for f in set(index["weight_map"].values()))


def build(out: Path, name: str, device: str = "cpu", workers: int = 1, seed: int = 0, progress=None) -> dict:
    """Write the checkpoint; returns {"bytes", "seconds", "shards"}. `progress(done, total, bytes)` after each shard."""
    import multiprocessing

    shape = SHAPES[name]
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # an index marks a finished build: none until this one is
    names = shard_names(shape)
    tasks = [(names[i], shape.block_tensors(i), seed * 1_000_003 + i) for i in range(shape.layers)]
    tasks.append((names[-1], shape.head_tensors(), seed * 1_000_003 + shape.layers))
    gpus = 0
    if device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
    weight_map: dict[str, str] = {}
    total = 0
    begin = time.perf_counter()
    # The head's shard is the biggest (2 x vocab x hidden): start it first so it does not finish last alone.
    tasks.sort(key=lambda t: -sum(_numel(s) for s in t[1].values()))
    if workers <= 1:
        _init_worker(device, None, 0)
        results = (write_shard(str(out), *task) for task in tasks)
        for done, (filename, sizes) in enumerate(results, 1):
            total += sum(sizes.values())
            weight_map.update(dict.fromkeys(sizes, filename))
            if progress:
                progress(done, len(tasks), total)
    else:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        counter = context.Value("i", 0)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(device, counter, gpus)) as pool:
            pending = {pool.submit(write_shard, str(out), *task) for task in tasks}
            done_count = 0
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    filename, sizes = future.result()  # a worker's error stops the build here
                    done_count += 1
                    total += sum(sizes.values())
                    weight_map.update(dict.fromkeys(sizes, filename))
                    if progress:
                        progress(done_count, len(tasks), total)
    assert total == shape.total_bytes(), (total, shape.total_bytes())
    (out / "config.json").write_text(json.dumps(hf_config(shape, name), indent=1) + "\n")
    from tests.random_checkpoint import write_standin_tokenizer

    write_standin_tokenizer(out, shape.vocab, shape.max_position)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return {"bytes": total, "seconds": time.perf_counter() - begin, "shards": len(tasks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True, help="tiny (CPU checks), 8b (Llama-3-8B, 16 GB) or 70b (Llama-3-70B, 141 GB)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (e.g. /dev/shm/llama8b)")
    parser.add_argument("--device", default="cpu", help="where to draw the weights: cpu, cuda (workers spread over all GPUs) or cuda:N (default cpu)")
    parser.add_argument("--workers", type=int, default=None, help="processes drawing and writing shards at once (default: 1 on cpu; on cuda 4 per GPU, 4 to 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT holds a complete build of this shape")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if not args.force and is_complete(args.out, shape, args.shape):
        say(f"{args.out} already holds a complete {args.shape} build (--force rebuilds); tokenizer is a stand-in")
        return
    workers = args.workers
    if workers is None:
        if args.device.startswith("cuda"):
            import torch

            # writing to the target (tmpfs or disk) is the limit: several writers per GPU
            workers = min(16, max(4, 4 * torch.cuda.device_count())) if args.device == "cuda" else 4
        else:
            workers = 1
    say(f"building a random {args.shape} checkpoint ({shape.total_bytes() / 1e9:.2f} GB bf16) in {args.out} on {args.device} with {workers} worker(s)")
    started = time.perf_counter()

    def show(done: int, count: int, written: int) -> None:
        elapsed = time.perf_counter() - started
        say(f"  shard {done}/{count}: {written / 1e9:.2f} GB in {elapsed:.1f} s ({written / 1e9 / max(elapsed, 1e-9):.2f} GB/s)")

    result = build(args.out, args.shape, args.device, workers, args.seed, show)
    say(f"done: {result['bytes'] / 1e9:.2f} GB in {result['seconds']:.1f} s; the tokenizer is a STAND-IN (word-level, made-up words)")
    params = {"shape": args.shape, "workers": workers, "bytes": result["bytes"], "out": str(args.out), "tokenizer": "stand-in word-level", **asdict(shape)}
    emit("random_checkpoint_build_s", result["seconds"], "s", params, args.device)


if __name__ == "__main__":
    main()
