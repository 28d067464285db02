#!/usr/bin/env bash
# A second, shorter GPU call after benchmarks/gpu.sh, at once while the machine is
# warm: the Pallas kernels against the scans where the table
# implementation='auto' reads comes from. Every step compiles its programs first,
# in 12 threads (16 cores there; 96 programs took 129 s on 2026-12-04), ends by
# the call's budget (BUDGET_S, default 280 s from the start: what gpu.sh leaves
# of a session's 900 s) and writes its JSON after each shape:
#   1. the grid 'auto' reads, at hidden 32 and 64 (from 128 on, session 34's
#      grid had the kernels slower than the scans at every batch, and the dot
#      kernels have not changed since): 'pallas' and 'pallas/matmul=auto' (the
#      multiply-adds, one row a program, session 35) against the scans
#      (forward and training step) at batch 1-64, 300 steps;
#   2. hidden 128, batch 1-64: the float16 weights (recurrent_weights, session
#      36: all of W_h held, where float32 reads a third of it from L2 at every
#      step) against the default kernels and the scans, which won there in
#      session 34;
#   3. in the time left, 16-row blocks at batch 32 and 64: in session 34's grid
#      a kernel program's step time grew with its rows (16 -> 32 rows: 1.7 ->
#      3.5 ms forward at hidden 128, batch 16 and 32) while more programs ran
#      side by side almost free (hidden 256: 1, 2, 4 programs of 16 rows, 8.2,
#      9.0, 9.1 ms). So 'pallas/state_elements=512' (at most 16 rows a program
#      from hidden 32 on) against the default blocks (up to 64 rows).
#   BUDGET_S=<budget_left_s - 20> bash benchmarks/gpu_grid.sh
#       (device tool: that command, timeout_s budget_left_s - 10)
# Then: python -m benchmarks.pallas_verdict --grid OUT/pallas_grid.json --commit SHA
#   (and --grid OUT/pallas_grid128.json --plan pallas/recurrent_weights=float16)
#   [--plan pallas/matmul=auto, if gpu.sh's step 3 found the multiply-adds faster: then
#   matmul='auto' becomes the default and PALLAS_FASTER its regions]
#   (and --plan pallas/state_elements=512 --grid OUT/pallas_blocks.json for
#   the blocks, if they become the default)
source "$(dirname "$0")/gpu_common.sh" grid_log.txt 280
step environment
{ nvidia-smi -L; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  $PY -c "import jax; d = jax.devices()[0]; print('jax', jax.__version__, d.device_kind)"
} 2>&1 | tee -a "$log"
shapes=""
for H in 32 64; do
  for B in 1 4 8 16 32 64; do
    shapes="$shapes${shapes:+,}${B}x300x$(( H / 2 > 16 ? H / 2 : 16 ))x$H"
  done
done
step grid
timeout $(limit 150) $PY -m benchmarks.gpu_plans --variants pallas pallas/matmul=auto --jobs 12 \
  --compile-timeout 100 --rounds 3 --shapes "$shapes" --json "$out/pallas_grid.json" 2>&1 \
  | tee -a "$log"
step float16 weights at hidden 128
timeout $(limit 90) $PY -m benchmarks.gpu_plans --variants pallas pallas/recurrent_weights=float16 \
  --jobs 12 --compile-timeout 50 --rounds 3 --json "$out/pallas_grid128.json" \
  --shapes 1x300x64x128,4x300x64x128,8x300x64x128,16x300x64x128,32x300x64x128,64x300x64x128 \
  2>&1 | tee -a "$log"
step 16-row blocks, in the time left
timeout $(limit 100) $PY -m benchmarks.gpu_plans --variants pallas pallas/state_elements=512 \
  --jobs 12 --compile-timeout 50 --rounds 3 --json "$out/pallas_blocks.json" \
  --shapes 32x300x16x32,64x300x16x32,32x300x32x64,64x300x32x64,32x300x64x128,64x300x64x128 \
  2>&1 | tee -a "$log"
rm -f "$out"/*.tmp
step done
