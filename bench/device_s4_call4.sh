# session 4, call 4: after the FP8 page write moved its quantization into the compiled layer: the GPU tests of
# FP8 K/V pages and of the engine's CUDA paths; the attention kernel and the page write, FP8 against bf16 pages
mkdir -p /tmp/site && pip install -q --no-deps --target /tmp/site .whl/llama_models-0.3.0-py3-none-any.whl .whl/srv/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/src
python3 -m pytest -q -p no:logging -s tests/gpu/test_fp8_kv_gpu.py tests/gpu/test_cuda_paths.py 2>&1 | grep -v "Warning\|warn" | tail -12
python3 bench/kv_fp8_bench.py --out $OUT 2>&1 | tail -8
