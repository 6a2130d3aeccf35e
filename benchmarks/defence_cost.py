"""What the defences cost: hop overhead and 3-node decode vs local, before and after, in one run.

"Before" is a git revision checked out into a temporary worktree (default: the last
commit before the hardening work); "after" is this tree. Each side runs its own
`hop_overhead.py` and `swarm_vs_local.py` (its own nodes, its own protocol) and this
tree's `step_path.py` (two nodes and a client in one process: the step path's CPU
cost with little of the cross-process noise), the two sides alternating round by
round so that drift in the machine's speed hits both alike. The figures are ratios
after/before; the aim is at most 5% worse.

Run: `python benchmarks/defence_cost.py [--base REV] [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit  # noqa: E402

BASE_REV = "8846362"  # main before issue 11 (hardening)


def run_benchmark(tree: Path, script: str, args: list[str], ours: bool = False) -> dict[tuple[str, str], float]:
    """One benchmark script run inside `tree` (its packages); its JSON results by (name, params).
    `ours`: this tree's copy of the script (it measures the tree it runs in), else the tree's own."""
    path = ROOT / "benchmarks" / script if ours else Path("benchmarks") / script
    done = subprocess.run([sys.executable, str(path), *args], cwd=tree, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed in {tree}:\n{done.stderr[-3000:]}")
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[(record["name"], json.dumps(record["params"], sort_keys=True))] = record["value"]
    return results


def pick(results: dict[tuple[str, str], float], name: str, **params: object) -> float:
    for (found, raw), value in results.items():
        if found == name and all(json.loads(raw).get(k) == v for k, v in params.items()):
            return value
    raise KeyError(f"{name} {params} not in the results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE_REV, help=f"the revision before the defences (default {BASE_REV})")
    parser.add_argument("--rounds", type=int, default=3, help="alternating before/after rounds (default 3)")
    parser.add_argument("--steps", type=int, default=300, help="one-token steps per hop-overhead measurement")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per decode measurement")
    parser.add_argument("--only", choices=("step", "hop", "decode"), action="append", help="run only these (repeatable; default all)")
    args = parser.parse_args()
    only = set(args.only or ("step", "hop", "decode"))
    base = Path(tempfile.mkdtemp(prefix="layerswarm-base-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
    figures: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    try:
        for round_ in range(args.rounds):
            for side, tree in (("before", base), ("after", ROOT)) if round_ % 2 == 0 else (("after", ROOT), ("before", base)):
                print(f"round {round_ + 1}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
                got = figures[side]
                if "step" in only:
                    step = run_benchmark(tree, "step_path.py", [], ours=True)
                    got.setdefault("step_path_ms_2", []).append(pick(step, "step_path_two_hops_ms"))
                if "hop" in only:
                    hop = run_benchmark(tree, "hop_overhead.py", ["--steps", str(args.steps), "--seconds", "1"])
                    for hops in (1, 2):
                        got.setdefault(f"hop_overhead_ms_{hops}", []).append(pick(hop, "hop_overhead_median", hops=hops))
                if "decode" in only:
                    decode = run_benchmark(tree, "swarm_vs_local.py", ["--new-tokens", str(args.new_tokens), "--trials", "2"])
                    for wire in ("float32", "bfloat16"):
                        got.setdefault(f"decode_vs_local_{wire}", []).append(pick(decode, "swarm_decode_vs_local", wire=wire))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    params = {"base": args.base, "rounds": args.rounds, "steps": args.steps, "new_tokens": args.new_tokens}
    for key in figures["after"]:
        before, after = statistics.median(figures["before"][key]), statistics.median(figures["after"][key])
        unit = "ratio" if key.startswith("decode") else "ms"
        emit(f"{key}_before", before, unit, params)
        emit(f"{key}_after", after, unit, params)
        emit(f"{key}_after_vs_before", after / before, "ratio", params, human=f"{key}: before {before:.3f}, after {after:.3f} ({after / before:.3f}x)")


if __name__ == "__main__":
    main()
