"""An edge box's view of `--quant int8`: decode speed, memory and accuracy against float32 and llama.cpp.

One run, on the default model (a GGUF of Q4_1 blocks), all on the CPU:

- decode tokens/s and RSS of a process that holds all blocks and the head and decodes greedily
  (our float32; our int8: int8 blocks and int8 LM head/embeddings; our q4_1: the GGUF's own Q4_1
  blocks and the int8 head), and of llama.cpp
  (`llama-cpp-python`) on the same GGUF with as many threads. Every timed thing runs in its own
  child process (one model per process, so RSS is honest), the variants alternate, repeats give
  medians. RSS is read after load (after `release_freed_memory`, as a node does) and after
  decode, current and peak (the peak is the loading transient); `baseline` is the process's RSS
  before it loads weights (python + torch), and the `_above_baseline` figures subtract it.
- accuracy: top-1 agreement with our float32 over every teacher-forced position of the plain
  English text below (int8, q4_1; their blocks with a float32 head; llama.cpp), and the greedy text of
  a few chat prompts, side by side.

The box may be shared: the 1-minute load average is printed before and after and kept in
every result's params.

    python -m benchmarks.edge [--threads N] [--new-tokens 64] [--repeats 3] [--no-llama] [--no-q4]

Results: JSON lines on stdout (benchmarks/common.py), progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import PROJECT, emit

# Plain English for teacher-forced agreement (written for this benchmark; no rights attached).
TEXT = """\
The lighthouse stood at the end of a long spit of sand, and for most of the year the only people who walked out to it were the keeper and the boy who brought his bread. In winter the wind came straight off the sea and pushed at the door so hard that the keeper had to lean on it with his shoulder to close it again. He did not mind. He had chosen the work because it was quiet, and because a light that has to be lit every evening gives a shape to the days that few other jobs can give.

Every morning he climbed the hundred and twelve steps to the lamp room, wiped the salt from the glass, trimmed the wick and wrote a line in the log: the weather, the ships he had seen, anything that had broken and anything he had mended. Most of the entries were short. Some days there was nothing to say except that the sky had been grey and the sea had been grey and the light had burned all night without a flicker. He wrote those days down too, because a record with gaps in it is worth less than a record of dull days.

The boy was called Tom, and he was eleven. He asked questions about everything: why the lens was made of rings of glass instead of one piece, why the light turned instead of simply shining, how far away a ship could be and still see it. The keeper answered as well as he could. The rings, he said, bend the light the way a thick lens would, but they weigh far less and do not crack in the cold. The light turns so that sailors can tell this lighthouse from the next one along the coast, by counting the seconds between the flashes. And on a clear night a ship twenty miles out can see it, though the curve of the earth hides the tower itself long before that.

