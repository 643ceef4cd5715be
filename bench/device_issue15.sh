#!/usr/bin/env bash
# The H200 checks of issue 15 (the engine rebuilt): `bash bench/device_issue15.sh tests|bench|serve OUT`.
#   tests: tests/gpu (graphs, compiled layers, paged decode, vision and prefill graphs against the plain model)
#   bench: bench/gpu_bench.py --quick for this tree and, if bench_before/ holds an older tree, for that one
#   serve: bench/gpu_serve_bench.py with default server flags (4-tile image per request) and the multi-turn runs
set -uo pipefail
what=$1; out=$2
mkdir -p "$out" /tmp/site
pip install -q --no-deps --target /tmp/site .whl/llama_models-0.3.0-py3-none-any.whl 2>/dev/null
# the server's extra (fastapi, uvicorn and what they need) and httpx for the load generator, as wheels in .whl/srv
if [ "$1" = serve ]; then pip install -q --no-deps --target /tmp/site .whl/srv/*.whl 2>&1 | tail -2; fi
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case $what in
tests)
  python3 -m pytest -q -rA tests/gpu 2>&1 | tail -60 | tee "$out/gpu-tests.txt" ;;
bench)
  python3 bench/gpu_bench.py --quick --skip-transformers --skip-exactness --out "$out" 2>&1 | tail -25
  if [ -d bench_before/src ]; then
    mkdir -p "$out/before"
    (cd bench_before && PYTHONPATH=/tmp/site:$PWD/src python3 bench/gpu_bench.py --quick --skip-transformers \
       --out "$out/before" 2>&1 | tail -25)
  fi ;;
serve)
  python3 -m pytest -q -x tests/gpu/test_cuda_paths.py -k "engine_on_graphs or image_cache" 2>&1 | tail -3
  python3 bench/tiny_assets.py /tmp/site/llama_models/llama3/tokenizer.model
  python3 bench/gpu_serve_bench.py --assets /tmp/assets --out "$out" --skip-checks --defaults \
    --runs 128:512:256 64:512:128 64:128:192 --multiturn 1 32 2>&1 | grep -v "^INFO" | tail -80 ;;
esac
