#!/usr/bin/env bash
# Waits up to WAIT_S seconds (default 570) for bench/gpu_speed_session.sh to finish, then copies
# its results and logs to $OUT. Call it again on the same warm machine while it is still running.
S=${SESSION_DIR:-/tmp/speed}; WAIT_S=${WAIT_S:-570}
for ((i = 0; i < WAIT_S / 5; i++)); do
  grep -q '^== done' "$S/session.log" 2>/dev/null && break
  sleep 5
done
grep '^== ' "$S/session.log"
tail -n "${TAIL:-25}" "$S/session.log"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
mkdir -p "$OUT"
cp -r "$S"/ratios "$S"/kernels* "$S"/profile "$S"/*-summary "$OUT/" 2>/dev/null
cp "$S"/session.log "$S"/triton.tgz "$OUT/" 2>/dev/null
for g in "$S"/grid*/; do [ -d "$g" ] && mkdir -p "$OUT/$(basename "$g")" && cp "$g"/*.log "$g"/runs.json "$OUT/$(basename "$g")/" 2>/dev/null
  # the jobs' logs (phase times) and benchmark records, in one file: the device call may end before the run does
  [ -d "$g/results/logs" ] && tar czf "$OUT/$(basename "$g")/jobs.tgz" -C "$g/results" logs/autoquant logs/validate logs/recipes benchmarks 2>/dev/null
done
cp /tmp/vlmsens-"$(id -u)"/*.log "$OUT/" 2>/dev/null  # the worker servers' logs: each standby's import time
if ! grep -q '^== done' "$S/session.log"; then  # still running: what the grid has so far
  for g in "$S"/grid*/; do [ -f "$g/runs.json" ] || [ -d "$g/results/benchmarks" ] && python3 bench/grid_bench.py summary \
    --workdir "$g" --out "$OUT/partial-$(basename "$g")" | tail -40; done
  grep -E 'of [0-9]+ steps' "$S"/grid*/snakemake-*.log 2>/dev/null | tail -1
  exit 1
fi
