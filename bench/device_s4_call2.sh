# session 4, call 2: every GPU test; the 90B engine's memory at the default 0.9; the 11B FP8 bench and K/V pages
bash bench/device_issue16.sh tests $OUT 2>&1 | tail -30
bash bench/device_issue16.sh memory $OUT --size 90b --utilization 0.9 2>&1 | grep -v "^|" | tail -25
bash bench/device_issue16.sh bench $OUT 11b kv 2>&1 | tail -30