One evening in March a storm came up faster than anyone expected. The rain was so heavy that the keeper could not see the end of the jetty from the window, and the radio crackled with messages from a fishing boat that had lost its engine near the rocks to the north. There was nothing he could do from the tower except keep the light burning and call the lifeboat station, so he did both, and then he sat by the radio and listened. At two in the morning the lifeboat found the fishing boat and towed it into the harbour. Nobody was hurt. The keeper wrote it all down in the log, in the same plain words he used for the quiet days, and then he went up the steps to wipe the salt from the glass.
"""

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]

VARIANTS = {  # name -> (block quant, head quant)
    "float32": ("none", "none"),
    "int8": ("int8", "int8"),
    "int8_blocks": ("int8", "none"),  # accuracy only: what the blocks alone cost
    "q4_1": ("q4_1", "int8"),  # the GGUF's own 4-bit blocks (--quant q4_1), with the int8 head
    "q4_1_blocks": ("q4_1", "none"),  # accuracy only
}


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---- workers: one model per process -------------------------------------------------------


def worker_ours(job: dict) -> dict:
    import torch

    from swarm.model import DEFAULT_MODEL, Segment, load_head, load_span, open_checkpoint
    from swarm.model.quant import release_freed_memory

    torch.set_num_threads(job["threads"])
    block_quant, head_quant = VARIANTS[job["variant"]]
    baseline = rss_now()
    with open_checkpoint(DEFAULT_MODEL) as checkpoint:
        span = load_span(checkpoint, 0, checkpoint.config.num_layers, quant=block_quant)
        head = load_head(checkpoint, quant=head_quant, tokenizer=False)
    release_freed_memory()
    out = {"baseline": baseline, "after_load": rss_now(), "peak_after_load": rss_peak(), "weight_bytes": span.weight_bytes + head.weight_bytes}

    @torch.inference_mode()
    def greedy(ids: list[int], new: int) -> tuple[list[int], float]:
        cache = span.new_cache(len(ids) + new + 1)
        hidden = span(head.embed(ids), [Segment(cache, 0, len(ids))])
        token = int(head.logits(hidden[-1:]).argmax(-1))
        tokens, begin = [token], time.perf_counter()
        for position in range(len(ids), len(ids) + new - 1):
            hidden = span(head.embed([token]), [Segment(cache, position, 1)])
            token = int(head.logits(hidden).argmax(-1))
            tokens.append(token)
        return tokens, (new - 1) / (time.perf_counter() - begin)

    if job["mode"] == "decode":
        greedy(job["prompts"][0], 4)  # warm allocators and kernels
        _, out["tok_s"] = greedy(job["prompts"][0], job["new_tokens"])
        out["after_decode"], out["peak"] = rss_now(), rss_peak()
        return out
    with torch.inference_mode():
        ids, cache, top1 = job["text"], span.new_cache(len(job["text"])), []
        for start in range(0, len(ids), 64):
            chunk = ids[start : start + 64]
            top1 += head.logits(span(head.embed(chunk), [Segment(cache, start, len(chunk))])).argmax(-1).tolist()
    out["top1"] = top1
    out["greedy"] = [greedy(p, job["greedy_tokens"])[0] for p in job["prompts"]]
    return out


def worker_llama(job: dict) -> dict:
    from llama_cpp import Llama

    from swarm.aliases import DEFAULT_MODEL
    from swarm.model import resolve_model

    baseline = rss_now()
    accuracy = job["mode"] == "accuracy"
    llm = Llama(
        model_path=str(resolve_model(DEFAULT_MODEL)), n_threads=job["threads"], n_threads_batch=job["threads"],
        n_ctx=1024, n_batch=512, logits_all=accuracy, verbose=False,
    )  # fmt: skip
    out = {"baseline": baseline, "after_load": rss_now(), "peak_after_load": rss_peak()}

    def greedy(ids: list[int], new: int) -> tuple[list[int], float]:
        tokens, begin = [], 0.0
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            if len(tokens) == 1:
                begin = time.perf_counter()
            if len(tokens) == new:
                break
        return tokens, (new - 1) / (time.perf_counter() - begin)

    if job["mode"] == "decode":
        greedy(job["prompts"][0], 4)
        _, out["tok_s"] = greedy(job["prompts"][0], job["new_tokens"])
        out["after_decode"], out["peak"] = rss_now(), rss_peak()
        return out
    import numpy as np

    llm.reset()
    llm.eval(job["text"])
    out["top1"] = np.asarray(llm.scores[: len(job["text"])]).argmax(-1).tolist()
    out["greedy"] = [greedy(p, job["greedy_tokens"])[0] for p in job["prompts"]]
    return out


def run_worker(kind: str, job: dict, timeout: float = 600.0) -> dict:
    """Run one worker in a fresh process (the job on stdin, its result the last stdout line)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.edge", "--worker", kind], input=json.dumps(job), check=False, capture_output=True, text=True, timeout=timeout, cwd=PROJECT,
        env={**os.environ, "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "10000")},  # as swarm-node sets it
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the run ---------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="threads for ours and llama.cpp (default min(4, cores))")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens a timed decode makes (default 64)")
    parser.add_argument("--greedy-tokens", type=int, default=24, help="tokens of each prompt's greedy text (default 24)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant, alternating (default 3)")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp (llama-cpp-python not installed)")
    parser.add_argument("--no-q4", action="store_true", help="skip --quant q4_1 (the GGUF's own 4-bit blocks)")
    parser.add_argument("--worker", choices=("ours", "llama"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(sys.stdin.read())
        print(json.dumps((worker_ours if args.worker == "ours" else worker_llama)(job)), flush=True)
        return

    from swarm.model import DEFAULT_MODEL, open_checkpoint

    load_before = os.getloadavg()[0]
    say(f"load average (1 min) {load_before:.2f} on {os.cpu_count()} cores; threads {args.threads}")
    with open_checkpoint(DEFAULT_MODEL) as checkpoint:
        tokenizer = checkpoint.tokenizer()
    text = list(tokenizer.encode(TEXT))
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True) for p in PROMPTS]
    prompts = [[int(i) for i in (c["input_ids"] if hasattr(c, "keys") else c)] for c in chats]
    common = {"model": DEFAULT_MODEL, "threads": args.threads, "load_avg_1m": round(load_before, 2)}
    job = {"threads": args.threads, "prompts": prompts, "text": text, "new_tokens": args.new_tokens, "greedy_tokens": args.greedy_tokens}
    ours = [("ours", "float32"), ("ours", "int8")] + ([] if args.no_q4 else [("ours", "q4_1")])
    engines = ours + ([] if args.no_llama else [("llama", "llama.cpp")])

    # accuracy: one process per variant
    answers = {}
    extra = [("ours", "int8_blocks")] + ([] if args.no_q4 else [("ours", "q4_1_blocks")])
    for kind, variant in ours + extra + engines[len(ours) :]:
        say(f"accuracy: {variant} ...")
        answers[variant] = run_worker(kind, {**job, "mode": "accuracy", "variant": variant})
    reference = answers["float32"]["top1"]
    for variant, answer in answers.items():
        if variant == "float32":
            continue
        agree = sum(a == b for a, b in zip(answer["top1"], reference)) / len(reference)
        emit("top1_agreement_with_float32", agree, "fraction", {**common, "variant": variant, "positions": len(reference)},
             human=f"top-1 agreement with float32, {variant}: {agree:.2%} of {len(reference)} teacher-forced positions")  # fmt: skip
    for index, prompt in enumerate(PROMPTS):
        texts = {variant: tokenizer.decode(answer["greedy"][index], skip_special_tokens=True) for variant, answer in answers.items()}
        same = {variant: answer["greedy"][index] == answers["float32"]["greedy"][index] for variant, answer in answers.items()}
        emit("greedy_text", float(sum(same.values()) - 1), "variants equal to float32", {**common, "prompt": prompt, "texts": texts, "equal": same},
             human=f"prompt {prompt!r}:\n" + "\n".join(f"  {v:<12} {'==' if same[v] else '!='} {t!r}" for v, t in texts.items()))  # fmt: skip

    # speed and memory: alternating runs, one process each
    runs: dict[str, list[dict]] = {variant: [] for _, variant in engines}
    for repeat in range(args.repeats):
        order = engines if repeat % 2 == 0 else engines[::-1]
        for kind, variant in order:
            result = run_worker(kind, {**job, "mode": "decode", "variant": variant})
            runs[variant].append(result)
            say(f"run {repeat + 1}/{args.repeats} {variant}: {result['tok_s']:.1f} tok/s, RSS {result['after_decode'] / 2**20:.0f} MiB "
                f"(baseline {result['baseline'] / 2**20:.0f}, peak {result['peak'] / 2**20:.0f})")  # fmt: skip
    summary = {}
    for variant, results in runs.items():
        med = {key: statistics.median(r[key] for r in results) for key in ("tok_s", "after_load", "after_decode", "peak", "baseline")}
        summary[variant] = med
        params = {**common, "variant": variant, "new_tokens": args.new_tokens, "runs": [round(r["tok_s"], 2) for r in results]}
        emit("decode_tok_s", med["tok_s"], "tokens/s", params, human=f"{variant}: decode {med['tok_s']:.1f} tok/s")
        for key in ("after_load", "after_decode", "peak", "baseline"):
            emit(f"rss_{key}_bytes", med[key], "bytes", params, human=f"{variant}: RSS {key} {med[key] / 2**20:.0f} MiB")
        if "weight_bytes" in results[0]:
            emit("weight_bytes", results[0]["weight_bytes"], "bytes", params, human=f"{variant}: weights held {results[0]['weight_bytes'] / 2**20:.0f} MiB")
    f32 = summary["float32"]
    for variant in [v for v in summary if v != "float32"]:
        other = summary[variant]
        emit("decode_speedup_vs_float32", other["tok_s"] / f32["tok_s"], "ratio", {**common, "variant": variant},
             human=f"{variant} / float32: decode {other['tok_s'] / f32['tok_s']:.2f}x")  # fmt: skip
        emit("rss_ratio_vs_float32", other["after_decode"] / f32["after_decode"], "ratio", {**common, "variant": variant},
             human=f"{variant} / float32: RSS after decode {other['after_decode'] / f32['after_decode']:.2f}x")  # fmt: skip
        above = (other["after_decode"] - other["baseline"]) / (f32["after_decode"] - f32["baseline"])
        emit("rss_above_baseline_ratio_vs_float32", above, "ratio", {**common, "variant": variant},
             human=f"{variant} / float32: RSS above the process baseline {above:.2f}x")  # fmt: skip
    if "llama.cpp" in summary:
        llama, int8 = summary["llama.cpp"], summary["int8"]
        emit("int8_decode_vs_llama_cpp", int8["tok_s"] / llama["tok_s"], "ratio", common, human=f"int8 / llama.cpp: decode {int8['tok_s'] / llama['tok_s']:.2f}x")
        emit("int8_rss_vs_llama_cpp", int8["after_decode"] / llama["after_decode"], "ratio", common, human=f"int8 / llama.cpp: RSS {int8['after_decode'] / llama['after_decode']:.2f}x")
    load_after = os.getloadavg()[0]
    emit("load_avg_1m", load_after, "load", {**common, "when": "end"}, human=f"load average (1 min) at the end {load_after:.2f} (start {load_before:.2f})")


if __name__ == "__main__":
    main()
