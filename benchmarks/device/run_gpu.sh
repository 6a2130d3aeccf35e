#!/usr/bin/env bash
# On the GPU box, from a copy of the repository: install the carried wheels (.whl, made by
# benchmarks/device/wheels.sh), build the random-weight checkpoint if absent, run one benchmark,
# and leave its JSON lines and log under $OUT.
#
#   benchmarks/device/run_gpu.sh decode        # 1 GPU: gpu_decode.py, 8b shape       (~7-9 min with the build)
#   benchmarks/device/run_gpu.sh ours          # 1 GPU: the same without the transformers anchors (~5 min)
#   benchmarks/device/run_gpu.sh anchors       # 1 GPU: only the transformers anchors (~4-5 min)
#   benchmarks/device/run_gpu.sh pipeline8b    # 2 GPUs: gpu_pipeline.py --gpus 2, 8b  (~4-6 min with the build)
#   benchmarks/device/run_gpu.sh pipeline70b   # 4 GPUs: gpu_pipeline.py --gpus 4, 70b (~8-10 min with the build)
#   benchmarks/device/run_gpu.sh build70b      # only build the 70b checkpoint (when the run above must be split)
#   benchmarks/device/run_gpu.sh tests         # tests/test_gpu.py
#   benchmarks/device/run_gpu.sh check         # the tiny shape on the CPU: checks the scripts anywhere
#
# The checkpoint goes to /dev/shm when it has room, else to /tmp; CKPT_ROOT overrides.
# Its tokenizer is a stand-in (word-level, made-up words): the figures are speed only.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
what="${1:-decode}"
# The device runs one command for 10 minutes at most and a fresh machine has no checkpoint: the build
# and the benchmark share one call, and the benchmark gets what the build left (LIMIT: the call's seconds).
LIMIT="${LIMIT:-585}"
budget() { echo $(( LIMIT - SECONDS - 15 )); }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/*.whl here: cryptography, zeroconf, gguf, pytest-asyncio must already be installed" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader >&2 || true
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "gpus", torch.cuda.device_count())' >&2

checkpoint() {  # checkpoint SHAPE GB [DEVICE]: echo the directory holding it, building it when absent
  local shape="$1" need=$(( $2 * 1024 * 1024 * 1024 )) device="${3:-cuda}" root
  if [ -n "${CKPT_ROOT:-}" ]; then root="$CKPT_ROOT"
  elif [ -d "/dev/shm/llama-$shape" ] || [ "$(df --output=avail -B1 /dev/shm 2>/dev/null | tail -1)" -gt "$need" ] 2>/dev/null; then root=/dev/shm
  else root=/tmp; fi
  local dir="$root/llama-$shape"
  python3 benchmarks/random_llama.py --shape "$shape" --out "$dir" --device "$device" >>"$OUT/build.jsonl" 2> >(tee -a "$OUT/build.log" >&2) || return 1
  echo "$dir"
}

run() {  # run NAME COMMAND...: JSON lines to $OUT/NAME.jsonl, the human lines to $OUT/NAME.log (and both to the terminal)
  local name="$1"; shift
  "$@" 2> >(tee -a "$OUT/$name.log" >&2) | tee -a "$OUT/$name.jsonl"
}

case "$what" in
  decode)
    dir=$(checkpoint 8b 18) || exit 1
    run gpu_decode python3 benchmarks/gpu_decode.py --model "$dir" --budget "$(budget)" ;;
  ours)  # decode without the transformers anchors (when the whole run does not fit one call)
    dir=$(checkpoint 8b 18) || exit 1
    run gpu_decode python3 benchmarks/gpu_decode.py --model "$dir" --budget "$(budget)" --skip hf_eager,hf_compile ;;
  anchors)  # only the transformers anchors (and the bandwidth)
    dir=$(checkpoint 8b 18) || exit 1
    run gpu_decode python3 benchmarks/gpu_decode.py --model "$dir" --budget "$(budget)" --skip ours_local,pipeline ;;
  pipeline8b)
    dir=$(checkpoint 8b 18) || exit 1
    run gpu_pipeline_8b python3 benchmarks/gpu_pipeline.py --shape 8b --gpus 2 --model "$dir" --budget "$(budget)" ;;
  build70b)
    checkpoint 70b 150 >/dev/null || exit 1 ;;
  pipeline70b)
    dir=$(checkpoint 70b 150) || exit 1
    gpus=$(python3 -c 'import torch; print(min(4, torch.cuda.device_count()))')
    [ "$gpus" -ge 4 ] || echo "only $gpus GPUs here: running the 70b shape on $gpus (say so with the figures)" >&2
    run gpu_pipeline_70b python3 benchmarks/gpu_pipeline.py --shape 70b --gpus "$gpus" --model "$dir" --budget "$(budget)" ;;
  tests)
    timeout $(( LIMIT - SECONDS )) python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" ;;
  check)  # the same path on a CPU with the tiny shape: checks this script and the benchmarks anywhere
    dir=$(checkpoint tiny 1 cpu) || exit 1
    run check_decode python3 benchmarks/gpu_decode.py --model "$dir" --device cpu --tokens 16 --sessions 4 --budget 300 || exit 1
    run check_pipeline python3 benchmarks/gpu_pipeline.py --shape tiny --gpus 2 --device cpu --model "$dir" --tokens 16 --sessions 4 --budget 300 ;;
  *)
    echo "usage: $0 decode|ours|anchors|pipeline8b|pipeline70b|build70b|tests|check" >&2; exit 2 ;;
esac
