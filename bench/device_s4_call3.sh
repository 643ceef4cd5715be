# session 4, call 3: the recompile test (with dynamo's default limit it must fail, with mllama's pass); the 90B
# served at the default --gpu-memory-utilization with FP8 K/V pages; the 11B with FP8 weights and K/V pages
mkdir -p /tmp/site && pip install -q --no-deps --target /tmp/site .whl/llama_models-0.3.0-py3-none-any.whl .whl/srv/*.whl >/dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import sys, pytest, mllama.engine.decode as d
d.RECOMPILE_LIMIT = 8
sys.exit(pytest.main(['-q', '-p', 'no:logging', 'tests/gpu/test_fp8_gpu.py', '-k', 'every_rows_bucket']))" 2>&1 | tail -4
PYTHONPATH=/tmp/site:$PWD/src python3 -m pytest -q -p no:logging tests/gpu/test_fp8_gpu.py -k every_rows_bucket 2>&1 | tail -2
mkdir -p $OUT/s90 $OUT/s11
bash bench/device_issue16.sh serve90 $OUT/s90 --server-flag=--kv-cache-dtype --server-flag=fp8 2>&1 | tail -25
RUNS=64:512:128 bash bench/device_issue16.sh serve11 $OUT/s11 --server-flag=--kv-cache-dtype --server-flag=fp8 2>&1 | tail -25
