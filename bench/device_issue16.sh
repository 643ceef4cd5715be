#!/usr/bin/env bash
# The H200 checks of issues 16 (FP8) and 17 (structured output): `bash bench/device_issue16.sh WHAT OUT [more args]`.
#   tests:   tests/gpu (the FP8 kernel, fast path and engine against the reference; FP8 against bf16; the
#            graph, compiled and paged paths against the plain model)
#   bench:   bench/fp8_bench.py with the parts given (kernels 11b cut90b 90b)
#   serve11: `mllama serve CKPT --quantize fp8` (the bf16 11B written to disk, quantized as it loads), concurrency
#            64 with 512-token answers and 1 with 128, one 4-tile image per request
#            (RUNS=... replaces the runs; more arguments go to gpu_serve_bench.py, e.g. --server-flag=...)
#   serve90: `mllama serve CONFIG --load-format dummy --quantize fp8` (the 90B made on the GPU), concurrency 32
#            with 512-token answers and 1 with 128
#   probe:   bench/fp8_probe.py with the parts given (products sweep step)
#   memory:  bench/engine_memory.py with the flags given (the engine's memory, stage by stage)
#   fp8test: tests/gpu/test_fp8_gpu.py alone
#   structured: bench/structured_bench.py on the random 11B (constrained decoding's cost per step; compile times)
#   tests+structured: both, in one call
#   engine:  the serving engine's GPU tests alone (CUDA paths, constrained rows, FP8 pages)
#   finetune: bench/finetune_bench.py (LoRA training, mllama against transformers + peft; needs peft's wheel)
set -uo pipefail
what=$1; out=$2; shift 2
mkdir -p "$out" /tmp/site
pip install -q --no-deps --target /tmp/site .whl/llama_models-0.3.0-py3-none-any.whl .whl/srv/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
assets() {
  python3 bench/tiny_assets.py /tmp/site/llama_models/llama3/tokenizer.model
}
case $what in
tests+structured)
  bash "$0" tests "$out"; bash "$0" structured "$out" "$@" ;;
finetune)
  python3 -u bench/finetune_bench.py --out "$out" "$@" 2>&1 | grep --line-buffered -v "^INFO\|Warning\|warn" > "$out/finetune.log"; tail -20 "$out/finetune.log" ;;
structured)
  assets
  python3 bench/structured_bench.py --tokenizer-from /tmp/tiny --out "$out" "$@" 2>&1 | grep -v "^INFO\|Warning" | tail -30 ;;
engine)
  python3 -m pytest -q -p no:logging -s tests/gpu/test_cuda_paths.py tests/gpu/test_constrained_gpu.py tests/gpu/test_fp8_kv_gpu.py > "$out/gpu-engine-tests.txt" 2>&1; echo "pytest rc $?" | tee -a "$out/gpu-engine-tests.txt"; grep -v "^PASSED\|Warning\|warn" "$out/gpu-engine-tests.txt" | tail -25 ;;
tests)
  python3 -m pytest -q -p no:logging -s tests/gpu > "$out/gpu-tests.txt" 2>&1; echo "pytest rc $?" | tee -a "$out/gpu-tests.txt"; grep -v "^PASSED\|Warning\|warn" "$out/gpu-tests.txt" | tail -25 ;;
fp8test)
  python3 -m pytest -q -p no:logging -s tests/gpu/test_fp8_gpu.py > "$out/fp8-tests.txt" 2>&1; echo "pytest rc $?" | tee -a "$out/fp8-tests.txt"; grep -v "^PASSED\|Warning\|warn" "$out/fp8-tests.txt" | tail -25 ;;
probe)
  python3 bench/fp8_probe.py --out "$out" --parts "$@" 2>&1 | grep -v "^INFO\|Warning" | tail -60 ;;
memory)
  assets
  python3 bench/engine_memory.py --out "$out" "$@" 2>&1 | grep -v "^INFO\|Warning" | tail -60 ;;
bench)
  python3 bench/fp8_bench.py --out "$out" --parts "$@" 2>&1 | grep -v "^INFO\|Warning" | tail -60 ;;
serve11)
  assets
  python3 bench/gpu_serve_bench.py --assets /tmp/assets --out "$out" --skip-checks --defaults --size 11b \
    --server-flag=--quantize --server-flag=fp8 --runs ${RUNS:-64:512:128 1:128:8} "$@" 2>&1 | grep -v "^INFO" | tail -40 ;;
serve90)
  assets
  python3 bench/gpu_serve_bench.py --assets /tmp/assets --out "$out" --skip-checks --defaults --size 90b --dummy \
    --server-flag=--quantize --server-flag=fp8 --runs ${RUNS:-32:512:64 1:128:8} "$@" 2>&1 | grep -v "^INFO" | tail -40 ;;
esac
